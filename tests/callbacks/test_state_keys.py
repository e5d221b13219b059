"""Callback state survives a resume with changed settings; older keys are adopted (issue #13)."""

from __future__ import annotations

import pytest

from lit_accel.callbacks import DivergenceGuard, DynamicBatchLR, ThroughputMeter
from lit_accel.core.state_keys import adopt_older_state, identity_state_key


def test_identity_key_lists_only_what_is_given():
    assert identity_state_key("Meter") == "Meter"
    assert identity_state_key("Meter", name=None) == "Meter"
    assert identity_state_key("Meter", name="a") == "Meter{'name': 'a'}"
    assert (
        identity_state_key("DynamicBatchLR", monitor="val/loss", mode="min")
        == "DynamicBatchLR{'monitor': 'val/loss', 'mode': 'min'}"
    )


def test_older_key_adopted_only_when_it_is_the_one_match():
    older = "DynamicBatchLR{'monitor': 'val/loss', 'mode': 'min', 'policy': 'lr'}"
    checkpoint = {
        "callbacks": {
            older: {"batch_size": 64},
            "DynamicBatchLR{'monitor': 'val/acc', 'mode': 'max', 'policy': 'lr'}": {},
        }
    }
    key = identity_state_key("DynamicBatchLR", monitor="val/loss", mode="min")
    assert adopt_older_state(checkpoint, key, "DynamicBatchLR", monitor="val/loss", mode="min") == older
    assert checkpoint["callbacks"][key] == {"batch_size": 64}
    # Already filed under the current key: nothing to do.
    assert adopt_older_state(checkpoint, key, "DynamicBatchLR", monitor="val/loss", mode="min") is None
    # Two candidates: ambiguous, none adopted.
    two = {"callbacks": {"ThroughputMeter{'warmup_steps': 1}": {}, "ThroughputMeter{'warmup_steps': 2}": {}}}
    assert (
        adopt_older_state(two, "ThroughputMeter", "ThroughputMeter") is None
        and "ThroughputMeter" not in two["callbacks"]
    )
    # Another class whose name starts the same, a malformed key, a named instance's state: never.
    others = {
        "callbacks": {"ThroughputMeterX{'a': 1}": {}, "ThroughputMeter{oops": {}, "ThroughputMeter{'name': 'b'}": {}}
    }
    assert adopt_older_state(others, "ThroughputMeter", "ThroughputMeter") is None
    assert adopt_older_state({}, "ThroughputMeter", "ThroughputMeter") is None


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
