"""What lit_accel's callbacks share: argument checks, the one learning-rate rescaler, the batch-size protocol.

DivergenceGuard (LR back-off and re-warm after a rollback) and DynamicBatchLR (LR decay, batch
scaling rules) both rescale every learning rate a run holds; they do it here, through
:func:`scale_learning_rates`, with the one difference between them made explicit by its
``floors`` argument. The cross-callback protocols live here as types: :class:`BatchSizeListener`
(DynamicBatchLR tells other callbacks the batch size changed) and :data:`DYNAMIC_LR_SCALE_KEY`
(the param-group entry holding the multiplier DynamicBatchLR baked into that group's LRs, which the
guard's snapshot restores with the LRs).

Imports only the standard library, torch and lightning, so a callback module plus this file (and
``_state_keys.py``) can be copied into another project.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any, Protocol, TypeGuard, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

__all__ = [
    "DYNAMIC_LR_SCALE_KEY",
    "GROUP_LR_KEYS",
    "BatchSizeListener",
    "RunSettingsError",
    "check_int",
    "fmt",
    "is_int",
    "is_number",
    "local_tensor",
    "notify_batch_size_changed",
    "require",
    "scale_learning_rates",
]


class RunSettingsError(MisconfigurationException, ValueError):
    """A callback setting that does not fit the run, found when training starts (the run's length,
    its batch, its strategy). A ``ValueError`` for Python callers; a ``MisconfigurationException``
    so that ``lit-accel`` (and any LightningCLI front end that reports those) prints one message
    and exits with status 2 instead of a traceback."""


# Learning-rate entries of an optimizer's param groups: the LR itself, the schedulers' starting
# value (initial_lr), OneCycleLR's peak and end (max_lr, min_lr: derived from initial_lr by its
# div factors, so they move with it).
GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
# Learning-rate lists of torch schedulers: base_lrs (all), max_lrs (CyclicLR), _last_lr (get_last_lr()).
SCHEDULER_LR_LISTS = ("base_lrs", "max_lrs", "_last_lr")
# Lower bounds a user sets on a schedule: min_lrs (ReduceLROnPlateau), eta_min (the cosine schedules).
SCHEDULER_FLOOR_LISTS = ("min_lrs",)
SCHEDULER_FLOOR_SCALARS = ("eta_min",)
# The param-group entry holding the multiplier DynamicBatchLR has baked into that group's LRs.
DYNAMIC_LR_SCALE_KEY = "dynamic_lr_scale"


# ---------------------------------------------------------------------------- learning rates
def scale_learning_rates(
    optimizer: torch.optim.Optimizer,
    schedulers: Iterable[Any],
    factor: float,
    *,
    floors: bool,
    groups: Collection[int] | None = None,
) -> None:
    """Multiply every learning rate ``optimizer`` and ``schedulers`` hold by ``factor``.

    Param-group entries (:data:`GROUP_LR_KEYS`) are scaled in place when they are tensors (fused
    and capturable optimizers read the LR from that tensor). Scheduler entries get new values,
    except a tensor that is one of those group entries: older torch releases put the group's own
    tensors in ``base_lrs``/``_last_lr`` (newer ones copy them), and those are scaled already.
    Nested schedulers (``SequentialLR``, ``ChainedScheduler``) are followed.

    Args:
        optimizer: the optimizer whose param groups are rescaled.
        schedulers: the schedulers stepping it (others are the caller's to leave out).
        factor: the multiplier, > 0.
        floors: also scale the schedules' lower bounds (``eta_min``, ``min_lrs``). ``True`` when
            the whole schedule moves with the LR (DynamicBatchLR: a schedule for a larger batch is
            the same schedule at a larger LR); ``False`` when the LR alone is backed off and the
            user's floor stays the floor (DivergenceGuard).
        groups: the indices of the param groups to rescale (and the same entries of the
            schedulers' per-group lists); ``None``: all. Per-optimizer scalars (a single
            ``eta_min``) are scaled only with all groups.
    """
    scaled: set[int] = set()  # ids of the tensors scaled in place
    every_group = range(len(optimizer.param_groups))
    chosen = set(every_group if groups is None else groups)
    for index, group in enumerate(optimizer.param_groups):
        if index not in chosen:
            continue
        for key in GROUP_LR_KEYS:
            value = group.get(key)
            if isinstance(value, Tensor):
                if id(value) not in scaled:
                    value.mul_(factor)
                    scaled.add(id(value))
            elif is_number(value):
                group[key] = value * factor
    lists = SCHEDULER_LR_LISTS + (SCHEDULER_FLOOR_LISTS if floors else ())
    scalars = SCHEDULER_FLOOR_SCALARS if floors and chosen >= set(every_group) else ()
    todo = list(schedulers)
    while todo:
        scheduler = todo.pop()
        todo.extend(getattr(scheduler, "_schedulers", None) or ())
        for attr in lists:
            values = getattr(scheduler, attr, None)
            if isinstance(values, list):
                setattr(
                    scheduler, attr, [_times(v, factor, scaled) if i in chosen else v for i, v in enumerate(values)]
                )
        for attr in scalars:
            value = getattr(scheduler, attr, None)
            if isinstance(value, Tensor) or is_number(value):
                setattr(scheduler, attr, _times(value, factor, scaled))


def _times(value: Any, factor: float, scaled: set[int]) -> Any:
    if isinstance(value, Tensor):
        return value if id(value) in scaled else value * factor
    return value * factor if is_number(value) else value


# ------------------------------------------------------------------------------- batch size
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


# -------------------------------------------------------------------------------- arguments
def is_int(value: object) -> TypeGuard[int]:
    """An int, not a bool (``True`` is an int to Python, never a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require(ok: bool, name: str, value: object, allowed: str) -> None:
    """Raise ``ValueError`` naming the argument, its value and what is allowed, unless ``ok``."""
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: use {allowed}")


def check_int(name: str, value: object, minimum: int, extra: str = "") -> None:
    """``value`` is an int (not a bool) >= ``minimum``; ``extra`` says more about the setting."""
    require(is_int(value) and value >= minimum, name, value, f"an integer >= {minimum}{' ' + extra if extra else ''}")


# ------------------------------------------------------------------------------------ misc
def fmt(value: float | None) -> str:
    """A metric for a message: 4 significant digits, ``n/a`` when there is none."""
    return "n/a" if value is None else f"{value:.4g}"


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2, tensor parallel), the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
