"""DivergenceDetector and its actions: numbers in, a verdict out (no Trainer)."""

from __future__ import annotations

import copy
import math
import statistics
from typing import Any

import pytest
import torch
from torch import nn

from helpers import same_state
from lit_accel.core.divergence import (
    Action,
    DivergenceDetector,
    Kind,
    Reason,
    back_off,
    drifted,
    drop_gradients,
    is_spike,
    rewarm_factor,
)
from lit_accel.core.snapshot import Snapshot

NAN, INF = float("nan"), float("inf")
# Small windows so spike detection is live after a few steps.
FAST: dict[str, Any] = {"window": 5, "warmup": 3, "snapshot_every": 100}


@pytest.mark.parametrize(
    ("value", "history", "factor", "zscore", "expected"),
    [
        (100.0, [1.0, 1.0], 3.0, None, False),  # fewer than warmup=3 values: never a spike
        (3.1, [1.0] * 4, 3.0, None, True),
        (2.9, [1.0] * 4, 3.0, None, False),
        (2.5, [-2.0] * 4, 3.0, None, True),  # negative baseline: above -2 + 2·|-2| = 2
        (1.5, [-2.0] * 4, 3.0, None, False),
        (5.9, [1.0, 2.0, 3.0, 4.0, 5.0], None, 2.0, True),  # mean 3, std √2: z = 2.05
        (5.8, [1.0, 2.0, 3.0, 4.0, 5.0], None, 2.0, False),  # z = 1.98
        (0.1, [0.01, 0.05, 0.02, 0.04, 0.03], 3.0, 6.0, False),  # ratio passes, z = 4.95 does not
        (0.1, [0.01, 0.05, 0.02, 0.04, 0.03], 3.0, 4.0, True),
        (1.01, [1.0] * 4, None, 3.0, True),  # flat window: anything above the mean
        (1.0, [1.0] * 4, None, 3.0, False),
        (1e9, [1.0] * 4, None, None, False),  # both tests off
    ],
)
def test_is_spike(value: float, history: list[float], factor: float | None, zscore: float | None, expected: bool):
    assert is_spike(value, history, factor, zscore, warmup=3) is expected


def test_rewarm_factor_and_drift_rule() -> None:
    assert [rewarm_factor(k, 4, 0.2) for k in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert drifted(1.51, 1.0, 1.5) and not drifted(1.5, 1.0, 1.5)
    assert drifted(-0.9, -2.0, 1.5) and not drifted(-1.1, -2.0, 1.5)  # margin on |best|


def _warm(detector: DivergenceDetector, n: int = 5, loss: float = 1.0, grad: float = 1.0) -> DivergenceDetector:
    for _ in range(n):
        assert detector.check(loss, grad, 1.0).action is Action.OK
    return detector


def test_classify_order_kinds_and_reasons() -> None:
    d = _warm(DivergenceDetector(loss_spike_factor=3.0, grad_spike_factor=10.0, spike_zscore=None, **FAST))

    def verdict(loss: float | None, grad: float, param: float | None = 1.0, scaler: bool = False) -> tuple[Any, ...]:
        v = d.classify(loss, grad, param, scaler_active=scaler)
        return v.kind, v.reason, v.reason_text

    assert verdict(1.0, 1.0) == (Kind.OK, None, "")
    assert verdict(NAN, NAN, param=None) == (Kind.BAD, Reason.NON_FINITE_LOSS, "non-finite loss")  # norm not measured
    assert verdict(NAN, NAN, param=INF)[:2] == (Kind.BROKEN, Reason.NON_FINITE_PARAMETERS)
    assert verdict(NAN, NAN, scaler=True)[:2] == (Kind.SCALER, Reason.SCALER_NON_FINITE_GRADIENTS)
    assert verdict(1.0, INF) == (Kind.BAD, Reason.NON_FINITE_GRAD_NORM, "non-finite gradient norm")
    assert verdict(4.0, 1.0) == (Kind.BAD, Reason.LOSS_SPIKE, "loss spike (baseline 1)")
    assert verdict(1.0, 11.0) == (Kind.BAD, Reason.GRAD_NORM_SPIKE, "gradient-norm spike (baseline 1)")
    assert verdict(None, 1.0)[0] is Kind.OK
    assert d.skipped_steps == 0 and len(d.loss_history) == 5, "classify changes nothing"


def test_the_parameter_norm_is_measured_on_bad_steps_and_before_snapshots_only() -> None:
    d = DivergenceDetector(snapshot_every=3, window=5, warmup=3)
    calls = []

    def param_norm() -> float:
        calls.append(len(calls))
        return 1.0

    verdicts = [d.check(loss, 1.0, param_norm) for loss in (1.0, 1.0, 1.0, NAN, 1.0)]
    # Steps 0, 1: good, no snapshot due; step 2 takes a snapshot; step 3 is bad; step 4 good.
    assert len(calls) == 2
    assert [v.snapshot_due for v in verdicts] == [False, False, True, False, False]
    # Non-finite parameters turn a good-looking step due for a snapshot into a rollback.
    d = DivergenceDetector(snapshot_every=1, window=5, warmup=3)
    v = d.check(1.0, 1.0, lambda: NAN)
    assert (v.kind, v.action, v.snapshot_due) == (Kind.BROKEN, Action.ROLLBACK, False)


def _actions(steps: list[str], **config: Any) -> list[str]:
    """Feed a scripted run: 'ok', 'bad' (NaN loss), 'broken' (NaN parameters), 'scaler' (inf
    gradients under a GradScaler)."""
    d = DivergenceDetector(**{"rollback_after": 3, "max_rollbacks": 3, "scaler_patience": 2, **FAST, **config})
    numbers = {"ok": (1.0, 1.0, 1.0), "bad": (NAN, 1.0, 1.0), "broken": (NAN, NAN, NAN), "scaler": (1.0, INF, 1.0)}
    out = []
    for step in steps:
        loss, grad, param = numbers[step]
        out.append(d.check(loss, grad, param, scaler_active=step == "scaler").action.value)
    return out


def test_escalation() -> None:
    assert _actions(["bad", "bad", "bad", "ok", "bad"]) == ["skip", "skip", "rollback", "ok", "skip"]
    assert _actions(["bad", "ok", "bad", "ok"]) == ["skip", "ok", "skip", "ok"]  # not in a row
    assert _actions(["broken"]) == ["rollback"]
    assert _actions(["bad", "bad"], rollback_after=2, max_rollbacks=0) == ["skip", "stop"]
    assert _actions(["bad"] * 6, rollback_after=2, max_rollbacks=2) == ["skip", "rollback"] * 2 + ["skip", "stop"]
    assert _actions(["scaler"] * 4, rollback_after=2) == ["scaler_skip", "scaler_skip", "skip", "rollback"]
    assert "stop" not in _actions(["bad"] * 30, rollback_after=1, max_rollbacks=None)


def test_counters_and_learning_rate_factor_follow_the_actions() -> None:
    d = DivergenceDetector(rollback_after=2, max_rollbacks=2, lr_backoff=0.5, scaler_patience=1, **FAST)
    actions = [d.check(NAN, 1.0, 1.0).action for _ in range(6)]
    assert actions == [Action.SKIP, Action.ROLLBACK, Action.SKIP, Action.ROLLBACK, Action.SKIP, Action.STOP]
    assert d.state_dict() == {
        "skipped_steps": 6,
        "rollbacks": 2,
        "scaler_skips": 0,
        "lr_factor": 0.25,
        "rewarm_done": 0,
        "rewarm_factor": 1.0,
    }
    verdict = d.check(1.0, INF, 1.0, scaler_active=True)
    assert verdict.action is Action.SCALER_SKIP and not verdict.drops_update and d.scaler_skips == 1
    verdict = d.check(1.0, INF, 1.0, scaler_active=True)  # past scaler_patience: a bad step of its own
    assert verdict.reason is Reason.SCALER_STREAK and verdict.reason_text.startswith("GradScaler skipped 2 steps")


def test_state_round_trip_defaults_and_reset() -> None:
    d = DivergenceDetector(rollback_after=1, rewarm_steps=4, rewarm_start_factor=0.25, **FAST)
    d.check(NAN, 1.0, 1.0)
    d.advance_rewarm()
    other = DivergenceDetector()
    other.load_state_dict(d.state_dict())
    assert (
        other.state_dict()
        == d.state_dict()
        == {
            "skipped_steps": 1,
            "rollbacks": 1,
            "scaler_skips": 0,
            "lr_factor": 0.5,
            "rewarm_done": 1,
            "rewarm_factor": 0.4375,
        }
    )
    other.load_state_dict({"skipped_steps": 3})  # missing keys get their defaults
    assert other.state_dict() == {**DivergenceDetector().state_dict(), "skipped_steps": 3}
    _warm(other)
    other.reset()
    assert not other.loss_history and other.skipped_steps == 3, "reset keeps progress"
    other.reset_learning_rate()
    assert (other.lr_factor, other.rewarm_done, other.rewarm_factor) == (1.0, 0, 1.0)


def test_the_climb_after_a_rollback_and_no_snapshot_during_it() -> None:
    d = DivergenceDetector(rollback_after=1, max_rollbacks=None, rewarm_steps=4, rewarm_start_factor=0.25, window=5,
                           warmup=3, snapshot_every=1)  # fmt: skip
    assert d.check(NAN, 1.0, 1.0).action is Action.ROLLBACK and d.rewarm_factor == 0.25
    climb, due = [], []
    for _ in range(6):
        due.append(d.check(1.0, 1.0, 1.0).snapshot_due)
        climb.append(d.rewarm_factor * d.advance_rewarm())
    assert climb == pytest.approx([0.4375, 0.625, 0.8125, 1.0, 1.0, 1.0])
    assert due == [False] * 4 + [True] * 2  # snapshots only once the climb is done
    d.check(NAN, 1.0, 1.0)  # a second rollback restarts the climb from the lowered rate
    assert (d.lr_factor, d.rewarm_done, d.rewarm_factor) == (0.25, 0, 0.25)
    d.stopped()
    assert (d.rewarm_done, d.rewarm_factor) == (0, 1.0)
    assert DivergenceDetector(rewarm_steps=0).advance_rewarm() == 1.0


CREEP = [1.0] * 12 + [1.0 + 0.03 * (s - 11) for s in range(12, 40)]  # rises slowly from step 12


def test_a_loss_that_creeps_up_rolls_back_to_before_the_drift() -> None:
    d = DivergenceDetector(drift_factor=1.5, max_rollbacks=None, window=5, warmup=3, snapshot_every=2)
    losses, snapshots, rollback = [], [], None
    for step, loss in enumerate(CREEP):
        verdict = d.check(loss, 1.0, 1.0)
        if verdict.action is not Action.OK:
            rollback = (step, verdict)
            break
        losses.append(loss)
        if verdict.snapshot_due:
            snapshots.append(step)
    assert rollback is not None
    step, verdict = rollback
    assert (verdict.kind, verdict.action, verdict.reason) == (Kind.DRIFT, Action.ROLLBACK, Reason.DRIFT)
    assert not verdict.drops_update and d.skipped_steps == 0, "a drift's update runs: the rollback replaces it"
    assert verdict.reason_text.startswith("slow divergence: median loss of the last 5 steps over the best median")
    medians = [statistics.median([*losses, CREEP[step]][s - 4 : s + 1]) for s in range(4, step + 1)]
    assert medians[-1] > 1.5 and all(m <= 1.5 for m in medians[:-1])  # at the first median over 1.5x the best
    # The last snapshot was taken where the median was within half that margin (1.25x).
    last = snapshots[-1]
    assert statistics.median(CREEP[last - 4 : last + 1]) <= 1.25 and last < step
    assert not d.loss_history, "the drift's losses are forgotten; the next window is the restored state's"
    assert d.drift_ratio > 1.5
    blind = DivergenceDetector(drift_factor=None, window=5, warmup=3, snapshot_every=2)
    assert {blind.check(loss, 1.0, 1.0).action for loss in CREEP} == {Action.OK}


def test_a_loss_spike_in_the_first_steps_is_caught_before_the_baseline_exists() -> None:
    losses = [2.3, 21.0, 21.0, 21.0]
    early = DivergenceDetector(rollback_after=3, early_loss_spike_factor=4.0, window=10, warmup=8)
    verdicts = [early.check(loss, 1.0, 1.0) for loss in losses]
    assert [v.action for v in verdicts] == [Action.OK, Action.SKIP, Action.SKIP, Action.ROLLBACK]
    assert verdicts[1].reason is Reason.EARLY_LOSS_SPIKE and "largest so far 2.3" in verdicts[1].reason_text
    blind = DivergenceDetector(rollback_after=3, window=10, warmup=8)  # the default: no test before warmup
    assert {blind.check(loss, 1.0, 1.0).action for loss in losses} == {Action.OK}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 10, "warmup": 11}, "warmup=11 is not allowed: use at most window=10"),
        ({"drift_factor": 1.0}, "drift_factor=1.0 is not allowed: use a number > 1"),
        ({"lr_backoff": 0.0}, r"lr_backoff=0.0 is not allowed: use a number in \(0, 1\]"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DivergenceDetector(**kwargs)


# ---------------------------------------------------------------------- acting: skip and roll back


def _model_and_optimizer(kind: str) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    if kind == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return model, optimizer, scheduler


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, drop: bool = False) -> None:
    model(torch.randn(8, 4)).square().mean().backward()
    if drop:
        drop_gradients(optimizer)
    optimizer.step()
    optimizer.zero_grad()


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return copy.deepcopy({"model": model.state_dict(), "opt": optimizer.state_dict()})


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_dropped_gradients_leave_parameters_and_optimizer_state_untouched(kind: str) -> None:
    model, optimizer, _ = _model_and_optimizer(kind)
    _train_step(model, optimizer)  # momentum / Adam moments exist
    before = _state(model, optimizer)
    model.eval()  # BatchNorm's running statistics move in a training forward
    _train_step(model, optimizer, drop=True)
    assert same_state(_state(model, optimizer), before)
    _train_step(model, optimizer)
    assert not same_state(_state(model, optimizer)["opt"], before["opt"])


def test_a_fused_optimizer_under_a_grad_scaler_keeps_one_nan_gradient() -> None:
    model, optimizer, _ = _model_and_optimizer("sgd")
    model(torch.randn(8, 4)).sum().backward()
    drop_gradients(optimizer, scaler_owns_step=True)
    grads = [p.grad for p in model.parameters()]
    assert torch.isnan(grads[0]).all() and all(g is None for g in grads[1:])


def test_back_off_restores_lowers_the_rates_compounds_and_starts_the_climb() -> None:
    model, optimizer, scheduler = _model_and_optimizer("sgd")
    _train_step(model, optimizer)
    snapshot = Snapshot.take(model, optimizer, [scheduler], step=1)
    saved = _state(model, optimizer)
    d = DivergenceDetector(rollback_after=1, max_rollbacks=None, rewarm_steps=2, rewarm_start_factor=0.5, **FAST)
    for expected in (0.05, 0.025):  # two rollbacks to one snapshot compound
        _train_step(model, optimizer)
        scheduler.step()
        assert d.check(NAN, 1.0, 1.0).action is Action.ROLLBACK
        back_off(snapshot, model, optimizer, [scheduler], d)
        assert same_state(_state(model, optimizer)["model"], saved["model"])
        assert same_state(_state(model, optimizer)["opt"]["state"], saved["opt"]["state"])
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected * 0.5)  # the climb starts at half
        assert scheduler.base_lrs == pytest.approx([expected * 0.5]) and scheduler.last_epoch == 0
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025 * 0.5), "later scheduler steps keep the backoff"
    assert math.isclose(d.lr_factor, 0.25)
