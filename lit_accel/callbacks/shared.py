"""What lit_accel's callbacks share on the Lightning side: the run-settings error and the batch-size protocol.

:class:`BatchSizeListener` (DynamicBatchLR tells other callbacks the batch size changed). The
Trainer-free pieces (argument checks, the LR rescaler, state keys) live in :mod:`lit_accel.core`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["BatchSizeListener", "RunSettingsError", "notify_batch_size_changed"]


class RunSettingsError(MisconfigurationException, ValueError):
    """A callback setting that does not fit the run, found when training starts (the run's length,
    its batch, its strategy). A ``ValueError`` for Python callers; a ``MisconfigurationException``
    so that ``lit-accel`` (and any LightningCLI front end that reports those) prints one message
    and exits with status 2 instead of a traceback."""


@runtime_checkable
class BatchSizeListener(Protocol):
    """A callback that wants to know when DynamicBatchLR changed the per-device batch size.

    ``on_batch_size_changed`` runs before the first batch of the new size (ThroughputMeter counts
    the FLOPs of a batch again and restarts its warm-up).
    """

    def on_batch_size_changed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_size: int) -> None: ...


def notify_batch_size_changed(
    trainer: pl.Trainer, pl_module: pl.LightningModule, batch_size: int, exclude: object = None
) -> None:
    """Call ``on_batch_size_changed`` on every :class:`BatchSizeListener` among the trainer's callbacks."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning's callback connector
        if callback is not exclude and isinstance(callback, BatchSizeListener):
            callback.on_batch_size_changed(trainer, pl_module, batch_size)
