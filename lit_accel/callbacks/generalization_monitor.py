"""GeneralizationMonitor: the train/validation gap, a stop when the monitored metric stalls or the
gap grows too wide, and the best validation's weights back at the end (Keras's
``restore_best_weights``). How it works, with its limits: README, "The callbacks". The best weights
are host copies from :mod:`lit_accel.core.snapshot`. Imports lightning, torch and
:mod:`lit_accel.core` only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lit_accel.core.checks import check_int, fmt, is_number
from lit_accel.core.snapshot import host_weights, load_weights
from lit_accel.core.state_keys import identity_state_key

__all__ = [
    "GeneralizationMonitor",
    "epoch_gaps",
    "gap_streak",
    "improved",
    "stop_decision",
    "training_ends_after_epoch",
]


class GeneralizationMonitor(EarlyStopping):
    """Log the generalization gap, stop on a stalled metric or a wide gap, restore the best weights.

    At the end of every validated training epoch it logs ``gap/loss`` and ``gap/acc`` from this
    epoch's training metrics and its latest validation (each averaged over the ranks). After every
    validation the ``monitor`` metric is compared with the best so far; on an improvement (by more
    than ``min_delta``; NaN never improves) the weights that validation saw are copied to host
    memory, and when training ends they are copied back, before ``ModelCheckpoint`` writes the
    final epoch's checkpoints, so ``last.ckpt`` holds them too. The stop (``patience``,
    ``max_gap``) is agreed across ranks. Progress and the best weights are in every checkpoint
    (``torch.load(weights_only=True)``-safe); under FSDP/FSDP2 each rank keeps its own shards and
    the copy stays out of checkpoints. A subclass of ``EarlyStopping`` only for Lightning's hook
    order (none of its logic runs); ``wait_count``, ``stopped_epoch`` and
    ``stopping_reason_message`` stay current, ``best_score`` is a float or None.

    Args:
        monitor: metric whose best value picks the weights (a key of ``trainer.callback_metrics``).
        mode: ``"max"`` if higher is better (accuracy), ``"min"`` if lower is (loss).
        min_delta: an improvement must exceed the best by more than this (absolute, >= 0).
        patience: stop after this many validations in a row without improvement; ``None``: never
            stop for that.
        max_gap: stop when ``gap/loss`` exceeds this (> 0) at ``gap_patience`` validated epochs in
            a row; ``None``: never stop for that.
        gap_patience: validated epochs in a row above ``max_gap`` before stopping (>= 1).
        restore_best_weights: copy the best weights back into the module when training ends.
        strict: raise if ``monitor`` (or, with ``max_gap``, the loss metrics) is missing after a
            validation. Off by default, so the callback can sit in a config whose model logs other
            names; a warning is given once per fit instead, and nothing is tracked or restored.
        train_loss_key: training loss metric for ``gap/loss``.
        val_loss_key: validation loss metric for ``gap/loss``.
        train_acc_key: training accuracy metric for ``gap/acc``.
        val_acc_key: validation accuracy metric for ``gap/acc``.

    Logged keys (through ``LightningModule.log`` at the end of each validated epoch, so also in
    ``trainer.callback_metrics`` and usable as a ``ModelCheckpoint`` monitor; step = the step at
    which Lightning logs that epoch's ``val/*`` and epoch-level ``train/*`` metrics, the epoch's
    last optimizer step, ``global_step - 1``; an ``epoch`` value goes with them):
        ``gap/loss``: ``val_loss_key`` minus ``train_loss_key`` (positive: validation loss higher).
        ``gap/acc``: ``train_acc_key`` minus ``val_acc_key`` (positive: training accuracy higher).
        ``gap/best_epoch``: the epoch of the best ``monitor`` value so far (once there is one).

    Raises:
        ValueError: an argument is out of range.
        RuntimeError: with ``strict=True``, a metric it needs was not logged by a validation; the
            message names it and lists the logged metrics.

    Example::

        trainer:
          callbacks:
            - class_path: lit_accel.callbacks.GeneralizationMonitor
              init_args:
                monitor: val/acc
                mode: max
                patience: 5
                max_gap: 0.5
                gap_patience: 3
                restore_best_weights: true
    """

    # Progress saved in checkpoints: set by _reset_progress and load_state_dict.
    best_score: float | None  # type: ignore[assignment]  # a float, None before a score: EarlyStopping's is a tensor
    best_epoch: int | None
    best_step: int | None
    _best_weights: dict[str, Tensor] | None

    def __init__(
        self,
        monitor: str = "val/acc",
        mode: Literal["min", "max"] = "max",
        min_delta: float = 0.0,
        patience: int | None = None,
        max_gap: float | None = None,
        # 3 as EarlyStopping's default patience: one noisy epoch above max_gap is not a trend.
        gap_patience: int = 3,
        restore_best_weights: bool = True,
        strict: bool = False,
        train_loss_key: str = "train/loss",
        val_loss_key: str = "val/loss",
        train_acc_key: str = "train/acc",
        val_acc_key: str = "val/acc",
    ) -> None:
        _check_name("monitor", monitor)
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r} is not allowed: use 'min' or 'max'")
        if not (is_number(min_delta) and min_delta >= 0):
            raise ValueError(f"min_delta={min_delta!r} is not allowed: use a finite number >= 0")
        if patience is not None:
            check_int("patience", patience, 1, "or None (never stop for lack of improvement)")
        if max_gap is not None and not (is_number(max_gap) and max_gap > 0):
            raise ValueError(f"max_gap={max_gap!r} is not allowed: use a finite number > 0, or None (off)")
        check_int("gap_patience", gap_patience, 1)
        for name, flag in (("restore_best_weights", restore_best_weights), ("strict", strict)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name}={flag!r} is not allowed: use true or false")
        keys = {
            "train_loss_key": train_loss_key,
            "val_loss_key": val_loss_key,
            "train_acc_key": train_acc_key,
            "val_acc_key": val_acc_key,
        }
        for name, key in keys.items():
            _check_name(name, key)
        # EarlyStopping's attributes, for code that reads them from trainer.early_stopping_callback;
        # patience, min_delta and best_score are then set the way this class uses them.
        super().__init__(monitor=monitor, mode=mode, strict=strict, check_on_train_epoch_end=True)
        self.patience = patience  # type: ignore[assignment]  # None: EarlyStopping's is an int
        self.min_delta = float(min_delta)
        self.max_gap = None if max_gap is None else float(max_gap)
        self.gap_patience = gap_patience
        self.restore_best_weights = restore_best_weights
        self.train_loss_key = train_loss_key
        self.val_loss_key = val_loss_key
        self.train_acc_key = train_acc_key
        self.val_acc_key = val_acc_key
        self._sharded = False
        self._reset_progress()
        self._reset_run_state()

    # ------------------------------------------------------------------ state

    @property
    @override
    def state_key(self) -> str:
        return identity_state_key(type(self).__qualname__, monitor=self.monitor, mode=self.mode)

    @property
    def best_weights(self) -> dict[str, Tensor] | None:
        """Host copy of the parameters and buffers at the best validation (None before one)."""
        return self._best_weights

    @override
    def state_dict(self) -> dict[str, Any]:
        # Plain types and tensors only: checkpoints must load with torch.load(weights_only=True).
        state: dict[str, Any] = {
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "wait_count": self.wait_count,
            "gap_count": self.gap_count,
            "stopped_epoch": self.stopped_epoch,
        }
        if self._best_weights is not None and not self._sharded:
            state["best_weights"] = self._best_weights
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = _optional(float, state_dict.get("best_score"))
        self.best_epoch = _optional(int, state_dict.get("best_epoch"))
        self.best_step = _optional(int, state_dict.get("best_step"))
        self.wait_count = int(state_dict.get("wait_count", 0))
        self.gap_count = int(state_dict.get("gap_count", 0))
        self.stopped_epoch = int(state_dict.get("stopped_epoch", 0))
        weights = state_dict.get("best_weights")
        self._best_weights = None if weights is None else {k: v.to("cpu") for k, v in weights.items()}

    def _reset_progress(self) -> None:
        # Progress (saved in checkpoints).
        self.best_score = None
        self.best_epoch = None
        self.best_step = None
        self.wait_count = 0
        self.gap_count = 0
        self.stopped_epoch = 0
        self.stopping_reason_message: str | None = None
        self._best_weights = None

    def _reset_run_state(self) -> None:
        # One fit only.
        self._validated = False  # a validation ran since the last training epoch end
        self._last_score: float | None = None
        self._restored_at: int | None = None  # global step of the last restore
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        # A new fit starts from scratch; with ckpt_path, Lightning loads the saved progress after this.
        self._reset_progress()
        self._reset_run_state()
        self._sharded = isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _not_training(trainer):
            return
        self._validated = True
        score = _reduced_metrics(trainer, [self.monitor]).get(self.monitor)
        if score is None:
            self._missing(trainer, "monitor", [self.monitor])
            return
        self._last_score = score
        if improved(score, self.best_score, self.mode, self.min_delta):
            self.best_score, self.best_epoch, self.best_step = score, trainer.current_epoch, trainer.global_step
            self.wait_count = 0
            if self.restore_best_weights:
                # New tensors every time: a checkpoint being written may still hold the old ones.
                self._best_weights = host_weights(pl_module)
        else:
            self.wait_count += 1

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after LightningModule.on_train_epoch_end and before ModelCheckpoint (see the class doc).
        if _not_training(trainer):
            return
        if self._validated:
            self._validated = False
            self._check_epoch(trainer, pl_module)
        if self.restore_best_weights and training_ends_after_epoch(
            epoch=trainer.current_epoch,
            global_step=trainer.global_step,
            should_stop=trainer.should_stop,
            max_epochs=trainer.fit_loop.max_epochs,
            max_steps=trainer.fit_loop.max_steps,
            min_epochs=trainer.fit_loop.min_epochs,
            min_steps=trainer.fit_loop.min_steps,
        ):
            self._restore(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.restore_best_weights and not trainer.fast_dev_run:  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
            self._restore(trainer, pl_module)  # a no-op if on_train_epoch_end already did it at this step

    # ------------------------------------------------------------------ actions

    def _check_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        keys = (self.train_loss_key, self.val_loss_key, self.train_acc_key, self.val_acc_key)
        gaps = epoch_gaps(_reduced_metrics(trainer, keys), *keys)
        for name, value in gaps.items():
            # Already equal on every rank; sync_dist only spares Lightning's "use sync_dist" warning.
            pl_module.log(name, value, sync_dist=True)
        if self.best_epoch is not None:
            pl_module.log("gap/best_epoch", float(self.best_epoch), sync_dist=True)
        if self.max_gap is not None:
            if "gap/loss" not in gaps:
                self._missing(trainer, "max_gap", [self.train_loss_key, self.val_loss_key])
            self.gap_count = gap_streak(gaps.get("gap/loss"), self.max_gap, self.gap_count)
        should_stop, reason = stop_decision(
            monitor=self.monitor,
            best_score=self.best_score,
            best_epoch=self.best_epoch,
            wait_count=self.wait_count,
            patience=self.patience,
            gap=gaps.get("gap/loss"),
            gap_count=self.gap_count,
            max_gap=self.max_gap,
            gap_patience=self.gap_patience,
        )
        # The inputs are reduced already, so the ranks agree; a decision to stop is still made one.
        if trainer.strategy.reduce_boolean_decision(should_stop, all=False):
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = reason or "another rank decided to stop"
            rank_zero_info(
                f"GeneralizationMonitor: stopping after epoch {trainer.current_epoch}: {self.stopping_reason_message}"
            )

    def _restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored_at == trainer.global_step or self.best_epoch is None:
            return
        self._restored_at = trainer.global_step
        where = f"epoch {self.best_epoch} (step {self.best_step}, {self.monitor}={fmt(self.best_score)})"
        if self._best_weights is None:
            rank_zero_warn(
                f"GeneralizationMonitor: the best weights, from {where}, predate the checkpoint this run "
                "resumed from and are not in it (sharded strategies leave them out): keeping the final "
                "weights. The best checkpoint of a ModelCheckpoint(monitor=...) has them."
            )
            return
        problem = load_weights(pl_module, self._best_weights)
        if problem:
            rank_zero_warn(
                f"GeneralizationMonitor: cannot restore the weights of {where}: {problem}; keeping the final weights"
            )
            return
        last = "" if self._last_score is None else f"; the last validation had {self.monitor}={fmt(self._last_score)}"
        rank_zero_info(f"GeneralizationMonitor: restored the weights of {where}, the best of this run{last}")

    def _missing(self, trainer: pl.Trainer, what: str, names: list[str]) -> None:
        absent = [n for n in names if n not in trainer.callback_metrics]
        settings = {"monitor": "monitor (and mode)", "max_gap": "train_loss_key/val_loss_key"}[what]
        message = (
            f"GeneralizationMonitor: {what} needs the metric(s) {absent} but the validation at epoch "
            f"{trainer.current_epoch} left only {sorted(trainer.callback_metrics)} in trainer.callback_metrics. "
            f"Set {settings} to logged names, or log them with self.log."
        )
        if self.strict:
            raise RuntimeError(message)
        if what not in self._warned:
            self._warned.add(what)
            effect = {
                "monitor": "the best weights are neither tracked nor restored",
                "max_gap": "max_gap cannot stop training",
            }[what]
            rank_zero_warn(f"{message} Until then {effect} (strict=true makes this an error).")


# ---------------------------------------------------------------------- decisions (pure)


def improved(score: float, best: float | None, mode: str, min_delta: float) -> bool:
    """Whether ``score`` beats ``best`` by more than ``min_delta``; NaN never does."""
    if math.isnan(score):
        return False
    if best is None:
        return True
    return score - min_delta > best if mode == "max" else score + min_delta < best


def epoch_gaps(
    metrics: Mapping[str, float], train_loss: str, val_loss: str, train_acc: str, val_acc: str
) -> dict[str, float]:
    """``gap/loss`` and ``gap/acc`` from the metrics that are there."""
    gaps = {}
    if train_loss in metrics and val_loss in metrics:
        gaps["gap/loss"] = metrics[val_loss] - metrics[train_loss]
    if train_acc in metrics and val_acc in metrics:
        gaps["gap/acc"] = metrics[train_acc] - metrics[val_acc]
    return gaps


def gap_streak(gap: float | None, max_gap: float, streak: int) -> int:
    """Validated epochs in a row with ``gap/loss > max_gap`` (an epoch without the gap ends a streak)."""
    return streak + 1 if gap is not None and gap > max_gap else 0


def stop_decision(
    *,
    monitor: str,
    best_score: float | None,
    best_epoch: int | None,
    wait_count: int,
    patience: int | None,
    gap: float | None,
    gap_count: int,
    max_gap: float | None,
    gap_patience: int,
) -> tuple[bool, str]:
    """``(should_stop, reason)`` from the counters."""
    if patience is not None and wait_count >= patience:
        return True, (
            f"{monitor} did not improve at the last {wait_count} validations (patience={patience}; best "
            f"{fmt(best_score)} at epoch {best_epoch})"
        )
    if max_gap is not None and gap_count >= gap_patience:
        return True, (
            f"gap/loss={fmt(gap)} was above max_gap={max_gap:g} at the last {gap_count} validated epochs "
            f"(gap_patience={gap_patience})"
        )
    return False, ""


def training_ends_after_epoch(
    *,
    epoch: int,
    global_step: int,
    should_stop: bool,
    max_epochs: int | None,
    max_steps: int,
    min_epochs: int | None,
    min_steps: int | None,
) -> bool:
    """Whether the fit loop ends after this epoch, by Lightning's rules (``FitLoop.done``).

    A stop request counts only once ``min_epochs``/``min_steps`` are met; ``-1`` means no limit.
    """
    if max_steps != -1 and global_step >= max_steps:
        return True
    if max_epochs is not None and max_epochs != -1 and epoch + 1 >= max_epochs:
        return True
    if not should_stop:
        return False
    return (not min_epochs or epoch + 1 >= min_epochs) and (not min_steps or global_step >= min_steps)


# ---------------------------------------------------------------------- ranks


def _not_training(trainer: pl.Trainer) -> bool:
    return trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or bool(trainer.fast_dev_run)  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared


def _reduced_metrics(trainer: pl.Trainer, names: Iterable[str]) -> dict[str, float]:
    """The mean over the ranks that have it of each metric in ``names`` that some rank has.

    One all-reduce for all names, which every rank joins even if it lacks some of them.
    """
    names = list(names)
    metrics = trainer.callback_metrics
    pairs = [(float(metrics[n]), 1.0) if n in metrics else (0.0, 0.0) for n in names]
    if trainer.world_size > 1:
        vec = torch.tensor(pairs, dtype=torch.float64, device=trainer.strategy.root_device)
        pairs = trainer.strategy.reduce(vec, reduce_op="sum").tolist()
    return {name: total / count for name, (total, count) in zip(names, pairs) if count > 0}


# ---------------------------------------------------------------------- arguments


def _check_name(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}={value!r} is not allowed: use a metric name (a non-empty string)")


def _optional(kind: type, value: Any) -> Any:
    return None if value is None else kind(value)
