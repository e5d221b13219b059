"""The one learning-rate rescaler: every LR an optimizer and its schedulers hold, times a factor.

DivergenceGuard (LR back-off and re-warm after a rollback) and DynamicBatchLR (LR decay, batch
scaling rules) both rescale through :func:`scale_learning_rates`; the one difference between them
is explicit in its ``floors`` argument. :func:`apply_lr_scale` keeps a multiplier on top of any
schedule, recorded in each param group so that a restorer of older param groups (a rollback)
and the multiplier never disagree. Imports torch and the standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any

import torch
from torch import Tensor

from lit_accel.core.checks import is_number

__all__ = ["DYNAMIC_LR_SCALE_KEY", "GROUP_LR_KEYS", "apply_lr_scale", "scale_learning_rates"]

# Learning-rate entries of an optimizer's param groups: the LR itself, the schedulers' starting
# value (initial_lr), OneCycleLR's peak and end (max_lr, min_lr: derived from initial_lr by its
# div factors, so they move with it).
GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
# Learning-rate lists of torch schedulers: base_lrs (all), max_lrs (CyclicLR), _last_lr (get_last_lr()).
SCHEDULER_LR_LISTS = ("base_lrs", "max_lrs", "_last_lr")
# Lower bounds a user sets on a schedule: min_lrs (ReduceLROnPlateau), eta_min (the cosine schedules).
SCHEDULER_FLOOR_LISTS = ("min_lrs",)
SCHEDULER_FLOOR_SCALARS = ("eta_min",)
# The param-group entry holding the multiplier apply_lr_scale (DynamicBatchLR) has baked into that
# group's LRs; a group without it holds none (1): a fresh optimizer, or a group added since.
DYNAMIC_LR_SCALE_KEY = "dynamic_lr_scale"


def apply_lr_scale(optimizer: torch.optim.Optimizer, schedulers: Iterable[Any], target: float) -> bool:
    """Make ``target`` the multiplier baked into every param group's learning rates.

    A group's current multiplier is its :data:`DYNAMIC_LR_SCALE_KEY` entry (1 without one); a
    group whose entry differs is rescaled by ``target / entry`` with its schedulers' entries, the
    schedule's floors included (:func:`scale_learning_rates` with ``floors=True``: a schedule for
    a larger batch is the same schedule at a larger LR), and its entry becomes ``target``. Closed-form
    and chainable torch schedules then give exactly ``target × schedule(step)``. Call it before
    every step: a no-op costs one lookup per group, and after another callback restored older param
    groups (entry included) or multiplied the LRs on its own (entry untouched), the next call again
    gives ``target ×`` whatever that callback did. A restorer should copy the param groups exactly,
    removing entries it did not save.

    Args:
        optimizer: the optimizer whose param groups are brought to ``target``.
        schedulers: the schedulers stepping it.
        target: the multiplier, > 0.

    Returns:
        True if any learning rate changed.

    Example::

        apply_lr_scale(optimizer, [scheduler], plan.lr_scale)  # before each optimizer step
    """
    by_ratio: dict[float, list[int]] = {}
    for index, group in enumerate(optimizer.param_groups):
        applied = float(group.get(DYNAMIC_LR_SCALE_KEY, 1.0))
        if not math.isclose(target, applied, rel_tol=1e-12):
            by_ratio.setdefault(target / applied, []).append(index)
    if not by_ratio:
        return False
    schedulers = list(schedulers)
    for ratio, indices in by_ratio.items():
        scale_learning_rates(optimizer, schedulers, ratio, floors=True, groups=indices)
    for group in optimizer.param_groups:
        group[DYNAMIC_LR_SCALE_KEY] = target
    return True


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
