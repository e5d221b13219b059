"""Callback state survives a resume with changed settings: keys name identity only (issue #13)."""

from __future__ import annotations

import pytest

from lit_accel.callbacks import DivergenceGuard, DynamicBatchLR, ThroughputMeter
from lit_accel.core.state_keys import identity_state_key


def test_identity_key_lists_only_what_is_given():
    assert identity_state_key("Meter") == "Meter"
    assert identity_state_key("Meter", name=None) == "Meter"
    assert identity_state_key("Meter", name="a") == "Meter{'name': 'a'}"
    assert (
        identity_state_key("DynamicBatchLR", monitor="val/loss", mode="min")
        == "DynamicBatchLR{'monitor': 'val/loss', 'mode': 'min'}"
    )


@pytest.mark.parametrize("make", [lambda n: DivergenceGuard(name=n), lambda n: ThroughputMeter(name=n)])
@pytest.mark.parametrize("bad", ["", 3, True])
def test_bad_names_are_refused(make, bad):
    with pytest.raises(ValueError, match=f"name={bad!r} is not allowed"):
        make(bad)


def test_dynamic_batch_lr_key_ignores_policy_and_settings():
    assert (
        DynamicBatchLR(policy="lr", patience=1).state_key
        == DynamicBatchLR(policy="batch_then_lr", patience=4, max_batch_size=512).state_key
    )
