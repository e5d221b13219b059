"""Checkpoint on SIGTERM (preemption) and Ctrl-C, then stop; answer SLURM's requeue signal at a batch's end."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

__all__ = ["PreemptionCheckpoint"]

log = logging.getLogger(__name__)

# Under DDP the ranks agree on the requeue batch with a collective (and, on a GPU, a host sync):
# asked at every 10th batch only, to keep it off most steps. SLURM signals well ahead of the kill
# (`--signal=USR1@90`: 90 s), and 10 batches take seconds.
_REQUEUE_AGREE_EVERY = 10


class PreemptionCheckpoint(Callback):
    """On SIGTERM or Ctrl-C: finish the current batch, save a resumable checkpoint, stop.

    Lightning already turns SIGTERM into a stop at the end of the current training batch by
    raising ``SIGTERMException``; this callback saves the checkpoint at that moment (in
    ``on_exception``), where the model, optimizer, scheduler and loop progress are consistent:
    the checkpoint's ``global_step`` counts the batch that was running when the signal came, and
    a run resumed from it continues with the next batch. The first Ctrl-C (SIGINT) is handled the
    same way, by sending the process a SIGTERM; a second Ctrl-C interrupts at once, without a
    checkpoint. The file is written as ``<checkpoint dir>/<filename>.ckpt`` (the
    ``ModelCheckpoint``'s ``dirpath``, else ``<default_root_dir>/checkpoints``), by default
    ``last.ckpt`` next to ModelCheckpoint's, so ``--ckpt_path last`` resumes from it. Unlike
    Lightning's ``OnExceptionCheckpoint``, other exceptions (a crash inside a step, whose state may
    be half-updated) save nothing, nothing is saved when the signal comes during
    ``validate``/``test``/``predict`` (a ``last.ckpt`` of the training run is not overwritten), and
    the file is not deleted at the end.

    The Ctrl-C handler is installed at ``on_train_start`` of ``fit`` (main thread only; a Ctrl-C
    before that, e.g. during data set-up or the sanity check, interrupts as usual) and the previous
    handler is put back in ``teardown`` and, because Lightning does not call ``teardown`` hooks
    when ``fit`` ends with an exception, in ``on_exception`` too. Installing it after Lightning
    has saved the process's handlers (just before the training loop) also lets Lightning's own
    clean-up restore the original one.

    SLURM auto-requeue: Lightning answers SLURM's requeue signal (``SIGUSR1`` unless the
    ``SLURMEnvironment`` names another) from inside the signal handler: it closes the loggers,
    saves ``hpc_ckpt_<n>.ckpt`` and runs ``scontrol requeue``. A handler runs between any two
    bytecodes of the main thread, so when the signal lands while a logger holds its lock (a
    TensorBoard write), closing that logger waits for the lock forever and the job hangs until
    SLURM kills it, without the checkpoint (Lightning issue #21406). From ``on_train_start`` of
    ``fit`` on, this callback puts its own handler in front of Lightning's: the signal only sets
    a flag, and Lightning's handler runs at the end of the current training or validation batch,
    where no lock is held and the state is consistent; under DDP the ranks agree on a batch
    (any rank's flag) at every 10th batch, one small all-reduce each time, since saving is
    collective. A signal that comes after the last batch asks
    for nothing: the run is over.

    Limitation (distributed): Lightning broadcasts rank 0's SIGTERM flag at the start of every
    training batch, but at the end of a batch each rank raises ``SIGTERMException`` from its own
    flag. When a signal reaches the ranks during different batches, they could stop at different
    steps, and ``save_checkpoint`` (a collective) would then hang. Cluster schedulers (SLURM,
    Kubernetes) and Ctrl-C in a terminal signal all processes of the job at once, which is the
    supported case; do not signal a single rank by hand.

    Args:
        filename: checkpoint file name, without ``.ckpt`` and without a folder.
        handle_sigint: treat the first Ctrl-C like SIGTERM (``False`` leaves Ctrl-C to Lightning,
            which stops at once without a checkpoint).

    Logged metrics: none. One info line on rank 0 names the step and the file.

    Raises:
        ValueError: if ``filename`` is not a non-empty string, contains a path separator or ends
            with ``.ckpt``, or ``handle_sigint`` is not a bool.

    Example::

        trainer:
          callbacks:
            - class_path: lit_accel.callbacks.PreemptionCheckpoint
              init_args:
                filename: last
                handle_sigint: true
    """

    def __init__(self, filename: str = "last", handle_sigint: bool = True) -> None:
        super().__init__()
        separators = [sep for sep in (os.sep, os.altsep, "/") if sep]
        if not isinstance(filename, str) or not filename.strip() or any(sep in filename for sep in separators):
            raise ValueError(f"filename={filename!r} is not allowed: use a plain file name such as 'last', without '/'")
        if filename.endswith(".ckpt"):
            raise ValueError(f"filename={filename!r} is not allowed: leave out '.ckpt' (it is added), e.g. 'last'")
        if not isinstance(handle_sigint, bool):
            raise ValueError(f"handle_sigint={handle_sigint!r} is not allowed: use true or false")
        self.filename = filename
        self.handle_sigint = handle_sigint
        self.saved_path: str | None = None
        self._installed = False  # our SIGINT handler is in place and _previous_sigint is to be restored
        self._previous_sigint: Any = None
        self._requeue_signal: int | None = None  # set while our requeue handler is in place
        self._requeue_handler: Any = None  # Lightning's, run at the end of a batch
        self._requeue_requested = False
        self._requeue_checks = 0  # batches since the handler went in: the same count on every rank

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not in setup(): Lightning saves every signal handler after setup and puts them back when
        # fit ends, also after an exception, when no teardown hook runs; ours would come back.
        if threading.current_thread() is not threading.main_thread():
            return
        if self.handle_sigint and not self._installed:
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True
        self._defer_requeue_signal(trainer)  # whatever handle_sigint says: it concerns Ctrl-C only

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._answer_requeue_signal(trainer)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._answer_requeue_signal(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_sigint()
        self._restore_requeue_handler()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()  # no teardown hook follows an exception
        self._restore_requeue_handler()
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        # Every rank gets here at the same batch when the signal reached all ranks together (see
        # the class docstring), as save_checkpoint needs. A Ctrl-C now would leave a half-written
        # last.ckpt, the run's only way back: it waits until the file is complete.
        path = self.checkpoint_path(trainer)
        with _ctrl_c_waits():
            # A full checkpoint (optimizer, loops, callbacks) to resume from. Saying so keeps
            # Lightning from logging "`weights_only` was not set, defaulting to `False`", which
            # reads like a security warning and concerns saving, not loading.
            trainer.save_checkpoint(path, weights_only=False)
        self.saved_path = path
        rank_zero_info(
            f"Stopped by SIGTERM/Ctrl-C at epoch {trainer.current_epoch}, step {trainer.global_step}; "
            f"checkpoint saved to {path}. Resume with the same command and --ckpt_path last."
        )

    def checkpoint_path(self, trainer: pl.Trainer) -> str:
        """Where the checkpoint goes: the ModelCheckpoint's folder, else ``<default_root_dir>/checkpoints``."""
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(folder, f"{self.filename}.ckpt")

    def _defer_requeue_signal(self, trainer: pl.Trainer) -> None:
        """Put ``_on_requeue_signal`` in front of the handler Lightning installed for SLURM's requeue signal."""
        if self._requeue_signal is not None or threading.current_thread() is not threading.main_thread():
            return
        environment = trainer._accelerator_connector.cluster_environment  # listed in lit_accel/lightning_compat.py
        if not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
            return
        signum = environment.requeue_signal or signal.SIGUSR1
        handler = signal.getsignal(signum)
        if not callable(handler):  # SIG_DFL/SIG_IGN: Lightning installed nothing (another handler was there)
            return
        self._requeue_handler = handler
        self._requeue_requested = False
        self._requeue_checks = 0
        signal.signal(signum, self._on_requeue_signal)
        self._requeue_signal = signum

    def _on_requeue_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: anything more (I/O, locks) is unsafe between two arbitrary bytecodes.
        self._requeue_requested = True

    def _answer_requeue_signal(self, trainer: pl.Trainer) -> None:
        if self._requeue_signal is None:
            return
        requested = self._requeue_requested
        if trainer.world_size > 1:  # all ranks save together (a collective), at the same batch
            self._requeue_checks += 1
            if self._requeue_checks % _REQUEUE_AGREE_EVERY != 0:
                return
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        self._requeue_requested = False
        log.info("SLURM requeue signal: saving the hpc checkpoint and requeueing at the end of this batch")
        self._requeue_handler(self._requeue_signal, None)

    def _restore_requeue_handler(self) -> None:
        signum = self._requeue_signal
        if signum is None:
            return
        # Only our own: Lightning's teardown may already have put the process's original back.
        if signal.getsignal(signum) == self._on_requeue_signal:
            signal.signal(signum, self._requeue_handler)
        self._requeue_signal = None
        self._requeue_handler = None
        self._requeue_requested = False

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        # The next Ctrl-C gets the previous handler (Python's: KeyboardInterrupt, which Lightning
        # turns into a shutdown without a checkpoint, exit status 1).
        self._restore_sigint()
        log.warning("Ctrl-C: stopping after this batch and saving a checkpoint (press Ctrl-C again to abort now)")
        os.kill(os.getpid(), signal.SIGTERM)

    def _restore_sigint(self) -> None:
        if not self._installed:
            return
        previous = self._previous_sigint
        # None: the previous handler was not installed from Python; Python's own is the closest.
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        self._installed = False
        self._previous_sigint = None


@contextlib.contextmanager
def _ctrl_c_waits() -> Iterator[None]:
    """Inside, a Ctrl-C only says to wait (main thread only; elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def wait(signum: int, frame: FrameType | None) -> None:
        log.warning("Ctrl-C: the checkpoint is being written and will be complete in a moment")

    previous = signal.signal(signal.SIGINT, wait)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
