"""The callbacks' shared helpers: the one LR rescaler (with and without floors), the batch-size protocol, checks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, ReduceLROnPlateau, SequentialLR

from lit_accel.callbacks.shared import BatchSizeListener, notify_batch_size_changed
from lit_accel.core.checks import check_int
from lit_accel.core.lr_scaling import scale_learning_rates


def _adam(lr: Any = 0.1) -> torch.optim.Optimizer:
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=lr)


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
    optimizer = torch.optim.SGD(
        [{"params": [torch.nn.Parameter(torch.zeros(1))]}, {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=0.1
    )
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


def test_batch_size_listeners_are_told_and_others_left_alone() -> None:
    class Listener(Callback):
        def __init__(self) -> None:
            self.sizes: list[int] = []

        def on_batch_size_changed(self, trainer: Any, pl_module: Any, batch_size: int) -> None:
            self.sizes.append(batch_size)

    class Trainer:  # only .callbacks is read
        def __init__(self, callbacks: list[Callback]) -> None:
            self.callbacks = callbacks

    sender, listener, bystander = Listener(), Listener(), Callback()
    assert isinstance(listener, BatchSizeListener) and not isinstance(bystander, BatchSizeListener)
    notify_batch_size_changed(Trainer([sender, listener, bystander]), None, 512, exclude=sender)  # type: ignore[arg-type]
    assert listener.sizes == [512] and sender.sizes == []


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3", None])
def test_check_int_names_the_value_and_what_is_allowed(value: Any) -> None:
    with pytest.raises(ValueError, match=r"patience=.* is not allowed: use an integer >= 1 \(epochs\)"):
        check_int("patience", value, 1, "(epochs)")
    check_int("patience", 3, 1)
