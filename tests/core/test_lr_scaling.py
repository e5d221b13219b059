"""The one LR rescaler: every LR an optimizer and its schedulers hold, and a multiplier kept on top."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, OneCycleLR, ReduceLROnPlateau, SequentialLR

from lit_accel.core.lr_scaling import DYNAMIC_LR_SCALE_KEY, apply_lr_scale, scale_learning_rates


def _adam(lr: Any = 0.1) -> torch.optim.Optimizer:
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _sgd(groups: int = 1, lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(groups)], lr=lr)


# --------------------------------------------------------------------------- scale_learning_rates
@pytest.mark.parametrize("floors", [True, False])
def test_every_lr_is_scaled_and_floors_only_when_asked(floors: bool) -> None:
    optimizer = _adam()
    cosine = CosineAnnealingLR(optimizer, T_max=10, eta_min=0.01)
    plateau = ReduceLROnPlateau(optimizer, min_lr=0.002)
    scale_learning_rates(optimizer, [cosine, plateau], 0.5, floors=floors)
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.05) and group["initial_lr"] == pytest.approx(0.05)
    assert cosine.base_lrs == pytest.approx([0.05]) and cosine.get_last_lr() == pytest.approx([0.05])
    assert cosine.eta_min == pytest.approx(0.005 if floors else 0.01)
    assert plateau.min_lrs == pytest.approx([0.001 if floors else 0.002])


def test_only_the_given_param_groups_and_their_scheduler_entries_are_scaled() -> None:
    optimizer = _sgd(groups=2)
    cosine = CosineAnnealingLR(optimizer, T_max=10, eta_min=0.01)
    scale_learning_rates(optimizer, [cosine], 0.5, floors=True, groups=[1])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.05])
    assert cosine.base_lrs == pytest.approx([0.1, 0.05])
    assert cosine.eta_min == pytest.approx(0.01), "one floor for every group: not scaled for some"


def test_nested_schedulers_are_followed() -> None:
    optimizer = _adam()
    warmup = LinearLR(optimizer, start_factor=0.1, total_iters=2)
    cosine = CosineAnnealingLR(optimizer, T_max=10, eta_min=0.01)
    sequential = SequentialLR(optimizer, [warmup, cosine], milestones=[2])
    scale_learning_rates(optimizer, [sequential], 2.0, floors=True)
    assert warmup.base_lrs == pytest.approx([0.2]) and cosine.base_lrs == pytest.approx([0.2])
    assert cosine.eta_min == pytest.approx(0.02)


def test_tensor_lrs_are_scaled_once_in_place() -> None:
    """Fused/capturable optimizers read the LR tensor itself; older torch schedulers keep the
    group's own tensors in base_lrs/_last_lr, where an in-place product would scale them twice."""
    optimizer = _adam(lr=torch.tensor(0.1))
    group = optimizer.param_groups[0]
    lr_tensor = group["lr"]
    scheduler = CosineAnnealingLR(optimizer, T_max=10)
    scheduler.base_lrs, scheduler._last_lr = [group["initial_lr"]], [group["lr"]]  # as torch < 2.9 does
    scale_learning_rates(optimizer, [scheduler], 0.5, floors=True)
    assert optimizer.param_groups[0]["lr"] is lr_tensor and float(lr_tensor) == pytest.approx(0.05)
    assert float(optimizer.param_groups[0]["initial_lr"]) == pytest.approx(0.05)
    assert [float(v) for v in scheduler.base_lrs] == pytest.approx([0.05])
    assert [float(v) for v in scheduler.get_last_lr()] == pytest.approx([0.05])


# -------------------------------------------------------------------------------- apply_lr_scale
def test_the_multiplier_is_applied_once_and_recorded_in_every_group() -> None:
    optimizer = _sgd(groups=2)
    assert apply_lr_scale(optimizer, [], 1.0) is False, "a fresh optimizer holds the multiplier 1"
    assert apply_lr_scale(optimizer, [], 2.0) is True
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.2, 0.2])
    assert [g[DYNAMIC_LR_SCALE_KEY] for g in optimizer.param_groups] == [2.0, 2.0]
    assert apply_lr_scale(optimizer, [], 2.0) is False
    assert apply_lr_scale(optimizer, [], 0.5) is True
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.05])


def test_a_group_added_later_gets_the_multiplier_and_the_others_keep_theirs() -> None:
    optimizer = _sgd()
    apply_lr_scale(optimizer, [], 2.0)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1})  # as BackboneFinetuning
    assert apply_lr_scale(optimizer, [], 2.0) is True
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.2, 0.2])


def test_restored_older_groups_get_the_multiplier_again_and_a_restorers_backoff_stays() -> None:
    """A rollback copies older param groups back (their entry included) and multiplies the LRs by
    its backoff without touching the entry: the next call gives target × backoff."""
    optimizer = _sgd()
    saved = copy.deepcopy(optimizer.state_dict())  # before any multiplier: no entry
    apply_lr_scale(optimizer, [], 4.0)
    optimizer.load_state_dict(saved)  # the saved groups replace the live ones: no entry
    optimizer.param_groups[0]["lr"] *= 0.5  # the restorer's backoff
    assert apply_lr_scale(optimizer, [], 4.0) is True
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 4.0 * 0.5)
    optimizer.param_groups[0]["lr"] *= 0.5  # a second backoff, entry untouched
    assert apply_lr_scale(optimizer, [], 4.0) is False and optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_a_chainable_schedule_with_a_floor_keeps_its_shape_under_the_multiplier() -> None:
    """Cosine with eta_min: after a change to the multiplier the LR is exactly multiplier × cosine(step)."""
    t_max, eta_min, base = 6, 0.01, 0.1
    optimizer = _sgd(lr=base)
    cosine = CosineAnnealingLR(optimizer, T_max=t_max, eta_min=eta_min)
    scales = [1, 1, 1, 0.5, 0.5, 2.0]
    for step, scale in enumerate(scales):
        apply_lr_scale(optimizer, [cosine], scale)
        expected = eta_min + (base - eta_min) * (1 + math.cos(math.pi * step / t_max)) / 2
        assert optimizer.param_groups[0]["lr"] == pytest.approx(scale * expected, rel=1e-9), step
        optimizer.step()
        cosine.step()


def test_a_closed_form_schedule_keeps_its_shape_under_the_multiplier() -> None:
    """OneCycleLR keeps its peak and end in the param group (max_lr, min_lr): they move too."""
    kwargs = {"max_lr": 0.1, "total_steps": 12}
    optimizer, reference = _sgd(), _sgd()
    onecycle, reference_onecycle = OneCycleLR(optimizer, **kwargs), OneCycleLR(reference, **kwargs)
    for step in range(12):
        scale = 1.0 if step < 5 else 3.0
        apply_lr_scale(optimizer, [onecycle], scale)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(scale * reference.param_groups[0]["lr"], rel=1e-9)
        for opt, sched in ((optimizer, onecycle), (reference, reference_onecycle)):
            opt.step()
            sched.step()
