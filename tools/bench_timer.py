"""StepTimer: the Lightning side's clock for tools/bench.py (kept apart so subprocesses import it)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lit_accel._measure import peak_rss_mb, reset_peak_rss

__all__ = ["MetricsWriter", "StepTimer", "peak_rss_mb", "reset_peak_rss"]  # the memory helpers: re-exported


def _scalar_metrics(trainer: pl.Trainer) -> dict[str, float]:
    return {key: float(value) for key, value in trainer.callback_metrics.items() if value.numel() == 1}


class MetricsWriter(Callback):
    """Rank 0 writes the metrics of a ``test`` run (``test/acc``, ``test/loss``) to ``output`` as JSON."""

    def __init__(self, output: str) -> None:
        self.output = output

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            with open(self.output, "w") as f:
                json.dump(_scalar_metrics(trainer), f)


class StepTimer(Callback):
    """Training images/s after ``warmup_steps``, excluding validation, plus the data-wait share.

    Time runs from the end of optimizer step ``warmup_steps`` to the end of the fit (or of step
    ``warmup_steps + timed_steps``); validation intervals are left out. Data wait is the time from
    one training batch's end to the next one's start. The device is synchronized only at the ends
    of the timed span and around validation. With ``output`` set, rank 0 writes the result as JSON.

    With ``budget_seconds`` set, training stops once that much timed training (validation left
    out) has run on any rank. Each validation during the fit adds ``(training seconds, global step,
    val/acc)`` to ``curve``, copied into ``result["curve"]`` when the timing ends: accuracy against
    training time, for time-to-accuracy comparisons.
    """

    def __init__(
        self,
        warmup_steps: int = 5,
        timed_steps: int | None = None,
        output: str | None = None,
        budget_seconds: float | None = None,
    ) -> None:
        self.warmup_steps = warmup_steps
        self.timed_steps = timed_steps
        self.output = output
        if budget_seconds is not None and budget_seconds <= 0:
            raise ValueError(
                f"budget_seconds={budget_seconds!r} is not allowed: use a positive number of seconds or None"
            )
        self.budget_seconds = budget_seconds
        self.curve: list[tuple[float, int, float]] = []
        self.result: dict[str, Any] = {}
        self._timing = False
        self._mark = 0.0
        self._batch_start = 0.0
        self._elapsed = 0.0
        self._wait = 0.0
        self._images = 0

    def _sync(self, trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
        reset_peak_rss()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._timing:
            now = time.perf_counter()
            self._wait += now - self._mark
            self._batch_start = now

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._timing:
            if step >= self.warmup_steps and not self.result:
                self._sync(trainer)
                self._timing, self._mark = True, time.perf_counter()
            return
        now = time.perf_counter()
        self._elapsed += now - self._mark
        self._mark = now
        self._images += int(batch[1].shape[0]) if isinstance(batch, (tuple, list)) else 0
        if self.timed_steps is not None and step >= self.warmup_steps + self.timed_steps:
            self._finish(trainer)
        elif self.budget_seconds is not None:
            # one rank's clock must not stop it alone: the others would wait for it in a collective
            spent = trainer.strategy.reduce_boolean_decision(self._elapsed >= self.budget_seconds, all=False)
            trainer.should_stop = trainer.should_stop or spent

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._timing:
            self._sync(trainer)
            self._elapsed += time.perf_counter() - self._mark

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        accuracy = trainer.callback_metrics.get("val/acc")
        if accuracy is not None:
            self.curve.append((round(self._elapsed, 3), trainer.global_step, float(accuracy)))
        if self._timing:
            self._sync(trainer)
            self._mark = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._timing:
            self._finish(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Adds ThroughputMeter's summary of the run (MFU among it), when the recipe has the meter:
        its figures exist only after every callback's ``on_train_end``."""
        from lit_accel.callbacks import ThroughputMeter

        meters = [c for c in trainer.callbacks if isinstance(c, ThroughputMeter)]  # type: ignore[attr-defined]
        if stage != "fit" or not self.result or not meters or not meters[0].summary:
            return
        self.result["throughput"] = dict(meters[0].summary)
        if self.output and trainer.is_global_zero:
            with open(self.output, "w") as f:
                json.dump({k: v for k, v in self.result.items() if k != "pid"}, f)

    def _finish(self, trainer: pl.Trainer) -> None:
        self._sync(trainer)
        self._elapsed += time.perf_counter() - self._mark
        self._timing = False
        world = trainer.world_size
        device = trainer.strategy.root_device
        memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
        self.result = {
            "images_per_sec": world * self._images / self._elapsed if self._elapsed > 0 else float("nan"),
            "data_wait_fraction": self._wait / self._elapsed if self._elapsed > 0 else float("nan"),
            "timed_images": world * self._images,
            "peak_memory_mb": memory,
            "world_size": world,
            "train_seconds": self._elapsed,
            "curve": list(self.curve),
            "final_metrics": _scalar_metrics(trainer),
        }
        if self.output and trainer.is_global_zero:
            with open(self.output, "w") as f:
                json.dump(self.result, f)
        # keep the pid out of results; useful when a subprocess is debugged by hand
        self.result["pid"] = os.getpid()
