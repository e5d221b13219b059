"""Callbacks that inject faults into a real run; tests load them by class path (tests/ on PYTHONPATH)."""

from __future__ import annotations

import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


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
