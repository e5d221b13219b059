"""The callbacks' shared protocol (BatchSizeListener) and argument checks; the LR rescaler is tested in
tests/core/test_lr_scaling.py."""

from __future__ import annotations

from typing import Any

import pytest
from lightning.pytorch.callbacks import Callback

from lit_accel.callbacks.shared import BatchSizeListener, notify_batch_size_changed
from lit_accel.core.checks import check_int


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
