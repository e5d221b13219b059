"""Grow the batch or lower the learning rate mid-fit, from a plateau or from a table.

Sources: Smith, Kindermans, Ying & Le 2017, "Don't decay the learning rate, increase the batch
size" (growing the batch by k at a fixed LR acts like dividing the LR by k: the SGD noise scale is
about ``lr / batch``); Goyal et al. 2017, "Accurate, large minibatch SGD" (linear LR scaling and
warm-up); Malladi et al. 2022, "On the SDEs and scaling rules for adaptive gradient algorithms"
(square-root scaling for Adam-type optimizers). Plateau logic as in torch's ``ReduceLROnPlateau``
and Lightning's ``EarlyStopping``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr, lightning_setattr
from typing_extensions import override

from lit_accel.callbacks.shared import RunSettingsError, notify_batch_size_changed
from lit_accel.core.checks import is_int, is_number, require
from lit_accel.core.lr_scaling import DYNAMIC_LR_SCALE_KEY, scale_learning_rates
from lit_accel.core.state_keys import adopt_older_state, identity_state_key

__all__ = ["DynamicBatchLR"]

log = logging.getLogger(__name__)

Policy = Literal["lr", "batch", "batch_then_lr", "none"]
LRScaling = Literal["none", "linear", "sqrt"]

_POLICIES = ("lr", "batch", "batch_then_lr", "none")
_SCALINGS = ("none", "linear", "sqrt")
# Learning-rate-valued entries that torch schedulers keep in each param group (OneCycleLR keeps
# max_lr/min_lr there; every LRScheduler keeps initial_lr).


class DynamicBatchLR(Callback):
    """Lower the learning rate or grow the batch when a metric plateaus, or follow per-epoch tables.

    **Plateau mode** (``policy`` other than ``"none"``): at the end of every training epoch (after
    that epoch's validation) the ``monitor`` metric is compared with the best so far. On the
    ``patience``-th consecutive epoch without an improvement of more than ``min_delta`` the policy
    acts, then ``cooldown`` epochs are ignored:

    * ``"lr"``: multiply the learning rate by ``lr_factor``, never below ``min_lr``;
    * ``"batch"``: multiply the batch by ``batch_factor`` up to the maxima;
    * ``"batch_then_lr"``: grow the batch until a maximum is reached, then decay the learning rate.

    If validation is configured but did not run in an epoch (``check_val_every_n_epoch > 1``),
    that epoch is not counted. A metric logged in ``LightningModule.on_train_epoch_end`` is seen one
    epoch late (Lightning calls that hook after this callback's). Under DDP/FSDP the metric is
    averaged over the ranks, rank 0 decides and broadcasts its decision, so every rank changes the
    same thing at the same step.

    **Schedule mode**: ``batch_size_schedule`` ``{epoch: batch_size}`` sets the per-device samples
    per optimizer step from that epoch on; ``lr_schedule`` ``{epoch: factor}`` multiplies the
    learning rate by ``factor`` from that epoch on (not cumulative: ``{0: 1.0, 30: 0.1, 60: 0.01}``).
    ``lr_schedule`` combines with any policy; ``batch_size_schedule`` with ``"lr"`` or ``"none"``.
    Table values are applied as given (``max_effective_batch_size`` does not cap them).

    **Progress mode**: ``batch_size_progress`` ``{fraction of the run: batch_size}`` grows the batch
    at fixed points of the run, whatever its length: ``{0.4: 512}`` in a 5-epoch run is
    ``batch_size_schedule: {2: 512}``, in a 10-epoch run ``{4: 512}`` (the first epoch that starts
    at or after that fraction of ``trainer.max_epochs``). It grows the batch whether or not the
    monitored metric improves, so it also acts under a learning-rate schedule that keeps the
    metric improving (where a plateau rarely comes). It pays only where a larger batch trains more
    images per second (README, "Dynamic batch size"). Values must grow from the configured batch;
    ``lr_scaling`` couples the learning rate (``"sqrt"`` for Adam-type optimizers).

    **How the batch changes.** The per-device batch is the public ``batch_size`` attribute of the
    data module (preferred) or of the LightningModule or its ``hparams`` (found as Lightning's
    ``BatchSizeFinder`` does). ``train_dataloader()`` must read it; the callback sets it and asks
    Lightning to rebuild the training DataLoader at the next epoch boundary (the same step on
    every rank). Past ``max_batch_size`` the per-device batch stays at most ``max_batch_size`` and
    ``trainer.accumulate_grad_batches`` grows instead, so the samples per optimizer step keep
    growing up to ``max_effective_batch_size`` (counted over all devices). Without
    ``max_effective_batch_size`` there is no accumulation and growth stops at ``max_batch_size``.
    With a plain DataLoader and no ``batch_size`` attribute anywhere, the DataLoader's batch stays
    as it is and growth happens only through ``accumulate_grad_batches`` (a warning says so at
    the start of training; ``max_effective_batch_size`` is then needed for any growth).

    **Learning rate.** The callback keeps one multiplier, ``lr_scale`` = warm-up factor ×
    ``lr_schedule`` factor × batch scaling × plateau decays, and applies it *on top of* any torch LR
    scheduler: when it changes by a ratio ``r``, every LR-valued entry of the optimizers' param
    groups (``lr``, ``initial_lr``, ``max_lr``, ``min_lr``) and of the schedulers (``base_lrs``,
    ``max_lrs``, ``min_lrs``, ``eta_min``, also inside ``SequentialLR``/``ChainedScheduler``) is
    multiplied by ``r``. Closed-form schedules (OneCycleLR, LambdaLR, cosine with restarts) and
    chainable ones (CosineAnnealingLR, StepLR, ExponentialLR) then give exactly
    ``lr_scale × schedule(step)``: they keep their shape and the callback scales them. The
    scheduler's length is not changed: if the batch grows, an epoch has fewer steps, so a
    step-interval schedule sized once from ``trainer.estimated_stepping_batches`` does not reach
    its end. Use an ``interval: epoch`` schedule, or one that re-sizes itself
    (lit_accel's ``WarmupDecayLR`` with ``ImageClassifier``: the recipe's default, re-sized before
    any batch at which the steps left changed).

    **Where the applied multiplier lives** (protocol with callbacks that restore optimizer state,
    such as ``DivergenceGuard``'s rollback; no imports between them): the multiplier currently
    baked into an optimizer's learning rates is stored in each of its param groups under
    ``"dynamic_lr_scale"`` (the same value in every group), not only in this callback. Before every
    training batch the callback compares that entry with its target and rescales by the ratio. So
    when another callback restores param groups and scheduler states from an earlier copy (which
    carries the entry as it was then), or multiplies the LRs by a factor of its own (a rollback's
    backoff) without touching the entry, the next batch again gets ``target ×`` whatever the other
    callback did, instead of a multiplier applied on top of the wrong base. A group without the
    entry holds the multiplier of a fresh optimizer (1), or, when resuming a checkpoint written
    before the entry existed, the ``applied_lr_scale`` saved in this callback's state. The entry is
    saved with the optimizer in checkpoints. A restorer should copy the param groups exactly,
    removing entries it did not save.

    ``lr_scaling`` is how the LR follows the batch (relative to the batch at the start of fit):
    ``"none"`` (default) keeps the LR, ``"linear"`` multiplies it by the batch ratio (Goyal et al.),
    ``"sqrt"`` by its square root (Adam-type optimizers, Malladi et al.). The default is ``"none"``
    because growing the batch at a fixed LR is what replaces LR decay in Smith et al.: linear scaling
    would keep ``lr / batch`` constant and cancel the effect the batch growth is meant to have. Use
    ``"linear"`` (with warm-up) when the batch grows only for throughput and the training dynamics
    should stay the same.

    **Cooperation protocol** (no imports between callbacks): when a new per-device batch size takes
    effect (the first training batch of the epoch with the rebuilt DataLoader, also after a resume
    that restored a grown batch), every other callback in ``trainer.callbacks`` that has a method
    ``on_batch_size_changed(trainer, pl_module, batch_size)`` is called with the new per-device
    batch size (samples per ``training_step`` call on one device) from this callback's
    ``on_train_epoch_start``. A throughput meter uses it for its samples and FLOP/s bookkeeping;
    ``trainer.accumulate_grad_batches`` holds the accumulation.

    **Resuming.** The checkpoint holds the batch, the accumulation, the LR factors and the plateau
    counters; a resumed run sets the batch on its holder again before its first epoch and continues.
    One instance used for several ``fit`` calls continues too (as Lightning's ``EarlyStopping``
    keeps its counters): the grown batch, LR decay and plateau counters carry over to the next fit's
    fresh optimizers. Give a run that should start over a new instance.

    Param groups added during the fit (``optimizer.add_param_group``, e.g. by ``BackboneFinetuning``)
    get the same multiplier from the next batch on.

    Args:
        monitor: the metric watched for plateaus (a key of ``trainer.callback_metrics``).
        mode: ``"min"`` if a lower ``monitor`` is better, ``"max"`` if higher is better.
        policy: what a plateau does: ``"lr"`` (default: needs no batch limits, works with any data
            pipeline), ``"batch"``, ``"batch_then_lr"`` or ``"none"`` (tables and warm-up only).
        patience: the ``patience``-th consecutive epoch without improvement is a plateau (>= 1).
        min_delta: the smallest change of ``monitor`` that counts as an improvement (absolute).
        cooldown: epochs after an action during which no plateau is counted.
        lr_factor: the learning rate is multiplied by this on an ``"lr"`` action, in (0, 1).
        min_lr: floor for the learning rate (the largest of the param groups, checked when a decay
            is decided).
        batch_factor: samples per optimizer step are multiplied by this on a ``"batch"`` action
            (> 1; 2 mirrors ``lr_factor=0.5``).
        max_batch_size: most samples per ``training_step`` on one device (memory bound); ``None``
            for no per-device limit.
        max_effective_batch_size: most samples per optimizer step over all devices
            (``batch_size × accumulate_grad_batches × world_size``); ``None`` means growth stops at
            ``max_batch_size`` without accumulation.
        lr_scaling: how the learning rate follows the batch: ``"none"``, ``"linear"`` or ``"sqrt"``.
        warmup_steps: optimizer steps of linear learning-rate warm-up from ``1/warmup_steps`` of the
            rate to all of it (0: off).
        batch_size_schedule: ``{epoch: per-device samples per optimizer step}``; values above
            ``max_batch_size`` are split into batch × accumulation.
        lr_schedule: ``{epoch: learning-rate factor}`` applied from that epoch on.
        batch_size_progress: ``{fraction of the run in (0, 1): per-device samples per optimizer
            step}``, increasing; needs ``trainer.max_epochs``. Not with ``batch_size_schedule`` or a
            batch policy.

    Logged keys (to ``trainer.loggers`` at the start of every training epoch, so right after every
    change; during warm-up also every ``log_every_n_steps`` optimizer steps). The step is
    ``trainer.global_step`` before the batch runs: the index of the first optimizer step the value
    applies to, the axis Lightning logs that step's ``self.log`` values and its
    ``LearningRateMonitor`` on, so a change lines up with the first loss it affects:
        ``dynamic/batch_size``: per-device batch (samples per ``training_step``).
        ``dynamic/effective_batch_size``: samples per optimizer step over all devices.
        ``dynamic/lr_scale``: the multiplier the callback applies on top of the LR schedule.

    Raises:
        ValueError: for an argument outside its allowed range, a batch policy without a maximum, or
            ``batch_size_schedule`` or ``batch_size_progress`` together with a batch policy or with
            each other; at the start of training, if ``batch_size_progress`` cannot be met (no
            ``max_epochs``, two fractions in one epoch, a fraction that starts after the last
            epoch, a value not above the configured batch), if a batch policy's maxima are below
            the batch the run starts with (it could never grow), or if the batch needs gradient
            accumulation (``accumulate_grad_batches`` > 1) but manual optimization or the strategy
            (DeepSpeed) cannot accumulate; the message says which limit to raise or which value to
            lower.

    Example::

        trainer:
          callbacks:
            - class_path: lit_accel.callbacks.DynamicBatchLR
              init_args:
                monitor: val/loss
                policy: batch_then_lr
                patience: 2
                max_batch_size: 512
                max_effective_batch_size: 2048
                lr_scaling: none
                warmup_steps: 100
    """

    def __init__(
        self,
        monitor: str = "val/loss",
        mode: Literal["min", "max"] = "min",
        policy: Policy = "lr",
        patience: int = 2,
        min_delta: float = 0.0,
        cooldown: int = 0,
        lr_factor: float = 0.5,
        min_lr: float = 0.0,
        batch_factor: float = 2.0,
        max_batch_size: int | None = None,
        max_effective_batch_size: int | None = None,
        lr_scaling: LRScaling = "none",
        warmup_steps: int = 0,
        batch_size_schedule: dict[int, int] | None = None,
        lr_schedule: dict[int, float] | None = None,
        batch_size_progress: dict[float, int] | None = None,
    ) -> None:
        super().__init__()
        require(isinstance(monitor, str) and monitor != "", "monitor", monitor, "a metric name")
        require(mode in ("min", "max"), "mode", mode, "'min' or 'max'")
        require(policy in _POLICIES, "policy", policy, f"one of {_POLICIES}")
        require(is_int(patience) and patience >= 1, "patience", patience, "an integer >= 1")
        require(is_number(min_delta) and min_delta >= 0, "min_delta", min_delta, "a number >= 0")
        require(is_int(cooldown) and cooldown >= 0, "cooldown", cooldown, "an integer >= 0")
        require(is_number(lr_factor) and 0 < lr_factor < 1, "lr_factor", lr_factor, "a number in (0, 1)")
        require(is_number(min_lr) and min_lr >= 0, "min_lr", min_lr, "a number >= 0")
        require(is_number(batch_factor) and batch_factor > 1, "batch_factor", batch_factor, "a number > 1")
        for name, value in (("max_batch_size", max_batch_size), ("max_effective_batch_size", max_effective_batch_size)):
            require(value is None or (is_int(value) and value >= 1), name, value, "a positive integer or null")
        require(lr_scaling in _SCALINGS, "lr_scaling", lr_scaling, f"one of {_SCALINGS}")
        require(is_int(warmup_steps) and warmup_steps >= 0, "warmup_steps", warmup_steps, "an integer >= 0")
        batch_policy = policy in ("batch", "batch_then_lr")
        if batch_policy and max_batch_size is None and max_effective_batch_size is None:
            raise ValueError(
                f"policy={policy!r} needs a limit: set max_batch_size (per device) and/or"
                " max_effective_batch_size (over all devices, with gradient accumulation)"
            )
        if batch_policy and batch_size_schedule:
            raise ValueError(
                f"batch_size_schedule={batch_size_schedule!r} is not allowed with policy={policy!r}: both would set"
                " the batch size; use policy 'lr' or 'none' with a batch_size_schedule"
            )
        if batch_size_progress and (batch_policy or batch_size_schedule):
            other = f"policy={policy!r}" if batch_policy else f"batch_size_schedule={batch_size_schedule!r}"
            raise ValueError(
                f"batch_size_progress={batch_size_progress!r} is not allowed with {other}: both would set the batch"
                " size; use one of them (with policy 'lr' or 'none' for batch_size_progress)"
            )
        self.monitor = monitor
        self.mode = mode
        self.policy = policy
        self.patience = patience
        self.min_delta = float(min_delta)
        self.cooldown = cooldown
        self.lr_factor = float(lr_factor)
        self.min_lr = float(min_lr)
        self.batch_factor = float(batch_factor)
        self.max_batch_size = max_batch_size
        self.max_effective_batch_size = max_effective_batch_size
        self.lr_scaling = lr_scaling
        self.warmup_steps = warmup_steps
        self.batch_size_schedule = _check_table("batch_size_schedule", batch_size_schedule, integer=True)
        self.lr_schedule = _check_table("lr_schedule", lr_schedule, integer=False)
        self.batch_size_progress = _check_progress(batch_size_progress)

        # progress (state_dict)
        self._batch_size: int | None = None  # per-device samples per training_step
        self._accumulate: int = 1
        self._base_samples: int | None = None  # per-device samples per optimizer step at the first fit start
        self._lr_decay = 1.0  # product of the plateau decays
        self._best: float | None = None
        self._wait = 0
        self._cooldown_left = 0
        # The multiplier last written into the optimizers (their param groups hold the live value,
        # DYNAMIC_LR_SCALE_KEY); saved so that a checkpoint from before DYNAMIC_LR_SCALE_KEY existed still resumes.
        self._applied_lr_scale = 1.0
        self._unmarked_scale = 1.0  # the multiplier in a param group without DYNAMIC_LR_SCALE_KEY

        # per fit
        self._batch_table: dict[int, int] = self.batch_size_schedule  # {epoch: samples}, either kind of schedule
        self._holder: str | None = None  # "datamodule" | "module" | None (fixed DataLoader batch)
        self._pending_apply = False
        self._fixed_batch: int | None = None  # the DataLoader's batch when no batch_size attribute exists
        self._samples_cap: int | None = None  # most per-device samples per optimizer step
        self._notified_batch: int | None = None
        self._val_ran = False
        self._known_groups: dict[int, int] | None = None  # param groups per optimizer at train start, by id
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------- state
    @property
    @override
    def state_key(self) -> str:
        # Identity, as Lightning's EarlyStopping: what it watches; not the policy or its settings,
        # so a run resumed with another policy keeps the batch size and LR scale it reached.
        return identity_state_key(type(self).__qualname__, monitor=self.monitor, mode=self.mode)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        adopt_older_state(checkpoint, self.state_key, type(self).__qualname__, monitor=self.monitor, mode=self.mode)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self._batch_size,
            "accumulate_grad_batches": self._accumulate,
            "base_samples": self._base_samples,
            "lr_decay": self._lr_decay,
            "best": self._best,
            "wait": self._wait,
            "cooldown_left": self._cooldown_left,
            "applied_lr_scale": self._applied_lr_scale,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._batch_size = state_dict.get("batch_size")
        self._accumulate = int(state_dict.get("accumulate_grad_batches", 1))
        self._base_samples = state_dict.get("base_samples")
        self._lr_decay = float(state_dict.get("lr_decay", 1.0))
        self._best = state_dict.get("best")
        self._wait = int(state_dict.get("wait", 0))
        self._cooldown_left = int(state_dict.get("cooldown_left", 0))
        self._applied_lr_scale = float(state_dict.get("applied_lr_scale", 1.0))
        self._unmarked_scale = self._applied_lr_scale  # states saved without the key have it baked in
        # Most strategies restore callbacks before on_fit_start; FSDP/ModelParallel/DeepSpeed after it
        # (strategy.restore_checkpoint_after_setup), then on_train_start applies the state.
        self._pending_apply = True

    # ------------------------------------------------------------------------------------- hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._warned = set()
        self._batch_table = self.batch_size_schedule
        if self.batch_size_progress:
            self._batch_table = _progress_epochs(self.batch_size_progress, trainer.max_epochs)
        if not self._pending_apply:
            # fit builds fresh optimizers unless a checkpoint restores them (after this hook)
            self._applied_lr_scale = self._unmarked_scale = 1.0
            # Mark them now, before other callbacks' on_train_start may copy the param groups.
            _mark_param_groups(trainer, self._unmarked_scale)
        self._holder = _find_batch_size_holder(trainer, pl_module)
        if self._holder is None:
            return  # the DataLoader's own batch is known only once it is built: on_train_start
        configured = _read_batch_size(trainer, pl_module, self._holder)
        self._notified_batch = configured
        self._init_batch(trainer, pl_module, configured, fixed=False)
        self._write_batch(trainer, pl_module)
        self._pending_apply = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._holder is None:
            loader_batch = _loader_batch_size(trainer)
            self._notified_batch = loader_batch
            if self._needs_batch_growth() and "fixed" not in self._warned:
                self._warned.add("fixed")
                rank_zero_warn(
                    "DynamicBatchLR: no integer `batch_size` attribute on the data module or the LightningModule, so"
                    f" the DataLoader's batch ({loader_batch}) stays fixed and the batch grows only through"
                    " `accumulate_grad_batches` (up to max_effective_batch_size). Expose a public `batch_size` that"
                    " train_dataloader() reads to change the real batch."
                )
            self._init_batch(trainer, pl_module, loader_batch, fixed=True)
            trainer.accumulate_grad_batches = self._accumulate
        elif self._pending_apply:  # the checkpoint was restored after on_fit_start
            self._write_batch(trainer, pl_module)
            _request_train_dataloader_reload(trainer)
        self._pending_apply = False
        if self._accumulate > 1 and not _can_accumulate(trainer, pl_module):
            raise RunSettingsError(self._accumulation_error(trainer, pl_module))
        _mark_param_groups(trainer, self._unmarked_scale)  # optimizers restored from older checkpoints
        self._known_groups = {id(optimizer): len(optimizer.param_groups) for optimizer in trainer.optimizers}
        self._sync_lr(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_ran = False
        self._sync_lr(trainer)
        if self._batch_size is not None and self._batch_size != self._notified_batch:
            self._notified_batch = self._batch_size
            self._check_loader_batch(trainer)
            notify_batch_size_changed(trainer, pl_module, self._batch_size, exclude=self)
        self._log(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Every batch, not only during warm-up: another callback may have restored older param
        # groups (a rollback) since the last batch. A no-op costs one lookup per optimizer.
        if self._sync_lr(trainer) and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
            self._log(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_ran = True

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Everything decided here takes effect from the next epoch's first batch, on every rank.
        changed = False
        if self.policy != "none" and (self._val_ran or not trainer.enable_validation):
            changed = self._plateau_check(trainer)
        next_samples = self._batch_table.get(trainer.current_epoch + 1)
        if next_samples is not None and self._batch_size is not None:
            table = "batch_size_progress" if self.batch_size_progress else "batch_size_schedule"
            changed |= self._change(
                trainer, f"epoch {trainer.current_epoch + 1}: {table}", ("batch", float(next_samples))
            )
        if changed:
            self._write_batch(trainer, pl_module)
            self._sync_lr(trainer)

    # ---------------------------------------------------------------------------------- internals
    def _accumulation_error(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        if not pl_module.automatic_optimization:
            who = "manual optimization (automatic_optimization = False) does not accumulate gradients"
        else:
            strategy = type(trainer.strategy).__name__
            who = f"{strategy} handles gradient accumulation itself and cannot change it during fit"
        samples = (self._batch_size or 0) * self._accumulate
        return (
            f"DynamicBatchLR needs accumulate_grad_batches={self._accumulate} (batch {self._batch_size} ×"
            f" {self._accumulate} = {samples} samples per optimizer step on each device, the batch being capped at"
            f" max_batch_size={self.max_batch_size}), but {who}. Raise max_batch_size to at least {samples} if that"
            " fits in memory, or keep every batch_size_schedule value at or below max_batch_size (and resume only from"
            " checkpoints of runs that did not accumulate)."
        )

    def _needs_batch_growth(self) -> bool:
        return self.policy in ("batch", "batch_then_lr") or bool(self._batch_table)

    def _init_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, configured: int | None, fixed: bool
    ) -> None:
        self._fixed_batch = configured if fixed else None
        can_accumulate = _can_accumulate(trainer, pl_module)
        if self._base_samples is None:
            # a fresh start: the configured batch and accumulation are the reference for lr_scaling
            self._batch_size = configured
            self._accumulate = int(trainer.accumulate_grad_batches)
            self._base_samples = None if configured is None else configured * self._accumulate
            first = self._batch_table.get(0)
            if first is not None and configured is not None:
                self._set_samples(first)
            if self.batch_size_progress and self._base_samples is not None:
                _check_progress_grows(self.batch_size_progress, self._base_samples)
        elif fixed:
            self._batch_size = configured  # a DataLoader's batch cannot be changed; keep the accumulation
        cap = self.max_effective_batch_size
        per_device_cap = None if cap is None or not can_accumulate else cap // max(1, trainer.world_size)
        self._samples_cap = _samples_cap(self.max_batch_size, per_device_cap, self._fixed_batch)
        start = None if configured is None else configured * int(trainer.accumulate_grad_batches)
        if self.policy in ("batch", "batch_then_lr") and self._fixed_batch is None:
            _check_cap_above_start(self.max_batch_size, self.max_effective_batch_size, start, trainer.world_size)

    def _set_samples(self, samples: int) -> None:
        self._batch_size, self._accumulate = _split_samples(samples, self.max_batch_size, self._fixed_batch)

    def _write_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.accumulate_grad_batches = self._accumulate
        if self._holder is None or self._batch_size is None:
            return
        if _read_batch_size(trainer, pl_module, self._holder) != self._batch_size:
            _write_batch_size(trainer, pl_module, self._holder, self._batch_size)
            _request_train_dataloader_reload(trainer)

    def _plateau_check(self, trainer: pl.Trainer) -> bool:
        value = _reduced_metric(trainer, self.monitor)
        if value is None:
            if "missing" not in self._warned:
                self._warned.add("missing")
                rank_zero_warn(
                    f"DynamicBatchLR: monitor={self.monitor!r} is not among the logged metrics"
                    f" {sorted(trainer.callback_metrics)}; no plateau check until it is logged"
                )
            return False
        best, wait, cooldown_left, plateau = _plateau_step(
            value, self._best, self._wait, self._cooldown_left, self.mode, self.patience, self.min_delta, self.cooldown
        )
        action = None
        if plateau:
            samples = None if self._batch_size is None else self._batch_size * self._accumulate
            lr_now = _largest_lr(trainer) / _warmup_factor(trainer.global_step, self.warmup_steps)
            action = _plan_action(
                self.policy, samples, self._samples_cap, self.batch_factor, lr_now, self.lr_factor, self.min_lr
            )
        # rank 0 decides for everyone: exactly one broadcast per checked epoch on every rank
        best, wait, cooldown_left, plateau, action = trainer.strategy.broadcast(
            (best, wait, cooldown_left, plateau, action), src=0
        )
        self._best, self._wait, self._cooldown_left = best, wait, cooldown_left
        if not plateau:
            return False
        reason = (
            f"epoch {trainer.current_epoch}: {self.monitor} plateaued ({self.monitor}={value:.5g}, best"
            f" {best if best is None else f'{best:.5g}'}, {self.patience} epoch(s) without improvement)"
        )
        if action is None:
            if trainer.is_global_zero:
                log.info(f"DynamicBatchLR: {reason}; nothing left to change (batch and LR at their limits)")
            return False
        return self._change(trainer, reason, action)

    def _change(self, trainer: pl.Trainer, reason: str, action: tuple[str, float]) -> bool:
        """Apply a decided action to the state; logs one line and returns True if anything changed."""
        batch_before = (self._batch_size, self._accumulate)
        lr_before = self._lr_scale_without_warmup(trainer)
        kind, amount = action
        if kind == "batch":
            self._set_samples(int(amount))
        else:
            self._lr_decay *= amount
        lr_after = self._lr_scale_without_warmup(trainer)
        batch_changed = (self._batch_size, self._accumulate) != batch_before
        if not batch_changed and math.isclose(lr_before, lr_after):
            return False
        if trainer.is_global_zero:
            parts = [f"DynamicBatchLR: {reason}"]
            if batch_changed:
                world = trainer.world_size
                (b0, a0), (b1, a1) = batch_before, (self._batch_size, self._accumulate)
                assert b0 is not None and b1 is not None  # a batch change starts from a known batch size
                parts.append(
                    f"batch {b0}×{a0} → {b1}×{a1} per device (batch × accumulation),"
                    f" effective {b0 * a0 * world} → {b1 * a1 * world} from the next epoch"
                )
            if not math.isclose(lr_before, lr_after):
                parts.append(f"lr scale {lr_before:.4g} → {lr_after:.4g}")
            log.info("; ".join(parts))
        return True

    def _lr_scale_without_warmup(self, trainer: pl.Trainer) -> float:
        batch_ratio = 1.0
        if self._batch_size is not None and self._base_samples:
            batch_ratio = self._batch_size * self._accumulate / self._base_samples
        schedule = _table_value(self.lr_schedule, trainer.current_epoch, 1.0)
        return schedule * _batch_lr_factor(batch_ratio, self.lr_scaling) * self._lr_decay

    def _sync_lr(self, trainer: pl.Trainer) -> bool:
        """Bring the multiplier baked into each optimizer (DYNAMIC_LR_SCALE_KEY) to the target; True if changed."""
        target = self._lr_scale_without_warmup(trainer) * _warmup_factor(trainer.global_step, self.warmup_steps)
        self._applied_lr_scale = target
        return _sync_optimizers(trainer, target, self._unmarked_scale, self._known_groups)

    def _check_loader_batch(self, trainer: pl.Trainer) -> None:
        actual = _loader_batch_size(trainer)
        if actual is not None and actual != self._batch_size and "loader" not in self._warned:
            self._warned.add("loader")
            rank_zero_warn(
                f"DynamicBatchLR set batch_size={self._batch_size} on the {self._holder} but the rebuilt training"
                f" DataLoader has batch_size={actual}: does train_dataloader() read self.batch_size?"
            )

    def _log(self, trainer: pl.Trainer) -> None:
        if not trainer.loggers:
            return
        metrics = {"dynamic/lr_scale": self._applied_lr_scale}
        if self._batch_size is not None:
            metrics["dynamic/batch_size"] = float(self._batch_size)
            metrics["dynamic/effective_batch_size"] = float(self._batch_size * self._accumulate * trainer.world_size)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


# ---------------------------------------------------------------------------------- pure functions
def _plateau_step(
    value: float,
    best: float | None,
    wait: int,
    cooldown_left: int,
    mode: str,
    patience: int,
    min_delta: float,
    cooldown: int,
) -> tuple[float | None, int, int, bool]:
    """One epoch of plateau bookkeeping; returns ``(best, wait, cooldown_left, plateau)``.

    ``wait`` counts epochs without an improvement of more than ``min_delta``; the ``patience``-th
    such epoch is a plateau, after which ``wait`` restarts and the next ``cooldown`` epochs are not
    counted (as in torch's ``ReduceLROnPlateau``). NaN never improves.
    """
    if math.isnan(value):
        improved = False
    elif best is None:
        improved = True
    else:
        improved = value < best - min_delta if mode == "min" else value > best + min_delta
    if improved:
        best, wait = value, 0
    else:
        wait += 1
    if cooldown_left > 0:
        cooldown_left -= 1
        wait = 0
    plateau = wait >= patience
    if plateau:
        wait, cooldown_left = 0, cooldown
    return best, wait, cooldown_left, plateau


def _plan_action(
    policy: str,
    samples: int | None,
    samples_cap: int | None,
    batch_factor: float,
    current_lr: float,
    lr_factor: float,
    min_lr: float,
) -> tuple[str, float] | None:
    """What a plateau does: ``("batch", new per-device samples per step)``, ``("lr", ratio)`` or None."""
    if policy in ("batch", "batch_then_lr") and samples is not None:
        grown = _grow_samples(samples, batch_factor, samples_cap)
        if grown is not None:
            return ("batch", float(grown))
    if policy in ("lr", "batch_then_lr"):
        ratio = _decay_ratio(current_lr, lr_factor, min_lr)
        if ratio is not None:
            return ("lr", ratio)
    return None


def _grow_samples(samples: int, factor: float, cap: int | None) -> int | None:
    """Samples per optimizer step after growth by ``factor``, capped; None if it cannot grow."""
    target = int(samples * factor)
    if cap is not None:
        target = min(target, cap)
    return target if target > samples else None


def _samples_cap(max_batch_size: int | None, per_device_cap: int | None, fixed_batch: int | None) -> int | None:
    """Most per-device samples per optimizer step (None: unlimited)."""
    if per_device_cap is not None:
        return per_device_cap
    if fixed_batch is not None:
        return fixed_batch  # fixed DataLoader batch and no effective maximum: no growth at all
    return max_batch_size


def _split_samples(samples: int, max_batch_size: int | None, fixed_batch: int | None = None) -> tuple[int, int]:
    """``(batch_size, accumulate_grad_batches)`` giving about ``samples`` per optimizer step.

    The batch stays at most ``max_batch_size`` (or exactly ``fixed_batch``, a DataLoader whose batch
    cannot change); the product is ``samples`` when it divides evenly, else slightly more.
    """
    if fixed_batch is not None:
        return fixed_batch, max(1, math.ceil(samples / fixed_batch))
    if max_batch_size is None or samples <= max_batch_size:
        return samples, 1
    accumulate = math.ceil(samples / max_batch_size)
    return math.ceil(samples / accumulate), accumulate


def _decay_ratio(current_lr: float, factor: float, min_lr: float) -> float | None:
    """Multiplier for a decay of ``current_lr`` by ``factor`` floored at ``min_lr``; None at the floor."""
    if current_lr <= min_lr or current_lr <= 0:
        return None
    ratio = max(current_lr * factor, min_lr) / current_lr
    return ratio if ratio < 1 else None


def _batch_lr_factor(batch_ratio: float, rule: str) -> float:
    if rule == "linear":
        return batch_ratio
    if rule == "sqrt":
        return math.sqrt(batch_ratio)
    return 1.0


def _warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` optimizer steps."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def _table_value(table: dict[int, Any], epoch: int, default: Any) -> Any:
    """The value of the largest key <= ``epoch``."""
    keys = [k for k in table if k <= epoch]
    return table[max(keys)] if keys else default


# --------------------------------------------------------------------------- Lightning/torch seams
def _find_batch_size_holder(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and isinstance(getattr(datamodule, "batch_size", None), int):
        return "datamodule"
    if lightning_hasattr(pl_module, "batch_size") and isinstance(lightning_getattr(pl_module, "batch_size"), int):
        return "module"
    return None


def _read_batch_size(trainer: pl.Trainer, pl_module: pl.LightningModule, holder: str) -> int:
    if holder == "datamodule":
        return int(trainer.datamodule.batch_size)  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
    # Typed Optional[Any]: the holder was chosen because this is an int (_find_batch_size_holder).
    return int(cast("int", lightning_getattr(pl_module, "batch_size")))


def _write_batch_size(trainer: pl.Trainer, pl_module: pl.LightningModule, holder: str, value: int) -> None:
    if holder == "datamodule":
        trainer.datamodule.batch_size = value  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
    else:
        lightning_setattr(pl_module, "batch_size", value)


def _request_train_dataloader_reload(trainer: pl.Trainer) -> None:
    # FitLoop.setup_data(), called at every epoch start, rebuilds the training DataLoader (calling
    # train_dataloader() again, re-injecting the DistributedSampler, recounting batches) when no
    # loader is cached; Lightning's BatchSizeFinder uses the same seam (tuner/batch_size_scaling.py).
    if not hasattr(trainer.fit_loop, "_combined_loader"):
        raise RuntimeError(
            "DynamicBatchLR cannot ask this Lightning version to rebuild the training DataLoader"
            " (FitLoop._combined_loader is gone); set Trainer(reload_dataloaders_every_n_epochs=1) and report it"
        )
    trainer.fit_loop._combined_loader = None


def _loader_batch_size(trainer: pl.Trainer) -> int | None:
    loader = trainer.train_dataloader
    batch_size = getattr(loader, "batch_size", None)
    return batch_size if isinstance(batch_size, int) else None


def _can_accumulate(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    return pl_module.automatic_optimization and not trainer.strategy.handles_gradient_accumulation


def _reduced_metric(trainer: pl.Trainer, name: str) -> float | None:
    """Mean of ``name`` over the ranks that have it, None if none has it. Every rank calls one reduce."""
    value = trainer.callback_metrics.get(name)
    present = value is not None
    pair = torch.tensor(
        [float(value) if value is not None else 0.0, 1.0 if present else 0.0],
        dtype=torch.float64,
        device=trainer.strategy.root_device,
    )
    pair = trainer.strategy.reduce(pair, reduce_op="sum")
    total, count = float(pair[0]), float(pair[1])
    return total / count if count > 0 else None


def _largest_lr(trainer: pl.Trainer) -> float:
    lrs = [float(group["lr"]) for optimizer in trainer.optimizers for group in optimizer.param_groups]
    return max(lrs) if lrs else 0.0


def _mark_param_groups(trainer: pl.Trainer, scale: float) -> None:
    """Give every param group without DYNAMIC_LR_SCALE_KEY the multiplier its LRs hold (``scale``)."""
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group.setdefault(DYNAMIC_LR_SCALE_KEY, scale)


def _applied_scales(optimizer: torch.optim.Optimizer, unmarked: float, known_groups: int | None) -> list[float]:
    """The multiplier each param group's LRs hold: its DYNAMIC_LR_SCALE_KEY; without one, ``unmarked``
    for the groups there when training started (an older checkpoint's), 1 for a group added since
    (``optimizer.add_param_group``, e.g. by BackboneFinetuning: its LR holds no multiplier)."""
    known = len(optimizer.param_groups) if known_groups is None else known_groups
    return [
        float(group.get(DYNAMIC_LR_SCALE_KEY, unmarked if index < known else 1.0))
        for index, group in enumerate(optimizer.param_groups)
    ]


def _sync_optimizers(
    trainer: pl.Trainer, target: float, unmarked: float, known_groups: dict[int, int] | None = None
) -> bool:
    """Rescale each param group (and its schedulers' entries) whose DYNAMIC_LR_SCALE_KEY differs from
    ``target``. ``known_groups``: per optimizer (by id), how many groups it had when training started."""
    changed = False
    first = trainer.optimizers[0]
    for optimizer in trainer.optimizers:
        applied = _applied_scales(optimizer, unmarked, (known_groups or {}).get(id(optimizer)))
        by_ratio: dict[float, list[int]] = {}
        for index, scale in enumerate(applied):
            if not math.isclose(target, scale, rel_tol=1e-12):
                by_ratio.setdefault(target / scale, []).append(index)
        if not by_ratio:
            continue
        schedulers = [
            config.scheduler
            for config in trainer.lr_scheduler_configs
            if (getattr(config.scheduler, "optimizer", None) or first) is optimizer
        ]
        for ratio, indices in by_ratio.items():
            # The whole schedule, floors included, moves with the batch-size rule's LR.
            scale_learning_rates(optimizer, schedulers, ratio, floors=True, groups=indices)
        for group in optimizer.param_groups:
            group[DYNAMIC_LR_SCALE_KEY] = target
        changed = True
    return changed


# -------------------------------------------------------------------------------------- validation


def _check_table(name: str, table: dict[int, Any] | None, integer: bool) -> dict[int, Any]:
    if table is not None and not isinstance(table, dict):
        raise ValueError(f"{name}={table!r} is not allowed: use a mapping of epoch to value, e.g. {{0: 256, 10: 512}}")
    if not table:
        return {}
    checked: dict[int, Any] = {}
    for key, value in table.items():
        epoch = int(key) if isinstance(key, str) and key.isdigit() else key
        require(is_int(epoch) and epoch >= 0, name, table, "epochs (integers >= 0) as keys")
        if integer:
            require(is_int(value) and value >= 1, name, table, "positive integer batch sizes as values")
        else:
            ok = is_number(value) and value > 0
            require(ok, name, table, "positive factors as values")
        checked[epoch] = value if integer else float(value)
    return checked


def _check_progress(table: dict[float, int] | None) -> dict[float, int]:
    """``batch_size_progress`` checked: fractions in (0, 1) as keys, increasing positive batch sizes."""
    if table is not None and not isinstance(table, dict):
        raise ValueError(
            f"batch_size_progress={table!r} is not allowed: use a mapping of run fraction to batch size,"
            " e.g. {0.4: 512, 0.7: 1024}"
        )
    if not table:
        return {}
    checked: dict[float, int] = {}
    for key, value in table.items():
        fraction = float(key) if isinstance(key, str) else key
        require(
            is_number(fraction) and 0 < fraction < 1,
            "batch_size_progress",
            table,
            "fractions of the run in (0, 1) as keys (1 or more would start after the last epoch)",
        )
        require(is_int(value) and value >= 1, "batch_size_progress", table, "positive integer batch sizes as values")
        checked[float(fraction)] = value
    values = [checked[k] for k in sorted(checked)]
    require(
        all(a < b for a, b in zip(values, values[1:])),
        "batch_size_progress",
        table,
        "batch sizes that grow with the fraction",
    )
    return checked


def _progress_epochs(table: dict[float, int], max_epochs: int | None) -> dict[int, int]:
    """``{epoch: samples}`` for a ``batch_size_progress`` table in a run of ``max_epochs``: each value
    applies from the first epoch that starts at or after its fraction of the run."""
    if max_epochs is None or max_epochs < 1:
        raise RunSettingsError(
            f"batch_size_progress={table!r} needs the run's length in epochs, but trainer.max_epochs={max_epochs}:"
            " set trainer.max_epochs, or use batch_size_schedule ({epoch: batch_size}) instead"
        )
    epochs: dict[int, int] = {}
    for fraction in sorted(table):
        # The tolerance keeps 0.4 of 5 epochs at epoch 2 despite 0.4 * 5 = 2.0000000000000004.
        epoch = math.ceil(fraction * max_epochs - 1e-9)
        if epoch >= max_epochs:
            raise RunSettingsError(
                f"batch_size_progress={table!r}: {fraction} of a {max_epochs}-epoch run starts at epoch {epoch}, after"
                f" the last epoch ({max_epochs - 1}): "
                + (
                    f"use fractions at most {(max_epochs - 1) / max_epochs:.3g}, or more epochs"
                    if max_epochs > 1
                    else "the batch can grow only in a run of 2 epochs or more"
                )
            )
        if epoch in epochs:
            raise RunSettingsError(
                f"batch_size_progress={table!r}: two fractions fall on epoch {epoch} of a {max_epochs}-epoch run:"
                " space them at least 1/max_epochs apart, or use more epochs"
            )
        epochs[epoch] = table[fraction]
    return epochs


def _check_progress_grows(table: dict[float, int], start: int) -> None:
    """Every value of ``batch_size_progress`` must exceed the batch the run starts with."""
    first = table[min(table)]
    if first <= start:
        raise RunSettingsError(
            f"batch_size_progress={table!r} cannot grow the batch: the run starts at {start} samples per optimizer"
            f" step on each device and the first value is {first}. Use values above {start}, or a smaller"
            " data.batch_size"
        )


def _check_cap_above_start(
    max_batch_size: int | None, max_effective_batch_size: int | None, start: int | None, world_size: int
) -> None:
    """A batch policy whose maxima are below the batch the run starts with could never grow it."""
    if start is None:
        return
    limits = []
    if max_batch_size is not None and max_effective_batch_size is None and max_batch_size < start:
        limits.append(f"max_batch_size={max_batch_size} (per device)")
    if max_effective_batch_size is not None and max_effective_batch_size < start * world_size:
        limits.append(f"max_effective_batch_size={max_effective_batch_size} (over {world_size} device(s))")
    if limits:
        raise RunSettingsError(
            f"DynamicBatchLR cannot grow the batch: {' and '.join(limits)} is below the {start} samples per"
            f" optimizer step on each device the run starts with. Raise the maximum above it, or start from a"
            " smaller data.batch_size"
        )
