"""Tests for PreemptionCheckpoint: real in-process Trainer runs that signal their own process."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from helpers import quiet_cpu_trainer
from lit_accel.callbacks.preemption_checkpoint import PreemptionCheckpoint

BATCHES_PER_EPOCH = 4
MAX_STEPS = 10  # two full epochs and two batches of a third


class Regressor(pl.LightningModule):
    """Deterministic linear regression (fixed data, no shuffling); records the steps it trains."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)
        self.steps: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps.append(self.global_step)
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        # Every batch holds the same samples, so a resumed run that restarts its epoch's DataLoader
        # (a plain DataLoader is not resumable mid-epoch) still trains exactly like the full run.
        x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)).repeat(BATCHES_PER_EPOCH, 1)
        return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(12, 4)), batch_size=4)


class SignalAt(Callback):
    """Sends ``signum`` to this process ``times`` times at the start of training batch ``step``."""

    def __init__(self, step: int, signum: int = signal.SIGTERM, times: int = 1, during: str = "train") -> None:
        self.step, self.signum, self.times, self.during = step, signum, times, during
        self.handler_during_fit: Any = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.handler_during_fit = signal.getsignal(signal.SIGINT)
        if self.during == "train" and trainer.global_step == self.step:
            self._send()

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.during == "validate" and batch_idx == self.step:
            self._send()

    def _send(self) -> None:
        for _ in range(self.times):
            if self.signum == signal.SIGINT:
                signal.raise_signal(signal.SIGINT)  # as a terminal's Ctrl-C
            else:
                os.kill(os.getpid(), self.signum)  # as a scheduler's preemption notice


class Crash(Callback):
    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == 2:
            raise RuntimeError("boom")


pytestmark = [
    # Resuming mid-epoch from a plain DataLoader: harmless here, every batch is the same.
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
]


@pytest.fixture(autouse=True)
def _restore_signal_handlers() -> Iterator[None]:
    """Each test starts and ends with the process's own handlers, whatever a failing test left."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def _trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    defaults = {"max_steps": MAX_STEPS, "limit_val_batches": 0, "num_sanity_val_steps": 0}
    return quiet_cpu_trainer(tmp_path, callbacks, **{**defaults, **kwargs})


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"filename": ""}, "filename=''"),
        ({"filename": "   "}, "filename='   '"),
        ({"filename": "ckpts/last"}, "filename='ckpts/last'"),
        ({"filename": "last.ckpt"}, "leave out '.ckpt'"),
        ({"filename": 3}, "filename=3"),
        ({"handle_sigint": "yes"}, "handle_sigint='yes'"),
        ({"handle_sigint": 1}, "handle_sigint=1"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        PreemptionCheckpoint(**kwargs)


# ------------------------------------------------------------------------------------ behaviour


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
def test_signal_saves_a_checkpoint_that_resumes_exactly(tmp_path: Path, signum: int) -> None:
    original_sigint = signal.getsignal(signal.SIGINT)
    full = Regressor()
    _trainer(tmp_path / "full", []).fit(full)

    callback, sender = PreemptionCheckpoint(), SignalAt(step=5, signum=signum)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=0)  # saves nothing itself
    model = Regressor()
    with pytest.raises(SIGTERMException):
        _trainer(tmp_path / "run", [callback, sender, checkpoints], enable_checkpointing=True).fit(model)

    path = tmp_path / "ckpts" / "last.ckpt"
    assert callback.saved_path == str(path) and path.is_file()
    # The batch that was running when the signal came (step 5) finished and is in the checkpoint.
    assert model.steps == [0, 1, 2, 3, 4, 5]
    checkpoint = torch.load(path, weights_only=True)  # as Lightning loads it
    assert checkpoint["global_step"] == 6 and checkpoint["epoch"] == 1
    # The Ctrl-C handler was installed during fit and is gone after it, although fit raised.
    assert sender.handler_during_fit == callback._on_sigint
    assert signal.getsignal(signal.SIGINT) == original_sigint

    resumed = Regressor()
    _trainer(tmp_path / "resumed", [PreemptionCheckpoint()]).fit(resumed, ckpt_path=path)
    assert resumed.steps == [6, 7, 8, 9]
    for name, value in _weights(full).items():
        torch.testing.assert_close(_weights(resumed)[name], value, rtol=0, atol=0)


def test_checkpoint_goes_to_default_root_dir_without_model_checkpoint(tmp_path: Path) -> None:
    callback = PreemptionCheckpoint(filename="preempted")
    with pytest.raises(SIGTERMException):
        _trainer(tmp_path, [callback, SignalAt(step=2)]).fit(Regressor())
    assert callback.saved_path == str(tmp_path / "checkpoints" / "preempted.ckpt")
    assert torch.load(callback.saved_path, weights_only=True)["global_step"] == 3


def test_second_ctrl_c_interrupts_without_a_checkpoint(tmp_path: Path) -> None:
    callback = PreemptionCheckpoint()
    # The first Ctrl-C asks for a stop after the batch; the second raises KeyboardInterrupt, which
    # Lightning turns into a graceful shutdown that ends in sys.exit(1).
    with pytest.raises(SystemExit):
        _trainer(tmp_path, [callback, SignalAt(step=2, signum=signal.SIGINT, times=2)]).fit(Regressor())
    assert callback.saved_path is None and not (tmp_path / "checkpoints").exists()


def test_other_exceptions_save_nothing(tmp_path: Path) -> None:
    callback = PreemptionCheckpoint()
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, [callback, Crash()]).fit(Regressor())
    assert callback.saved_path is None and not (tmp_path / "checkpoints").exists()


def test_sigterm_during_validate_saves_nothing(tmp_path: Path) -> None:
    callback = PreemptionCheckpoint()
    trainer = _trainer(tmp_path, [callback, SignalAt(step=0, during="validate")], limit_val_batches=3)
    with pytest.raises(SIGTERMException):
        trainer.validate(Regressor())
    assert callback.saved_path is None and not (tmp_path / "checkpoints").exists()


def test_handler_installed_during_fit_and_restored_at_teardown(tmp_path: Path) -> None:
    def mine(signum: int, frame: Any) -> None:
        pass

    signal.signal(signal.SIGINT, mine)
    callback, probe = PreemptionCheckpoint(), SignalAt(step=-1)  # records the handler, sends nothing
    for _ in range(2):  # a second fit installs and restores it again
        _trainer(tmp_path, [callback, probe], max_steps=2).fit(Regressor())
        assert probe.handler_during_fit == callback._on_sigint
        assert signal.getsignal(signal.SIGINT) is mine
    assert callback.saved_path is None


def test_handle_sigint_false_leaves_ctrl_c_alone(tmp_path: Path) -> None:
    original = signal.getsignal(signal.SIGINT)
    probe = SignalAt(step=-1)
    _trainer(tmp_path, [PreemptionCheckpoint(handle_sigint=False), probe], max_steps=2).fit(Regressor())
    assert probe.handler_during_fit is original


def test_works_on_lightning_boring_model(tmp_path: Path) -> None:
    callback = PreemptionCheckpoint()
    with pytest.raises(SIGTERMException):
        _trainer(tmp_path, [callback, SignalAt(step=3)]).fit(BoringModel(), datamodule=BoringDataModule())
    assert torch.load(callback.saved_path, weights_only=True)["global_step"] == 4


def test_ctrl_c_while_the_checkpoint_is_written_waits_for_a_complete_file(tmp_path: Path) -> None:
    """The checkpoint is the run's way back: a Ctrl-C that arrives while it is written must not cut it."""

    class CtrlCDuringSave(PreemptionCheckpoint):
        def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
            save = trainer.save_checkpoint

            def save_with_a_ctrl_c(path: str, *args: Any, **kwargs: Any) -> None:
                signal.raise_signal(signal.SIGINT)  # mid-save, as an impatient user
                save(path, *args, **kwargs)

            trainer.save_checkpoint = save_with_a_ctrl_c  # type: ignore[method-assign]
            super().on_exception(trainer, pl_module, exception)

    callback = CtrlCDuringSave()
    try:
        with pytest.raises(SIGTERMException):
            _trainer(tmp_path, [callback, SignalAt(step=2)]).fit(Regressor())
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C interrupted the checkpoint being written")
    assert torch.load(callback.saved_path, weights_only=True)["global_step"] == 3


# ------------------------------------------------------------------------------ SLURM requeue


# A SLURM job Lightning auto-requeues (SLURMEnvironment detected from these), one task.
SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "train",
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}


class SpyOnRequeue(SignalAt):
    """Sends SIGUSR1 at the start of batch ``step``, then records what Lightning's handler had done by then."""

    def __init__(self, step: int, root: Path) -> None:
        super().__init__(step, signal.SIGUSR1)
        self.root = root
        self.saved_right_after_the_signal: list[Path] | None = None

    def _send(self) -> None:
        super()._send()  # the Python handler runs before the next line, as a real signal's would
        self.saved_right_after_the_signal = sorted(self.root.glob("hpc_ckpt_*.ckpt"))


def _fake_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``scontrol`` on PATH that records its arguments (a real requeue would end the job)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    return calls


@pytest.mark.parametrize("handle_sigint", [True, False])  # Ctrl-C handling is another matter
def test_slurm_requeue_signal_is_answered_at_the_end_of_the_batch_not_inside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handle_sigint: bool
) -> None:
    """Lightning saves and requeues inside the signal handler, which hangs when the signal lands
    while a logger holds its lock (Lightning #21406): the callback defers that to the batch's end."""
    calls = _fake_scontrol(tmp_path, monkeypatch)
    spy = SpyOnRequeue(step=2, root=tmp_path)
    callback = PreemptionCheckpoint(handle_sigint=handle_sigint)
    trainer = _trainer(tmp_path, [callback, spy], max_steps=5)
    trainer.fit(Regressor())
    assert spy.saved_right_after_the_signal == [], "Lightning's handler ran inside the batch"
    # Saved at the end of the batch that was running: it counts that batch; then training went on.
    assert torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 3
    assert calls.read_text().split() == ["requeue", "4242"]
    assert trainer.global_step == 5
    assert signal.getsignal(signal.SIGUSR1) != callback._on_requeue_signal, "our handler outlived fit"


class RecordSigusr1(Callback):
    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.handler_during_fit = signal.getsignal(signal.SIGUSR1)


def test_without_slurm_the_requeue_signal_is_left_alone(tmp_path: Path) -> None:
    """A user's own SIGUSR1 handler (outside SLURM, SIGUSR1 means whatever the user says) stays in place."""

    def mine(signum: int, frame: Any) -> None:
        pass

    signal.signal(signal.SIGUSR1, mine)
    probe = RecordSigusr1()
    _trainer(tmp_path, [PreemptionCheckpoint(), probe], max_steps=2).fit(Regressor())
    assert probe.handler_during_fit is mine and signal.getsignal(signal.SIGUSR1) is mine
