"""BatchPlan, the engine under DynamicBatchLR: numbers in (metric, LR, epoch), a decision out."""

from __future__ import annotations

import math

import pytest

from lit_accel.core.batch_plan import (
    BatchPlan,
    BatchPlanError,
    BatchSetting,
    Plateau,
    Reason,
    batch_lr_factor,
    progress_epochs,
    split_samples,
)

LR = 0.1  # the scheduled learning rate the plan's multiplier applies to


def _plateaus(values, **kwargs) -> list[int]:
    plateau = Plateau(**kwargs)
    return [epoch for epoch, value in enumerate(values) if plateau.update(value)]


def _run(plan: BatchPlan, values) -> list[BatchSetting]:
    """Each epoch's setting after observing ``values`` (the LR in use being LR × the multiplier)."""
    settings = []
    for value in values:
        plan.observe(value, LR * plan.lr_scale)
        settings.append(plan.setting)
    return settings


# ------------------------------------------------------------------------------------- plateau
def test_plateau_counts_patience_epochs_without_improvement():
    plateau = Plateau("min", patience=2)
    assert [plateau.update(v) for v in [1.0, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8]] == [False] * 3 + [True] + [False] * 2 + [
        True
    ]
    assert plateau.best == 0.8


def test_plateau_cooldown_skips_epochs_after_one():
    assert _plateaus([1.0] * 9, patience=2, cooldown=0) == [2, 4, 6, 8]
    assert _plateaus([1.0] * 9, patience=2, cooldown=1) == [2, 5, 8]


def test_plateau_mode_max_and_min_delta():
    # +0.05 steps are not improvements with min_delta=0.1
    assert _plateaus([0.5, 0.55, 0.6, 0.65], mode="max", patience=2, min_delta=0.1) == [2]
    assert _plateaus([0.5, 0.55, 0.6, 0.65], mode="max", patience=2, min_delta=0.0) == []
    assert _plateaus([1.0, 0.95, 0.9, 0.85], mode="min", patience=2, min_delta=0.1) == [2]


def test_plateau_nan_never_improves():
    plateau = Plateau(patience=2)
    assert [plateau.update(v) for v in [float("nan"), float("nan"), 1.0]] == [False, True, False]
    assert plateau.best == 1.0


# ---------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize(
    ("samples", "max_batch", "fixed", "expected"),
    [
        (8, None, None, (8, 1)),
        (8, 8, None, (8, 1)),
        (16, 8, None, (8, 2)),
        (24, 16, None, (12, 2)),
        (25, 16, None, (13, 2)),
        (16, None, 4, (4, 4)),
        (10, None, 4, (4, 3)),
    ],
)
def test_split_samples(samples, max_batch, fixed, expected):
    assert split_samples(samples, max_batch, fixed) == expected


def test_batch_lr_factor():
    assert batch_lr_factor(4.0, "linear") == 4.0
    assert batch_lr_factor(4.0, "sqrt") == 2.0
    assert batch_lr_factor(4.0, "none") == 1.0


def test_progress_table_in_epochs_follows_the_run_length():
    assert progress_epochs({0.4: 512}, 5) == {2: 512}
    assert progress_epochs({0.4: 512}, 10) == {4: 512}
    assert progress_epochs({0.4: 512}, 3) == {2: 512}  # epoch 1 starts at 1/3 < 0.4 of the run
    assert progress_epochs({0.2: 512, 0.6: 1024}, 5) == {1: 512, 3: 1024}
    assert progress_epochs({0.3: 512, 0.7: 1024}, 20) == {6: 512, 14: 1024}


@pytest.mark.parametrize(
    ("table", "max_epochs", "message"),
    [
        ({0.5: 512}, None, r"needs the run's length in epochs, but max_epochs=None: set trainer.max_epochs"),
        ({0.5: 512}, -1, r"max_epochs=-1"),
        (
            {0.9: 512},
            5,
            r"0.9 of a 5-epoch run starts at epoch 5, after the last epoch \(4\): use fractions at most 0.8",
        ),
        ({0.5: 512}, 1, r"0.5 of a 1-epoch run starts at epoch 1.*only in a run of 2 epochs or more"),
        ({0.3: 512, 0.35: 1024}, 5, r"two fractions fall on epoch 2 of a 5-epoch run"),
    ],
)
def test_a_progress_table_the_run_cannot_meet_is_one_error(table, max_epochs, message):
    with pytest.raises(BatchPlanError, match=message):
        progress_epochs(table, max_epochs)
    assert issubclass(BatchPlanError, ValueError)


# ------------------------------------------------------------------------------ the policies
def test_lr_policy_decays_at_each_plateau_after_the_cooldown():
    plan = BatchPlan("lr", patience=2, cooldown=1, lr_factor=0.5)
    plan.start(4)
    # best 0.9 at epoch 1; epoch 3 is the 2nd without improvement; cooldown ignores epoch 4.
    scales = [s.lr_scale for s in _run(plan, [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])]
    assert scales == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25])
    assert plan.batch_size == 4


def test_lr_policy_stops_at_min_lr_and_then_reports_nothing_left():
    plan = BatchPlan("lr", patience=1, lr_factor=0.5, min_lr=0.03)
    plan.start(4)
    decisions = [plan.observe(1.0, LR * plan.lr_scale) for _ in range(4)]
    assert decisions[0] is None  # the first value is the best so far
    assert [d.after.lr_scale for d in decisions[1:]] == pytest.approx([0.5, 0.3, 0.3])  # 0.1 -> 0.05 -> 0.03
    assert [d.changed for d in decisions[1:]] == [True, True, False]
    assert decisions[3].reason is Reason.PLATEAU


def test_batch_policy_grows_past_the_device_maximum_by_accumulation_and_scales_the_lr():
    plan = BatchPlan(
        "batch", patience=1, batch_factor=2.0, max_batch_size=8, max_effective_batch_size=32, lr_scaling="linear"
    )
    assert plan.start(4) == BatchSetting(4, 1, 1.0)
    settings = _run(plan, [1.0] * 6)
    # samples per step 4 -> 8 -> 16 -> 32, then capped: a plateau with nothing left to change
    assert [(s.batch_size, s.accumulate) for s in settings] == [(4, 1), (8, 1), (8, 2), (8, 4), (8, 4), (8, 4)]
    assert [s.lr_scale for s in settings] == pytest.approx([1, 2, 4, 8, 8, 8])
    last = plan.observe(1.0, LR)
    assert last is not None and not last.changed


def test_the_effective_maximum_is_shared_by_the_devices():
    plan = BatchPlan("batch", patience=1, max_batch_size=8, max_effective_batch_size=32)
    plan.start(4, world_size=2)
    assert [s.samples for s in _run(plan, [1.0] * 4)] == [4, 8, 16, 16]  # 32 over 2 devices


def test_without_accumulation_growth_stops_at_the_device_maximum():
    plan = BatchPlan("batch", patience=1, max_batch_size=8, max_effective_batch_size=32)
    plan.start(4, can_accumulate=False)
    assert [(s.batch_size, s.accumulate) for s in _run(plan, [1.0] * 4)] == [(4, 1), (8, 1), (8, 1), (8, 1)]


def test_batch_then_lr_grows_to_the_maximum_then_decays():
    plan = BatchPlan("batch_then_lr", patience=1, max_batch_size=8, lr_factor=0.5)
    plan.start(4)
    settings = _run(plan, [1.0] * 5)
    assert [s.batch_size for s in settings] == [4, 8, 8, 8, 8]
    assert [s.lr_scale for s in settings] == pytest.approx([1, 1, 0.5, 0.25, 0.125])  # lr_scaling none


@pytest.mark.parametrize(("max_effective", "expected"), [(16, [1, 2, 4, 4]), (None, [1, 1, 1, 1])])
def test_a_fixed_batch_grows_only_by_accumulation(max_effective, expected):
    plan = BatchPlan("batch", patience=1, max_batch_size=64, max_effective_batch_size=max_effective)
    plan.start(4, fixed=True)
    settings = _run(plan, [1.0] * 4)
    assert [s.batch_size for s in settings] == [4] * 4
    assert [s.accumulate for s in settings] == expected


def test_the_schedule_table_sets_the_batch_from_its_epochs():
    plan = BatchPlan("none", batch_size_schedule={0: 2, 2: 8, 3: 16}, max_batch_size=8, lr_scaling="sqrt")
    assert plan.start(4) == BatchSetting(2, 1, pytest.approx(math.sqrt(2 / 4)))  # the epoch-0 entry
    assert plan.at_epoch(1) is None
    grown = plan.at_epoch(2)
    assert grown is not None and grown.reason is Reason.SCHEDULE
    assert (grown.before.batch_size, grown.after.batch_size) == (2, 8)
    assert grown.after.lr_scale == pytest.approx(math.sqrt(8 / 4))  # relative to the configured 4
    accumulated = plan.at_epoch(3)
    assert accumulated is not None and (accumulated.after.batch_size, accumulated.after.accumulate) == (8, 2)
    assert plan.observe(1.0, LR) is None, "policy none: no plateau rule"


def test_the_progress_table_acts_at_its_fractions_of_the_run():
    plan = BatchPlan("none", batch_size_progress={0.4: 8, 0.8: 16}, lr_scaling="sqrt")
    plan.start(4, max_epochs=5)
    decisions = {epoch: plan.at_epoch(epoch) for epoch in range(1, 5)}
    assert [epoch for epoch, d in decisions.items() if d is not None] == [2, 4]
    assert all(d.reason is Reason.PROGRESS for d in decisions.values() if d is not None)
    assert plan.setting == BatchSetting(16, 1, pytest.approx(2.0))


def test_the_plateau_and_the_tables_combine():
    plan = BatchPlan("lr", patience=1, batch_size_schedule={1: 8}, lr_scaling="linear")
    plan.start(4)
    assert plan.observe(1.0, LR) is None
    table = plan.at_epoch(1)
    assert table is not None and table.after.lr_scale == pytest.approx(2.0)
    decay = plan.observe(1.0, LR * plan.lr_scale)
    assert decay is not None and decay.after == BatchSetting(8, 1, pytest.approx(1.0))  # 2 × 0.5


# ------------------------------------------------------------------------------- at the start
def test_a_progress_table_must_grow_from_the_starting_batch():
    plan = BatchPlan("none", batch_size_progress={0.4: 8})
    with pytest.raises(BatchPlanError, match="cannot grow the batch: the run starts at 8 samples per optimizer step"):
        plan.start(8, max_epochs=5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 4}, r"max_batch_size=4 \(per device\) is below the 8 samples per optimizer step"),
        ({"max_batch_size": 4, "max_effective_batch_size": 6}, r"max_effective_batch_size=6 \(over 1 device\(s\)\)"),
    ],
)
def test_maxima_below_the_starting_batch_are_one_error(kwargs, message):
    with pytest.raises(BatchPlanError, match=message):
        BatchPlan("batch", **kwargs).start(8)


def test_a_device_maximum_below_the_start_is_fine_when_accumulation_takes_the_batch_further():
    plan = BatchPlan("batch", patience=1, max_batch_size=4, max_effective_batch_size=16)
    plan.start(8)
    assert [(s.batch_size, s.accumulate) for s in _run(plan, [1.0] * 2)] == [(8, 1), (4, 4)]  # 16 within 4 per forward


# ------------------------------------------------------------------------------------ resume
# The state format of DynamicBatchLR checkpoints (its state_dict adds applied_lr_scale).
SAVED = {
    "batch_size": 8,
    "accumulate_grad_batches": 2,
    "base_samples": 4,
    "lr_decay": 0.5,
    "best": 0.9,
    "wait": 1,
    "cooldown_left": 0,
}


def test_state_round_trip_and_defaults_for_missing_keys():
    plan = BatchPlan("batch_then_lr", patience=2, max_batch_size=8, max_effective_batch_size=16)
    plan.load_state_dict(SAVED)
    assert plan.state_dict() == SAVED
    assert plan.lr_scale == 0.5
    empty = BatchPlan()
    empty.load_state_dict({})
    assert empty.state_dict() == {
        "batch_size": None,
        "accumulate_grad_batches": 1,
        "base_samples": None,
        "lr_decay": 1.0,
        "best": None,
        "wait": 0,
        "cooldown_left": 0,
    }


def test_a_resumed_plan_keeps_its_batch_and_counters():
    plan = BatchPlan("batch_then_lr", patience=2, max_batch_size=8, max_effective_batch_size=16)
    plan.load_state_dict(SAVED)
    assert plan.start(4) == BatchSetting(8, 2, 0.5), "the configured batch does not replace the saved one"
    # wait 1 was saved: one more epoch without improvement is the plateau; at the maximum, the LR decays
    decision = plan.observe(1.0, LR * plan.lr_scale)
    assert decision is not None and decision.after == BatchSetting(8, 2, 0.25)


def test_a_resumed_progress_plan_does_not_check_its_grown_batch_against_the_table():
    plan = BatchPlan("none", batch_size_progress={0.4: 8, 0.8: 16})
    plan.load_state_dict({"batch_size": 16, "base_samples": 4})
    assert plan.start(4, max_epochs=5).batch_size == 16
    assert plan.at_epoch(4) is None, "already at the table's value"


def test_a_resumed_fixed_batch_keeps_the_accumulation():
    plan = BatchPlan("batch", max_effective_batch_size=16)
    plan.load_state_dict({"batch_size": 4, "accumulate_grad_batches": 4, "base_samples": 4})
    assert plan.start(4, fixed=True) == BatchSetting(4, 4, 1.0)


# --------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mode": "up"}, "mode"),
        ({"policy": "grow"}, "policy"),
        ({"patience": 0}, "patience"),
        ({"min_delta": -1.0}, "min_delta"),
        ({"cooldown": -1}, "cooldown"),
        ({"lr_factor": 1.0}, "lr_factor"),
        ({"lr_factor": 0.0}, "lr_factor"),
        ({"min_lr": -0.1}, "min_lr"),
        ({"batch_factor": 1.0}, "batch_factor"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_effective_batch_size": -4}, "max_effective_batch_size"),
        ({"lr_scaling": "cubic"}, "lr_scaling"),
        ({"policy": "batch"}, "policy='batch' needs a limit"),
        ({"policy": "batch", "max_batch_size": 8, "batch_size_schedule": {2: 8}}, "batch_size_schedule"),
        ({"batch_size_schedule": {-1: 8}}, "batch_size_schedule"),
        ({"batch_size_schedule": {1: 0}}, "batch_size_schedule"),
        ({"batch_size_schedule": [8]}, "batch_size_schedule=\\[8\\] is not allowed: use a mapping"),
        ({"batch_factor": float("inf")}, "batch_factor=inf"),
        ({"min_delta": "0.1"}, "min_delta='0.1'"),
        ({"lr_factor": True}, "lr_factor=True"),
        ({"batch_size_progress": {1.0: 512}}, r"batch_size_progress=\{1.0: 512\} is not allowed: use fractions"),
        ({"batch_size_progress": {0: 512}}, "batch_size_progress.*fractions of the run in \\(0, 1\\)"),
        ({"batch_size_progress": {0.5: 0}}, "batch_size_progress.*positive integer batch sizes"),
        ({"batch_size_progress": {0.3: 1024, 0.6: 512}}, "batch_size_progress.*batch sizes that grow"),
        ({"batch_size_progress": [512]}, "batch_size_progress=\\[512\\] is not allowed: use a mapping"),
        (
            {"policy": "batch", "max_batch_size": 8, "batch_size_progress": {0.5: 8}},
            "batch_size_progress.*policy='batch'",
        ),
        ({"batch_size_schedule": {2: 8}, "batch_size_progress": {0.5: 8}}, "batch_size_progress.*batch_size_schedule"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BatchPlan(**kwargs)


def test_tables_given_as_yaml_strings_get_numbers_as_keys():
    assert BatchPlan("none", batch_size_schedule={"0": 64, "5": 128}).batch_size_schedule == {0: 64, 5: 128}
    assert BatchPlan("none", batch_size_progress={"0.4": 512}).batch_size_progress == {0.4: 512}
