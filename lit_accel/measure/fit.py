"""Timing ``lit-accel fit`` runs: the overrides of a timed trial, quiet output, per-trial peak memory
and :class:`FitTimer`, the Lightning callback that times training steps with
:class:`lit_accel.core.throughput.StepTimer`.

Used by ``lit-accel tune``, the benchmarks (``python -m tools.bench``) and ``tools/gpu_check.py``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_accel.core.checks import check_int, is_number, require
from lit_accel.core.throughput import StepTimer, peak_memory_mb, release_free_host_memory, reset_peak_memory

__all__ = [
    "NO_CHECKPOINT_ARGS",
    "TRIAL_FIT_ARGS",
    "FitTimer",
    "MemoryWindow",
    "MetricsWriter",
    "batch_samples",
    "fit_in_process_tree",
    "memory_in_use_mb",
    "quiet",
]

# `lit-accel fit` overrides that write no checkpoint: a timed run's figures must not include saving.
NO_CHECKPOINT_ARGS = [
    "--checkpoint.monitor",
    "null",
    "--checkpoint.save_top_k",
    "0",
    "--checkpoint.save_last",
    "false",
    "--step_checkpoint.every_n_train_steps",
    "0",
]

# `lit-accel fit` overrides for a timed trial: no validation, progress bar, summary or checkpoint.
TRIAL_FIT_ARGS = [
    "--trainer.limit_val_batches",
    "0",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    # A logger is needed (the CLI's LearningRateMonitor refuses to run without one): a CSV one in
    # the working folder, whatever the recipe logs to.
    "--trainer.logger",
    "lightning.pytorch.loggers.CSVLogger",
    "--trainer.logger.init_args.save_dir",
    ".",
    *NO_CHECKPOINT_ARGS,
]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep Lightning's per-run banners, warnings and printed output out of a caller's own output."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric", "lit_accel")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def memory_in_use_mb(device: torch.device | str | None = None) -> float:
    """Memory in use now, in MiB: CUDA tensors allocated on a CUDA device, else this process's RSS
    (Linux ``/proc/self/statm``; 0.0 where it cannot be read)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return torch.cuda.memory_allocated(dev) / 2**20 if torch.cuda.is_initialized() else 0.0
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class MemoryWindow:
    """Peak memory of one stretch of work (a trial), above what the process held when it began.

    A process's peak RSS is a high-water mark, and memory an earlier trial left behind (the
    allocator keeps freed pages, caches) would count again in every later trial: the window resets
    the peak (:func:`lit_accel.core.throughput.reset_peak_memory`) and subtracts the memory in use
    at its start, so each trial shows its own figure. Host RSS, or CUDA tensors on a CUDA device.

    Example::

        window = MemoryWindow()
        run_trial()
        print(window.peak_mb())  # MiB the trial added at its peak
    """

    def __init__(self) -> None:
        self.begin()

    def begin(self) -> None:
        """Starts the window now (also done on construction)."""
        gc.collect()  # what the previous trial left unreachable is not this one's
        release_free_host_memory()  # and what it freed is not reused unseen: this trial's growth shows
        self._host = memory_in_use_mb()
        reset_peak_memory()
        self._cuda: dict[torch.device, float] = {}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            dev = torch.device("cuda", torch.cuda.current_device())
            reset_peak_memory(dev)
            self._cuda[dev] = memory_in_use_mb(dev)

    def peak_mb(self, device: torch.device | str | None = None) -> float:
        """MiB above the window's start at the peak, on ``device`` (None: the host)."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda":
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            return max(0.0, peak_memory_mb(dev) - self._cuda.get(dev, 0.0))
        return max(0.0, peak_memory_mb() - self._host)


def batch_samples(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (1 when it has none)."""
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if hasattr(first, "shape") else 1


def _scalar_metrics(trainer: pl.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


class FitTimer(Callback):
    """Training images/s of a fit after ``warmup_steps``, validation excluded, with the data-wait share,
    the trial's peak memory and a validation-accuracy curve.

    Steps are timed by :class:`lit_accel.core.throughput.StepTimer` (CUDA events on a GPU, read once
    at the end). Timing starts at the first batch after ``warmup_steps`` optimizer steps; the fit is
    stopped after ``timed_steps`` more, or once ``budget_seconds`` of timed training have run (every
    rank agrees). Each validation during the fit adds ``(training seconds, global step, val/acc)`` to
    the curve. The memory window (:class:`MemoryWindow`) opens when the timer is built, so the
    data module's and model's memory count: build it just before the trial.

    Args:
        warmup_steps: optimizer steps not timed (first-step costs, compilation).
        timed_steps: optimizer steps timed; None: until the fit ends (or the budget).
        output: rank 0 writes :attr:`result` to this JSON file (for a fit in another process).
        budget_seconds: stop the fit after this many seconds of timed training.

    Result keys (:attr:`result`, empty when the fit ended before ``warmup_steps + timed_steps``):
        ``images_per_sec``, ``data_wait`` (share of step time), ``peak_memory_mb`` (the trial's
        own), ``train_seconds``, ``timed_images``, ``world_size``, ``curve``, ``final_metrics``, and
        ``throughput`` (``ThroughputMeter``'s summary, MFU among it) when the recipe has the meter.

    Raises:
        ValueError: a negative ``warmup_steps``, ``timed_steps`` below 1 or ``budget_seconds`` not positive.

    Example::

        --trainer.callbacks+='{"class_path": "lit_accel.measure.FitTimer",
                               "init_args": {"warmup_steps": 3, "timed_steps": 10, "output": "t.json"}}'
    """

    def __init__(
        self,
        warmup_steps: int = 3,
        timed_steps: int | None = 10,
        output: str | None = None,
        budget_seconds: float | None = None,
    ) -> None:
        check_int("warmup_steps", warmup_steps, 0)
        if timed_steps is not None:
            check_int("timed_steps", timed_steps, 1, "or None")
        require(
            budget_seconds is None or (is_number(budget_seconds) and budget_seconds > 0),
            "budget_seconds",
            budget_seconds,
            "a positive number of seconds or None",
        )
        self.warmup_steps = warmup_steps
        self.timed_steps = timed_steps
        self.output = output
        self.budget_seconds = budget_seconds
        self.result: dict[str, Any] = {}
        self.curve: list[tuple[float, int, float]] = []
        self._memory = MemoryWindow()
        self._timer: StepTimer | None = None
        self._timing = False
        self._done = False
        self._images = 0
        self._steps = 0
        self._wait = 0.0
        self._compute = 0.0

    def _collect(self) -> None:
        assert self._timer is not None
        steps, wait, compute = self._timer.read()
        self._steps += steps
        self._wait += wait
        self._compute += compute

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._timer = StepTimer(trainer.strategy.root_device)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._timer is not None and not self._done and trainer.global_step >= self.warmup_steps:
            self._timing = True
            self._timer.start()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._timer is None or self._done:
            return
        if self._timer.stop():
            self._images += batch_samples(batch) * trainer.world_size
        if self.timed_steps is not None and trainer.global_step >= self.warmup_steps + self.timed_steps:
            self._finish(trainer)
            trainer.should_stop = True
        elif self.budget_seconds is not None and self._timing:
            self._collect()
            # one rank's clock must not stop it alone: the others would wait for it in a collective
            spent = self._wait + self._compute >= self.budget_seconds
            trainer.should_stop = trainer.should_stop or trainer.strategy.reduce_boolean_decision(spent, all=False)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._timer is not None and self._timing and not self._done:
            self._collect()
            self._timer.anchor()  # the validation is not waiting for data
        accuracy = trainer.callback_metrics.get("val/acc")
        if accuracy is not None:
            self.curve.append((round(self._wait + self._compute, 3), trainer.global_step, float(accuracy)))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.timed_steps is None and self._timing and not self._done:
            self._finish(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # ThroughputMeter's summary exists only after every callback's on_train_end
        summaries = [getattr(c, "summary", None) for c in trainer.callbacks]  # type: ignore[attr-defined]
        summary = next((s for s in summaries if isinstance(s, dict) and s), None)
        if stage == "fit" and self.result and summary:
            self.result["throughput"] = dict(summary)
            self._write(trainer)

    def _finish(self, trainer: pl.Trainer) -> None:
        self._collect()
        self._done, self._timing = True, False
        seconds = self._wait + self._compute
        if seconds <= 0:
            return
        self.result = {
            "images_per_sec": self._images / seconds,
            "data_wait": self._wait / seconds,
            "peak_memory_mb": self._memory.peak_mb(trainer.strategy.root_device),
            "train_seconds": seconds,
            "timed_images": self._images,
            "world_size": trainer.world_size,
            "curve": list(self.curve),
            "final_metrics": _scalar_metrics(trainer),
        }
        self._write(trainer)

    def _write(self, trainer: pl.Trainer) -> None:
        if self.output and trainer.is_global_zero:
            with open(self.output, "w") as f:
                json.dump(self.result, f)


def fit_in_process_tree(
    fit_args: list[str], warmup_steps: int, timed_steps: int | None, timeout: float, cwd: str | None = None
) -> dict[str, Any]:
    """``lit-accel fit FIT_ARGS`` as its own process tree (DDP needs one), timed by a :class:`FitTimer`
    that reports through a file; its :attr:`FitTimer.result`.

    Args:
        fit_args: the arguments after ``fit``.
        warmup_steps: see :class:`FitTimer`.
        timed_steps: see :class:`FitTimer`.
        timeout: seconds the process may take.
        cwd: its working folder (default: this process's).

    Raises:
        RuntimeError: the process failed or wrote no timing (its last error line in the message).
        subprocess.TimeoutExpired: it took longer than ``timeout``.
    """
    with tempfile.TemporaryDirectory(prefix="lit-accel-timer-") as folder:
        output = Path(folder) / "timer.json"
        timer = {
            "class_path": "lit_accel.measure.FitTimer",
            "init_args": {"warmup_steps": warmup_steps, "timed_steps": timed_steps, "output": str(output)},
        }
        command = [sys.executable, "-m", "lit_accel", "fit", *fit_args, "--trainer.callbacks+=" + json.dumps(timer)]
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not output.exists():
            lines = done.stderr.strip().splitlines()
            raise RuntimeError(f"exit {done.returncode}: {lines[-1] if lines else 'no timing written'}")
        result: dict[str, Any] = json.loads(output.read_text())
    return result


class MetricsWriter(Callback):
    """Rank 0 writes the scalar metrics of a ``test`` run (``test/acc``, ``test/loss``) to ``output`` as JSON.

    Args:
        output: the JSON file.
    """

    def __init__(self, output: str) -> None:
        self.output = output

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            with open(self.output, "w") as f:
                json.dump(_scalar_metrics(trainer), f)
