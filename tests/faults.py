"""Callbacks that inject faults into a real run; tests load them by class path (tests/ on PYTHONPATH)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lit_accel.core.dist import local_tensor


class CrashAtStep(Callback):
    """Raise RuntimeError when the given optimizer step has finished, on the given rank (-1: all)."""

    def __init__(self, step: int, rank: int = -1) -> None:
        self.step = step
        self.rank = rank

    def on_train_batch_end(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.global_step >= self.step and self.rank in (-1, trainer.global_rank):
            raise RuntimeError(f"injected crash at step {trainer.global_step} on rank {trainer.global_rank}")


class SleepEachStep(Callback):
    """Slow training down so that a signal can arrive mid-epoch."""

    def __init__(self, seconds: float = 0.1) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs) -> None:
        time.sleep(self.seconds)


class SleepTwice(Callback):
    """Two sleeps after every training batch, each settable on its own (two levers of known speed)."""

    def __init__(self, first: float = 0.0, second: float = 0.0) -> None:
        self.first = first
        self.second = second

    def on_train_batch_end(self, *args, **kwargs) -> None:
        time.sleep(self.first + self.second)


class PoisonParameters(Callback):
    """From optimizer step ``from_step`` on, fill one parameter with NaN before every batch, on the
    given rank (-1: all). Under FSDP2 only that rank's shard is poisoned. A divergence no rollback
    can cure: the DivergenceGuard rolls back and, after ``max_rollbacks``, stops the run."""

    def __init__(self, from_step: int, rank: int = -1) -> None:
        self.from_step = from_step
        self.rank = rank

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        if trainer.global_step >= self.from_step and self.rank in (-1, trainer.global_rank):
            weight = next(p for p in pl_module.parameters() if p.dim() > 1)
            with torch.no_grad():
                local_tensor(weight).fill_(float("nan"))


class DumpLocalState(Callback):
    """Each rank saves its own parameters (its shards under FSDP2), its optimizer state and the
    global step, when training starts and when it ends, normally or by an exception, to
    ``<out>/<label>-rank<R>.pt`` as ``{"start": ..., "end": ...}``."""

    def __init__(self, out: str, label: str) -> None:
        self.out = Path(out)
        self.label = label
        self.rows: dict[str, Any] = {}

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        optimizer = trainer.optimizers[0]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {
            "global_step": trainer.global_step,
            "params": {n: local_tensor(p).detach().clone() for n, p in pl_module.named_parameters()},
            "optimizer": [
                {k: local_tensor(v).detach().clone() for k, v in optimizer.state.get(p, {}).items()} for p in params
            ],
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows["start"] = self._record(trainer, pl_module)

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows["end"] = self._record(trainer, pl_module)
        torch.save(self.rows, self.out / f"{self.label}-rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._save(trainer, pl_module)


class SignalSelfAtStep(Callback):
    """Send this process ``signum`` (default SIGUSR1, SLURM's requeue signal) ``times`` times in a
    row (a Ctrl-C pressed twice) at the start of the batch after optimizer step ``step``, on the
    given rank (-1: all), once."""

    def __init__(self, step: int, rank: int = -1, signum: int = int(signal.SIGUSR1), times: int = 1) -> None:
        self.step = step
        self.rank = rank
        self.signum = signum
        self.times = times
        self._sent = False

    def on_train_batch_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if not self._sent and trainer.global_step >= self.step and self.rank in (-1, trainer.global_rank):
            self._sent = True
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


class KillAtCheckpointMove(Callback):
    """SIGKILL this process at the ``save``-th time a file named ``name`` is being put in place.

    "In place" is the step that makes the new bytes the file's: ``os.replace`` onto it (a kill just
    before the rename), or, where a save moves its file across filesystems, ``shutil.copyfile`` into
    it (Lightning's save from a TMPDIR on tmpfs; the kill comes after half the bytes, as a kill
    during the copy would). Installed when the Trainer sets up; a process killed so never returns.
    """

    def __init__(self, save: int = 2, name: str = "last.ckpt") -> None:
        self.save = save
        self.name = name
        self._seen = 0

    def _arrived(self, target: Any) -> bool:
        if os.path.basename(os.fspath(target)) != self.name:
            return False
        self._seen += 1
        return self._seen >= self.save

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import shutil

        replace, copyfile = os.replace, shutil.copyfile

        def replace_or_die(src: Any, dst: Any, **kwargs: Any) -> None:
            if self._arrived(dst):
                os.kill(os.getpid(), signal.SIGKILL)
            replace(src, dst, **kwargs)

        def copy_or_die(src: Any, dst: Any, **kwargs: Any) -> Any:
            if not self._arrived(dst):
                return copyfile(src, dst, **kwargs)
            with open(src, "rb") as source, open(dst, "wb") as target:
                target.write(source.read()[: os.path.getsize(src) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

        os.replace = replace_or_die  # type: ignore[assignment]
        shutil.copyfile = copy_or_die  # type: ignore[assignment]
