"""Batch plans: when to grow the batch or lower the learning rate, decided from numbers alone.

Three policies, each a number in and a decision out (a new per-device batch, split into batch ×
gradient accumulation under a memory bound, and a learning-rate multiplier, with its
:class:`Reason`):

* **plateau** (:meth:`BatchPlan.observe`): a monitored metric that stopped improving grows the
  batch, lowers the learning rate, or grows the batch until a maximum and then lowers the LR;
* **table** (:meth:`BatchPlan.at_epoch`): ``{epoch: batch size}``;
* **progress**: ``{fraction of the run: batch size}``, turned into a table once the run's length
  is known (:func:`progress_epochs`).

Sources: Smith, Kindermans, Ying & Le 2017, "Don't decay the learning rate, increase the batch
size" (growing the batch by k at a fixed LR acts like dividing the LR by k: the SGD noise scale is
about ``lr / batch``); Goyal et al. 2017, "Accurate, large minibatch SGD" (linear LR scaling);
Malladi et al. 2022, "On the SDEs and scaling rules for adaptive gradient algorithms" (square-root
scaling for Adam-type optimizers). Plateau counting as in torch's ``ReduceLROnPlateau``.

Standard library only: a plain PyTorch loop, a Fabric loop and ``DynamicBatchLR`` use it alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from lit_accel.core.checks import is_int, is_number, require

__all__ = [
    "BATCH_POLICIES",
    "LR_SCALINGS",
    "POLICIES",
    "BatchDecision",
    "BatchPlan",
    "BatchPlanError",
    "BatchSetting",
    "Plateau",
    "Reason",
    "batch_lr_factor",
    "progress_epochs",
    "split_samples",
]

Policy = Literal["lr", "batch", "batch_then_lr", "none"]
LRScaling = Literal["none", "linear", "sqrt"]
POLICIES = ("lr", "batch", "batch_then_lr", "none")
BATCH_POLICIES = ("batch", "batch_then_lr")
LR_SCALINGS = ("none", "linear", "sqrt")


class BatchPlanError(ValueError):
    """Settings that do not fit the run (its length, the batch it starts with), found at its start."""


class Reason(Enum):
    """Why the batch or the learning-rate multiplier changed."""

    PLATEAU = "plateau"  # the monitored metric stopped improving
    SCHEDULE = "batch_size_schedule"  # the {epoch: batch size} table
    PROGRESS = "batch_size_progress"  # the {fraction of the run: batch size} table


@dataclass(frozen=True)
class BatchSetting:
    """What a loop runs with: ``batch_size`` samples per forward on one device (``None``: unknown),
    ``accumulate`` forwards per optimizer step, and ``lr_scale`` times the scheduled learning rate."""

    batch_size: int | None
    accumulate: int
    lr_scale: float

    @property
    def samples(self) -> int | None:
        """Samples per optimizer step on one device."""
        return None if self.batch_size is None else self.batch_size * self.accumulate


@dataclass(frozen=True)
class BatchDecision:
    """A policy's decision: the setting ``before`` and ``after`` it, and why."""

    reason: Reason
    before: BatchSetting
    after: BatchSetting

    @property
    def batch_changed(self) -> bool:
        return (self.before.batch_size, self.before.accumulate) != (self.after.batch_size, self.after.accumulate)

    @property
    def lr_changed(self) -> bool:
        return not math.isclose(self.before.lr_scale, self.after.lr_scale)

    @property
    def changed(self) -> bool:
        """False for a plateau with nothing left to change (batch and LR at their limits)."""
        return self.batch_changed or self.lr_changed


class Plateau:
    """Counts epochs without improvement, as torch's ``ReduceLROnPlateau`` does.

    ``update(value)`` returns True on the ``patience``-th consecutive epoch without an improvement
    of more than ``min_delta`` (absolute); ``wait`` then restarts and the next ``cooldown`` epochs
    are not counted. NaN never improves.

    Example::

        plateau = Plateau("min", patience=2)
        [plateau.update(v) for v in (1.0, 0.9, 0.9, 0.9)]  # [False, False, False, True]
    """

    def __init__(self, mode: str = "min", patience: int = 2, min_delta: float = 0.0, cooldown: int = 0) -> None:
        require(mode in ("min", "max"), "mode", mode, "'min' or 'max'")
        require(is_int(patience) and patience >= 1, "patience", patience, "an integer >= 1")
        require(is_number(min_delta) and min_delta >= 0, "min_delta", min_delta, "a number >= 0")
        require(is_int(cooldown) and cooldown >= 0, "cooldown", cooldown, "an integer >= 0")
        self.mode, self.patience, self.min_delta, self.cooldown = mode, patience, float(min_delta), cooldown
        self.best: float | None = None
        self.wait = 0
        self.cooldown_left = 0

    def update(self, value: float) -> bool:
        """Count one epoch's ``value``; True if it is a plateau."""
        if math.isnan(value):
            improved = False
        elif self.best is None:
            improved = True
        elif self.mode == "min":
            improved = value < self.best - self.min_delta
        else:
            improved = value > self.best + self.min_delta
        if improved:
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.wait = 0
        if self.wait < self.patience:
            return False
        self.wait, self.cooldown_left = 0, self.cooldown
        return True


class BatchPlan:
    """The batch size and learning-rate multiplier of a run: plateau, table and progress policies.

    Call :meth:`start` with the batch the run begins with, then once per epoch :meth:`observe`
    (the monitored metric, when it was measured) and :meth:`at_epoch` (the next epoch's table
    entry). Each returns a :class:`BatchDecision` or ``None``; the loop applies :attr:`setting`
    from the next epoch. The batch grows up to ``max_batch_size`` per device, then through
    gradient accumulation up to ``max_effective_batch_size`` over all devices. ``lr_scale`` is
    ``batch_lr_factor(samples / starting samples, lr_scaling)`` times the plateau decays.

    Args:
        policy: what a plateau does: ``"lr"`` (multiply the LR by ``lr_factor``), ``"batch"``
            (multiply the samples per step by ``batch_factor``), ``"batch_then_lr"``, or ``"none"``.
        mode: ``"min"`` if a lower metric is better, ``"max"`` if higher is better.
        patience, min_delta, cooldown: plateau counting (:class:`Plateau`).
        lr_factor: the LR multiplier of an ``"lr"`` action, in (0, 1).
        min_lr: the LR is never lowered below this (checked against the largest LR in use).
        batch_factor: the samples per step multiplier of a ``"batch"`` action, > 1.
        max_batch_size: most samples per forward on one device (memory); ``None``: no limit.
        max_effective_batch_size: most samples per optimizer step over all devices; ``None``:
            no accumulation, growth stops at ``max_batch_size``.
        lr_scaling: how the LR follows the batch: ``"none"``, ``"linear"`` or ``"sqrt"``.
        batch_size_schedule: ``{epoch: per-device samples per optimizer step}``.
        batch_size_progress: ``{fraction of the run in (0, 1): per-device samples per optimizer
            step}``, growing; not with ``batch_size_schedule`` or a batch policy.

    Raises:
        ValueError: an argument outside its allowed range (named, with what is allowed).
        BatchPlanError: from :meth:`start`, a table or maximum the run cannot meet.

    Example::

        plan = BatchPlan("batch", patience=1, max_batch_size=512, lr_scaling="sqrt")
        plan.start(batch_size=256)
        for epoch in range(epochs):
            ...  # train with plan.setting.batch_size, lr × plan.setting.lr_scale
            decision = plan.observe(val_loss, lr=current_lr)
    """

    def __init__(
        self,
        policy: Policy = "lr",
        *,
        mode: Literal["min", "max"] = "min",
        patience: int = 2,
        min_delta: float = 0.0,
        cooldown: int = 0,
        lr_factor: float = 0.5,
        min_lr: float = 0.0,
        batch_factor: float = 2.0,
        max_batch_size: int | None = None,
        max_effective_batch_size: int | None = None,
        lr_scaling: LRScaling = "none",
        batch_size_schedule: dict[int, int] | None = None,
        batch_size_progress: dict[float, int] | None = None,
    ) -> None:
        require(policy in POLICIES, "policy", policy, f"one of {POLICIES}")
        require(is_number(lr_factor) and 0 < lr_factor < 1, "lr_factor", lr_factor, "a number in (0, 1)")
        require(is_number(min_lr) and min_lr >= 0, "min_lr", min_lr, "a number >= 0")
        require(is_number(batch_factor) and batch_factor > 1, "batch_factor", batch_factor, "a number > 1")
        for name, value in (("max_batch_size", max_batch_size), ("max_effective_batch_size", max_effective_batch_size)):
            require(value is None or (is_int(value) and value >= 1), name, value, "a positive integer or null")
        require(lr_scaling in LR_SCALINGS, "lr_scaling", lr_scaling, f"one of {LR_SCALINGS}")
        grows_on_plateau = policy in BATCH_POLICIES
        if grows_on_plateau and max_batch_size is None and max_effective_batch_size is None:
            raise ValueError(
                f"policy={policy!r} needs a limit: set max_batch_size (per device) and/or"
                " max_effective_batch_size (over all devices, with gradient accumulation)"
            )
        if grows_on_plateau and batch_size_schedule:
            raise ValueError(
                f"batch_size_schedule={batch_size_schedule!r} is not allowed with policy={policy!r}: both would set"
                " the batch size; use policy 'lr' or 'none' with a batch_size_schedule"
            )
        if batch_size_progress and (grows_on_plateau or batch_size_schedule):
            other = f"policy={policy!r}" if grows_on_plateau else f"batch_size_schedule={batch_size_schedule!r}"
            raise ValueError(
                f"batch_size_progress={batch_size_progress!r} is not allowed with {other}: both would set the batch"
                " size; use one of them (with policy 'lr' or 'none' for batch_size_progress)"
            )
        self.policy = policy
        self.plateau = Plateau(mode, patience, min_delta, cooldown)
        self.lr_factor = float(lr_factor)
        self.min_lr = float(min_lr)
        self.batch_factor = float(batch_factor)
        self.max_batch_size = max_batch_size
        self.max_effective_batch_size = max_effective_batch_size
        self.lr_scaling = lr_scaling
        self.batch_size_schedule = _check_schedule(batch_size_schedule)
        self.batch_size_progress = _check_progress(batch_size_progress)
        # progress (state_dict)
        self.batch_size: int | None = None
        self.accumulate = 1
        self.base_samples: int | None = None  # per-device samples per optimizer step at the first start
        self.lr_decay = 1.0  # product of the plateau decays
        # per run (start)
        self.epochs: dict[int, int] = self.batch_size_schedule  # {epoch: samples} of either table
        self.fixed_batch: int | None = None  # a batch the loop cannot change (growth by accumulation only)
        self.samples_cap: int | None = None  # most per-device samples per optimizer step

    @property
    def grows_batch(self) -> bool:
        """Whether any policy of this plan changes the batch."""
        return self.policy in BATCH_POLICIES or bool(self.batch_size_schedule or self.batch_size_progress)

    @property
    def lr_scale(self) -> float:
        """The multiplier on top of the scheduled learning rate: batch scaling × plateau decays."""
        ratio = 1.0
        if self.batch_size is not None and self.base_samples:
            ratio = self.batch_size * self.accumulate / self.base_samples
        return batch_lr_factor(ratio, self.lr_scaling) * self.lr_decay

    @property
    def setting(self) -> BatchSetting:
        return BatchSetting(self.batch_size, self.accumulate, self.lr_scale)

    def start(
        self,
        batch_size: int | None,
        accumulate: int = 1,
        *,
        world_size: int = 1,
        can_accumulate: bool = True,
        fixed: bool = False,
        max_epochs: int | None = None,
    ) -> BatchSetting:
        """Begin a run (a fresh one, or one resumed after :meth:`load_state_dict`).

        Args:
            batch_size: the per-device batch the run is configured with (``None``: unknown).
            accumulate: the configured gradient accumulation.
            world_size: devices, for ``max_effective_batch_size``.
            can_accumulate: False where the loop cannot accumulate gradients (then no growth
                past ``max_batch_size``).
            fixed: the loop cannot change ``batch_size``; the batch grows by accumulation only.
            max_epochs: the run's length, needed by ``batch_size_progress``.

        Returns:
            The setting to run the first epoch with (a resumed run's grown batch, or the
            schedule's epoch-0 entry).

        Raises:
            BatchPlanError: ``batch_size_progress`` cannot be met in ``max_epochs``, or does not
                grow from ``batch_size``; a batch policy's maxima are below the starting batch.
        """
        if self.batch_size_progress:
            self.epochs = progress_epochs(self.batch_size_progress, max_epochs)
        self.fixed_batch = batch_size if fixed else None
        if self.base_samples is None:  # a fresh start: the reference for lr_scaling
            self.batch_size, self.accumulate = batch_size, accumulate
            self.base_samples = None if batch_size is None else batch_size * accumulate
            first = self.epochs.get(0)
            if first is not None and batch_size is not None:
                self._set_samples(first)
            if self.batch_size_progress and self.base_samples is not None:
                _check_progress_grows(self.batch_size_progress, self.base_samples)
        elif fixed:
            self.batch_size = batch_size  # the loop's batch cannot change; the accumulation carries over
        cap = self.max_effective_batch_size
        per_device = None if cap is None or not can_accumulate else cap // max(1, world_size)
        # Without an effective maximum (or accumulation) the per-device batch is the limit; a fixed
        # batch with no effective maximum cannot grow at all.
        self.samples_cap = per_device if per_device is not None else (self.fixed_batch or self.max_batch_size)
        if self.policy in BATCH_POLICIES and not fixed and batch_size is not None:
            _check_cap_above_start(self.max_batch_size, cap, batch_size * accumulate, world_size)
        return self.setting

    def observe(self, value: float, lr: float) -> BatchDecision | None:
        """The plateau policy: count one epoch's monitored ``value``.

        Args:
            value: the monitored metric this epoch (the mean over devices).
            lr: the largest learning rate now in use, checked against ``min_lr``.

        Returns:
            ``None`` unless this epoch is a plateau; then the decision (``changed`` is False when
            batch and LR are at their limits).
        """
        if self.policy == "none" or not self.plateau.update(value):
            return None
        before = self.setting
        samples = before.samples
        if self.policy in BATCH_POLICIES and samples is not None:
            target = int(samples * self.batch_factor)
            if self.samples_cap is not None:
                target = min(target, self.samples_cap)
            if target > samples:
                self._set_samples(target)
                return BatchDecision(Reason.PLATEAU, before, self.setting)
        if self.policy in ("lr", "batch_then_lr") and lr > self.min_lr and lr > 0:
            ratio = max(lr * self.lr_factor, self.min_lr) / lr
            if ratio < 1:
                self.lr_decay *= ratio
        return BatchDecision(Reason.PLATEAU, before, self.setting)

    def at_epoch(self, epoch: int) -> BatchDecision | None:
        """The table policies: the batch from ``epoch`` on, if a table changes it there."""
        samples = self.epochs.get(epoch)
        if samples is None or self.batch_size is None:
            return None
        before = self.setting
        self._set_samples(samples)
        decision = BatchDecision(Reason.PROGRESS if self.batch_size_progress else Reason.SCHEDULE, before, self.setting)
        return decision if decision.changed else None

    def _set_samples(self, samples: int) -> None:
        self.batch_size, self.accumulate = split_samples(samples, self.max_batch_size, self.fixed_batch)

    def state_dict(self) -> dict[str, Any]:
        """Progress only: the batch, the accumulation, the LR decay and the plateau counters."""
        return {
            "batch_size": self.batch_size,
            "accumulate_grad_batches": self.accumulate,
            "base_samples": self.base_samples,
            "lr_decay": self.lr_decay,
            "best": self.plateau.best,
            "wait": self.plateau.wait,
            "cooldown_left": self.plateau.cooldown_left,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batch_size = state_dict.get("batch_size")
        self.accumulate = int(state_dict.get("accumulate_grad_batches", 1))
        self.base_samples = state_dict.get("base_samples")
        self.lr_decay = float(state_dict.get("lr_decay", 1.0))
        self.plateau.best = state_dict.get("best")
        self.plateau.wait = int(state_dict.get("wait", 0))
        self.plateau.cooldown_left = int(state_dict.get("cooldown_left", 0))


def batch_lr_factor(batch_ratio: float, rule: str) -> float:
    """The LR multiplier for a batch ``batch_ratio`` times the starting one: ``rule`` is
    ``"linear"`` (Goyal et al.), ``"sqrt"`` (Adam-type optimizers, Malladi et al.) or ``"none"``."""
    if rule == "linear":
        return batch_ratio
    if rule == "sqrt":
        return math.sqrt(batch_ratio)
    return 1.0


def split_samples(samples: int, max_batch_size: int | None, fixed_batch: int | None = None) -> tuple[int, int]:
    """``(batch_size, accumulate)`` giving about ``samples`` per optimizer step.

    The batch stays at most ``max_batch_size`` (or exactly ``fixed_batch``, a batch the loop
    cannot change); the product is ``samples`` when it divides evenly, else slightly more.
    """
    if fixed_batch is not None:
        return fixed_batch, max(1, math.ceil(samples / fixed_batch))
    if max_batch_size is None or samples <= max_batch_size:
        return samples, 1
    accumulate = math.ceil(samples / max_batch_size)
    return math.ceil(samples / accumulate), accumulate


def progress_epochs(table: dict[float, int], max_epochs: int | None) -> dict[int, int]:
    """``{epoch: samples}`` for a ``batch_size_progress`` table in a run of ``max_epochs``: each
    value applies from the first epoch that starts at or after its fraction of the run.

    Raises:
        BatchPlanError: no ``max_epochs``, a fraction that starts after the last epoch, or two
            fractions on one epoch.
    """
    if max_epochs is None or max_epochs < 1:
        raise BatchPlanError(
            f"batch_size_progress={table!r} needs the run's length in epochs, but max_epochs={max_epochs}:"
            " set trainer.max_epochs, or use batch_size_schedule ({epoch: batch_size}) instead"
        )
    epochs: dict[int, int] = {}
    for fraction in sorted(table):
        # The tolerance keeps 0.4 of 5 epochs at epoch 2 despite 0.4 * 5 = 2.0000000000000004.
        epoch = math.ceil(fraction * max_epochs - 1e-9)
        if epoch >= max_epochs:
            advice = (
                f"use fractions at most {(max_epochs - 1) / max_epochs:.3g}, or more epochs"
                if max_epochs > 1
                else "the batch can grow only in a run of 2 epochs or more"
            )
            raise BatchPlanError(
                f"batch_size_progress={table!r}: {fraction} of a {max_epochs}-epoch run starts at epoch {epoch},"
                f" after the last epoch ({max_epochs - 1}): {advice}"
            )
        if epoch in epochs:
            raise BatchPlanError(
                f"batch_size_progress={table!r}: two fractions fall on epoch {epoch} of a {max_epochs}-epoch run:"
                " space them at least 1/max_epochs apart, or use more epochs"
            )
        epochs[epoch] = table[fraction]
    return epochs


def _check_schedule(table: dict[int, int] | None) -> dict[int, int]:
    """``batch_size_schedule`` checked: epochs (YAML may give them as digit strings) to batch sizes."""
    if table is not None and not isinstance(table, dict):
        raise ValueError(
            f"batch_size_schedule={table!r} is not allowed: use a mapping of epoch to batch size,"
            " e.g. {0: 256, 10: 512}"
        )
    checked: dict[int, int] = {}
    for key, value in (table or {}).items():
        epoch = int(key) if isinstance(key, str) and key.isdigit() else key
        require(is_int(epoch) and epoch >= 0, "batch_size_schedule", table, "epochs (integers >= 0) as keys")
        require(is_int(value) and value >= 1, "batch_size_schedule", table, "positive integer batch sizes as values")
        checked[epoch] = value
    return checked


def _check_progress(table: dict[float, int] | None) -> dict[float, int]:
    """``batch_size_progress`` checked: fractions in (0, 1) as keys, growing positive batch sizes."""
    if table is not None and not isinstance(table, dict):
        raise ValueError(
            f"batch_size_progress={table!r} is not allowed: use a mapping of run fraction to batch size,"
            " e.g. {0.4: 512, 0.7: 1024}"
        )
    checked: dict[float, int] = {}
    for key, value in (table or {}).items():
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
    require(all(a < b for a, b in zip(values, values[1:])), "batch_size_progress", table, "batch sizes that grow")
    return checked


def _check_progress_grows(table: dict[float, int], start: int) -> None:
    first = table[min(table)]
    if first <= start:
        raise BatchPlanError(
            f"batch_size_progress={table!r} cannot grow the batch: the run starts at {start} samples per optimizer"
            f" step on each device and the first value is {first}. Use values above {start}, or a smaller"
            " starting batch (data.batch_size)"
        )


def _check_cap_above_start(max_batch_size: int | None, max_effective: int | None, start: int, world_size: int) -> None:
    """A batch policy whose maxima are below the batch the run starts with could never grow it."""
    limits = []
    if max_batch_size is not None and max_effective is None and max_batch_size < start:
        limits.append(f"max_batch_size={max_batch_size} (per device)")
    if max_effective is not None and max_effective < start * world_size:
        limits.append(f"max_effective_batch_size={max_effective} (over {world_size} device(s))")
    if limits:
        raise BatchPlanError(
            f"cannot grow the batch: {' and '.join(limits)} is below the {start} samples per optimizer step on each"
            " device the run starts with. Raise the maximum above it, or start from a smaller batch (data.batch_size)"
        )
