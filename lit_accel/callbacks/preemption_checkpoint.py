"""Checkpoint on SIGTERM (a scheduler's preemption notice) and Ctrl-C, then stop."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["PreemptionCheckpoint"]

log = logging.getLogger(__name__)


class PreemptionCheckpoint(Callback):
    """On SIGTERM or Ctrl-C: finish the current batch, save a resumable checkpoint, stop.

    Lightning already turns SIGTERM into a stop at the next batch boundary (agreed across ranks: rank
    0's signal is broadcast) by raising ``SIGTERMException``; this callback saves the checkpoint at
    that moment, where the model, optimizer, scheduler and loop progress are consistent. The first
    Ctrl-C (SIGINT) is handled the same way, by sending the process a SIGTERM; a second Ctrl-C
    interrupts at once. The file is written as ``<checkpoint dir>/<filename>.ckpt``, by default
    ``last.ckpt`` next to ModelCheckpoint's, so ``--ckpt_path last`` resumes from it. Unlike
    Lightning's ``OnExceptionCheckpoint``, other exceptions (a crash inside a step, whose state may
    be half-updated) save nothing, and the file is not deleted at the end.

    Args:
        filename: checkpoint file name without ``.ckpt``.
        handle_sigint: treat the first Ctrl-C like SIGTERM.

    Logged metrics: none.

    Raises:
        ValueError: if ``filename`` is empty or contains a path separator.

    Example::

        trainer:
          callbacks:
            - class_path: lit_accel.callbacks.PreemptionCheckpoint
    """

    def __init__(self, filename: str = "last", handle_sigint: bool = True) -> None:
        if not filename or os.sep in filename:
            raise ValueError(f"filename={filename!r} is not allowed: use a plain file name without '{os.sep}'")
        self.filename = filename
        self.handle_sigint = handle_sigint
        self.saved_path: str | None = None
        self._previous_sigint: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.handle_sigint or threading.current_thread() is not threading.main_thread():
            return
        self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        # The next Ctrl-C gets the previous handler (Python's: KeyboardInterrupt).
        signal.signal(signal.SIGINT, self._previous_sigint or signal.default_int_handler)
        self._previous_sigint = None
        log.warning("Ctrl-C: stopping after this batch and saving a checkpoint (press Ctrl-C again to abort now)")
        os.kill(os.getpid(), signal.SIGTERM)

    def checkpoint_path(self, trainer: pl.Trainer) -> str:
        """Where the checkpoint goes: the ModelCheckpoint's folder, else the default root dir."""
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(folder, f"{self.filename}.ckpt")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        # Every rank gets here together (Lightning broadcasts the signal), as save_checkpoint needs.
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = path
        rank_zero_info(
            f"Stopped by SIGTERM/Ctrl-C at epoch {trainer.current_epoch}, step {trainer.global_step}; "
            f"checkpoint saved to {path}. Resume with the same command and --ckpt_path last."
        )
