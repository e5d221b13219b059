"""Divergence detection: a step's loss and gradient norm in, a verdict out (ok, skip, roll back, stop).

:class:`DivergenceDetector` holds the recent good steps, the streaks and the learning-rate factor
of the escalation; it never touches a tensor. Acting is the caller's: :func:`drop_gradients` skips
an update, :meth:`Snapshot.restore <lit_accel.core.snapshot.Snapshot.restore>` plus
:func:`back_off` roll back. DivergenceGuard is this engine behind Lightning's hooks; a plain
PyTorch or Fabric loop calls it directly. Imports torch and the standard library only.

Example (a plain loop)::

    from lit_accel.core import Action, DivergenceDetector, Snapshot, back_off, drop_gradients, total_norm

    detector = DivergenceDetector(rollback_after=3, max_rollbacks=3)
    snapshot = Snapshot.take(model, optimizer, [], step=0)
    for step, (x, y) in enumerate(loader):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grad_norm = float(total_norm([p.grad for p in model.parameters()]))
        verdict = detector.check(loss.item(), grad_norm, lambda: float(total_norm(list(model.parameters()))))
        if verdict.drops_update:
            drop_gradients(optimizer)  # this update changes nothing
        optimizer.step()
        optimizer.zero_grad()
        if verdict.snapshot_due:
            snapshot = Snapshot.take(model, optimizer, [], step, reuse=snapshot)
        if verdict.action is Action.ROLLBACK:
            back_off(snapshot, model, optimizer, [], detector)
        elif verdict.action is Action.STOP:
            raise RuntimeError(verdict.reason_text)
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any, NamedTuple

import torch

from lit_accel.core.checks import check_int, fmt, is_number, require
from lit_accel.core.lr_scaling import scale_learning_rates
from lit_accel.core.snapshot import Snapshot

__all__ = [
    "Action",
    "DivergenceDetector",
    "Kind",
    "Reason",
    "Verdict",
    "back_off",
    "drifted",
    "drop_gradients",
    "is_spike",
    "rewarm_factor",
]


class Kind(str, Enum):
    """What a step's numbers say (str values: they read and compare as the plain words)."""

    OK = "ok"
    SCALER = "scaler"  # non-finite gradients under a GradScaler, which skips the step itself
    BAD = "bad"  # non-finite loss or gradient norm, or a spike
    BROKEN = "broken"  # non-finite parameters: no later step can recover, roll back at once
    DRIFT = "drift"  # the loss crept up over a window: roll back at once


class Action(str, Enum):
    """What to do about a step."""

    OK = "ok"  # apply the update
    SCALER_SKIP = "scaler_skip"  # the GradScaler skips it; nothing to do
    SKIP = "skip"  # do not apply the update
    ROLLBACK = "rollback"  # skip it (unless the kind is DRIFT) and restore the last snapshot
    STOP = "stop"  # give up: restore the last snapshot and stop


class Reason(str, Enum):
    """Why a step is not OK."""

    NON_FINITE_PARAMETERS = "non_finite_parameters"
    SCALER_NON_FINITE_GRADIENTS = "scaler_non_finite_gradients"
    SCALER_STREAK = "scaler_streak"
    NON_FINITE_LOSS = "non_finite_loss"
    NON_FINITE_GRAD_NORM = "non_finite_grad_norm"
    EARLY_LOSS_SPIKE = "early_loss_spike"
    LOSS_SPIKE = "loss_spike"
    GRAD_NORM_SPIKE = "grad_norm_spike"
    DRIFT = "drift"


class Verdict(NamedTuple):
    """One step's verdict: kind, action, reason (an Enum and its text for people), the offending
    value, and whether a snapshot is due now (the parameters were verified finite first)."""

    kind: Kind = Kind.OK
    action: Action = Action.OK
    reason: Reason | None = None
    reason_text: str = ""
    value: float = 0.0
    snapshot_due: bool = False

    @property
    def drops_update(self) -> bool:
        """Whether this step's update must not be applied: every action but OK and SCALER_SKIP,
        except a drift's rollback (that update is harmless; the restore replaces it)."""
        return self.action in (Action.SKIP, Action.ROLLBACK, Action.STOP) and self.kind is not Kind.DRIFT


def is_spike(value: float, history: Sequence[float], factor: float | None, zscore: float | None, warmup: int) -> bool:
    """Whether ``value`` exceeds every enabled test against the recent good values: above
    ``median + (factor - 1)·|median|`` and more than ``zscore`` standard deviations above the mean."""
    if len(history) < warmup or (factor is None and zscore is None):
        return False
    if factor is not None:
        base = statistics.median(history)
        if not value > base + (factor - 1.0) * abs(base):
            return False
    if zscore is not None:
        n = len(history)
        mean = math.fsum(history) / n
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in history) / n)
        if not (value - mean > zscore * std if std > 0 else value > mean):
            return False
    return True


def drifted(median: float, best: float, factor: float) -> bool:
    """Whether the recent median loss exceeds the best one by ``factor`` (``> best + (factor - 1)·|best|``)."""
    return median > best + (factor - 1.0) * abs(best)


def rewarm_factor(done: int, steps: int, start: float) -> float:
    """The learning-rate factor ``done`` steps into a linear climb from ``start`` to 1 over ``steps``."""
    return 1.0 if done >= steps else start + (1.0 - start) * done / steps


class DivergenceDetector:
    """Classify each optimizer step from its loss, gradient norm and (when it matters) parameter
    norm, and escalate: skip a bad step, roll back after ``rollback_after`` in a row, stop when a
    rollback is needed after ``max_rollbacks``. Tracks the learning-rate factor the rollbacks leave.

    Feed it numbers that are the same on every rank (all-reduced) and every rank decides alike.

    Args: as :class:`lit_accel.callbacks.DivergenceGuard`'s of the same names.

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(
        self,
        *,
        rollback_after: int = 3,
        max_rollbacks: int | None = 3,
        lr_backoff: float = 0.5,
        snapshot_every: int = 100,
        window: int = 50,
        warmup: int = 20,
        loss_spike_factor: float | None = 3.0,
        grad_spike_factor: float | None = 10.0,
        spike_zscore: float | None = 4.0,
        early_loss_spike_factor: float | None = None,
        drift_factor: float | None = None,
        rewarm_steps: int = 0,
        rewarm_start_factor: float = 0.1,
        scaler_patience: int = 20,
    ) -> None:
        check_int("rollback_after", rollback_after, 1)
        if max_rollbacks is not None:
            check_int("max_rollbacks", max_rollbacks, 0, "or None (never stop)")
        require(is_number(lr_backoff) and 0.0 < lr_backoff <= 1.0, "lr_backoff", lr_backoff, "a number in (0, 1]")
        check_int("snapshot_every", snapshot_every, 1)
        check_int("window", window, 2)
        check_int("warmup", warmup, 2)
        require(warmup <= window, "warmup", warmup, f"at most window={window}")
        for arg, value in (
            ("loss_spike_factor", loss_spike_factor),
            ("grad_spike_factor", grad_spike_factor),
            ("early_loss_spike_factor", early_loss_spike_factor),
            ("drift_factor", drift_factor),
        ):
            require(
                value is None or (is_number(value) and value > 1.0), arg, value, "a number > 1, or None to turn it off"
            )
        ok = spike_zscore is None or (is_number(spike_zscore) and spike_zscore > 0)
        require(ok, "spike_zscore", spike_zscore, "a number > 0, or None")
        check_int("rewarm_steps", rewarm_steps, 0)
        ok = is_number(rewarm_start_factor) and 0.0 < rewarm_start_factor <= 1.0
        require(ok, "rewarm_start_factor", rewarm_start_factor, "a number in (0, 1]")
        check_int("scaler_patience", scaler_patience, 0)
        self.rollback_after = rollback_after
        self.max_rollbacks = max_rollbacks
        self.lr_backoff = float(lr_backoff)
        self.snapshot_every = snapshot_every
        self.window = window
        self.warmup = warmup
        self.loss_spike_factor = loss_spike_factor
        self.grad_spike_factor = grad_spike_factor
        self.spike_zscore = spike_zscore
        self.early_loss_spike_factor = early_loss_spike_factor
        self.drift_factor = None if drift_factor is None else float(drift_factor)
        self.rewarm_steps = rewarm_steps
        self.rewarm_start_factor = float(rewarm_start_factor)
        self.scaler_patience = scaler_patience
        # Progress (what a checkpoint keeps, see state_dict).
        self.skipped_steps = 0
        self.rollbacks = 0
        self.scaler_skips = 0
        self.lr_factor = 1.0  # product of the backoffs the optimizer's rates carry
        self.rewarm_done = 0  # steps of the climb after a rollback done
        self.rewarm_factor = 1.0  # where the climb is (1: none), applied on top of lr_factor
        self.reset()

    def reset(self) -> None:
        """Forget the recent steps and streaks (a new run: the baseline re-warms); progress stays."""
        self.loss_history: deque[float] = deque(maxlen=self.window)
        self.grad_history: deque[float] = deque(maxlen=self.window)
        self.bad_streak = 0
        self.scaler_streak = 0
        self.good_since_snapshot = 0
        self.best_median = math.inf
        self.drift_ratio = float("nan")
        self._healthy = True  # the last good step's median allows a snapshot

    def reset_learning_rate(self) -> None:
        """A fresh optimizer: its rates carry no backoff and no climb."""
        self.lr_factor, self.rewarm_done, self.rewarm_factor = 1.0, 0, 1.0

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": self.skipped_steps,
            "rollbacks": self.rollbacks,
            "scaler_skips": self.scaler_skips,
            "lr_factor": self.lr_factor,
            "rewarm_done": self.rewarm_done,
            "rewarm_factor": self.rewarm_factor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Missing keys get their defaults."""
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.scaler_skips = int(state.get("scaler_skips", 0))
        self.lr_factor = float(state.get("lr_factor", 1.0))
        self.rewarm_done = int(state.get("rewarm_done", 0))
        self.rewarm_factor = float(state.get("rewarm_factor", 1.0))

    @property
    def loss_baseline(self) -> float | None:
        """Median loss of the recent good steps (None before one)."""
        return statistics.median(self.loss_history) if self.loss_history else None

    # ------------------------------------------------------------------ decisions

    def classify(
        self, loss: float | None, grad_norm: float, param_norm: float | None = None, *, scaler_active: bool = False
    ) -> Verdict:
        """What is wrong with this step, if anything; ``loss`` None: no loss this step; ``param_norm``
        None: not measured. Changes nothing."""
        if param_norm is not None and not math.isfinite(param_norm):
            text = "non-finite parameters after the previous update"
            return Verdict(Kind.BROKEN, Action.OK, Reason.NON_FINITE_PARAMETERS, text, param_norm)
        if scaler_active and not math.isfinite(grad_norm):
            text = "non-finite gradients (GradScaler skips the step)"
            return Verdict(Kind.SCALER, Action.OK, Reason.SCALER_NON_FINITE_GRADIENTS, text, grad_norm)
        if loss is not None and not math.isfinite(loss):
            return Verdict(Kind.BAD, Action.OK, Reason.NON_FINITE_LOSS, "non-finite loss", loss)
        if not math.isfinite(grad_norm):
            return Verdict(Kind.BAD, Action.OK, Reason.NON_FINITE_GRAD_NORM, "non-finite gradient norm", grad_norm)
        losses, grads = self.loss_history, self.grad_history
        if loss is not None and self.early_loss_spike_factor is not None and 0 < len(losses) < self.warmup:
            largest = max(losses)
            if loss > largest + (self.early_loss_spike_factor - 1.0) * abs(largest):
                text = f"loss spike in the first steps (largest so far {fmt(largest)})"
                return Verdict(Kind.BAD, Action.OK, Reason.EARLY_LOSS_SPIKE, text, loss)
        if loss is not None and is_spike(loss, losses, self.loss_spike_factor, self.spike_zscore, self.warmup):
            text = f"loss spike (baseline {fmt(statistics.median(losses))})"
            return Verdict(Kind.BAD, Action.OK, Reason.LOSS_SPIKE, text, loss)
        if is_spike(grad_norm, grads, self.grad_spike_factor, self.spike_zscore, self.warmup):
            text = f"gradient-norm spike (baseline {fmt(statistics.median(grads))})"
            return Verdict(Kind.BAD, Action.OK, Reason.GRAD_NORM_SPIKE, text, grad_norm)
        return Verdict()

    def check(
        self,
        loss: float | None,
        grad_norm: float,
        param_norm: float | Callable[[], float] | None = None,
        *,
        scaler_active: bool = False,
    ) -> Verdict:
        """Decide this step and record it.

        Args:
            loss: the step's loss (mean over ranks); None when the step had none.
            grad_norm: total gradient norm before clipping (over all ranks), unscaled.
            param_norm: total parameter norm, or a function that measures it, called only when it
                matters: on a step that is not plainly good (non-finite weights make the loss or the
                gradients non-finite, so a broken update shows up there first) and before a
                snapshot (broken weights would be a useless rollback target). A collective is fine:
                the call depends only on numbers and counters that are the same on every rank.
            scaler_active: a GradScaler skips steps with non-finite gradients itself.

        Returns:
            The verdict; counters, streaks and the learning-rate factor are updated for its action
            (a ROLLBACK lowers :attr:`lr_factor` and starts the climb: apply it with
            :func:`back_off`).
        """
        verdict = self.classify(loss, grad_norm, None, scaler_active=scaler_active)
        if verdict.kind is not Kind.OK or self.good_since_snapshot + 1 >= self.snapshot_every:
            measured = param_norm() if callable(param_norm) else param_norm
            if measured is not None:
                verdict = self.classify(loss, grad_norm, measured, scaler_active=scaler_active)
        action = self._escalate(verdict.kind)
        if action is Action.OK:
            drift = self._record_good(loss, grad_norm)
            if drift is None:
                return verdict._replace(snapshot_due=self._snapshot_due())
            verdict, action = drift, self._escalate(Kind.DRIFT)  # the update runs; the rollback replaces it
        elif action is Action.SCALER_SKIP:
            self.scaler_skips += 1
            return verdict._replace(action=action)
        else:
            self.skipped_steps += 1
            if verdict.kind is Kind.SCALER:
                text = f"GradScaler skipped {self.scaler_streak} steps in a row (non-finite gradients)"
                verdict = verdict._replace(reason=Reason.SCALER_STREAK, reason_text=text)
        if action is Action.ROLLBACK:
            self._rolled_back(verdict.kind)
        return verdict._replace(action=action)

    def advance_rewarm(self) -> float:
        """One step of the climb back after a rollback: returns the multiplier to apply to every
        learning rate now (1 when there is no climb)."""
        if self.rewarm_factor >= 1.0:
            return 1.0
        self.rewarm_done += 1
        target = rewarm_factor(self.rewarm_done, self.rewarm_steps, self.rewarm_start_factor)
        ratio, self.rewarm_factor = target / self.rewarm_factor, target
        return ratio

    def stopped(self) -> None:
        """The caller restored the last snapshot to stop: its rates carry no climb."""
        self.rewarm_done, self.rewarm_factor = 0, 1.0

    # ------------------------------------------------------------------ internals

    def _escalate(self, kind: Kind) -> Action:
        if kind is Kind.OK:
            self.bad_streak = self.scaler_streak = 0
            return Action.OK
        if kind is Kind.SCALER:
            self.scaler_streak += 1
            if self.scaler_streak <= self.scaler_patience:
                return Action.SCALER_SKIP
        self.bad_streak += 1
        if kind in (Kind.BROKEN, Kind.DRIFT) or self.bad_streak >= self.rollback_after:
            if self.max_rollbacks is not None and self.rollbacks >= self.max_rollbacks:
                return Action.STOP
            self.bad_streak = self.scaler_streak = 0
            return Action.ROLLBACK
        return Action.SKIP

    def _record_good(self, loss: float | None, grad_norm: float) -> Verdict | None:
        """Record a good step; a DRIFT verdict if the loss crept up."""
        self._healthy = True
        if loss is not None:  # no loss: nothing to learn from
            self.loss_history.append(loss)
            self.grad_history.append(grad_norm)
            if self.drift_factor is not None and len(self.loss_history) == self.window:
                median = statistics.median(self.loss_history)
                self.best_median = min(self.best_median, median)
                self.drift_ratio = median / self.best_median if self.best_median > 0 else float("nan")
                if drifted(median, self.best_median, self.drift_factor):
                    text = (
                        f"slow divergence: median loss of the last {self.window} steps over the best "
                        f"median of this fit, {fmt(self.best_median)}"
                    )
                    return Verdict(Kind.DRIFT, Action.OK, Reason.DRIFT, text, median)
                # No snapshot while the median is above half the margin: a rollback should land
                # before the drift began.
                self._healthy = not drifted(median, self.best_median, 1.0 + (self.drift_factor - 1.0) / 2)
            elif self.drift_factor is not None and math.isfinite(self.best_median):
                self._healthy = False  # after a drift rollback: not before a full window shows the loss is back
        self.good_since_snapshot += 1
        return None

    def _snapshot_due(self) -> bool:
        # None while the rate climbs back after a rollback or the loss drifts up: a rollback should
        # land on a state that trained well at the rate it will run at.
        if self.good_since_snapshot >= self.snapshot_every and self._healthy and self.rewarm_factor >= 1.0:
            self.good_since_snapshot = 0
            return True
        return False

    def _rolled_back(self, kind: Kind) -> None:
        self.lr_factor *= self.lr_backoff
        self.rollbacks += 1
        self.good_since_snapshot = 0
        self.rewarm_done = 0
        self.rewarm_factor = self.rewarm_start_factor if self.rewarm_steps > 0 else 1.0
        if kind is Kind.DRIFT:  # the recent losses were the drift's; the next window is the restored state's
            self.loss_history.clear()
            self.grad_history.clear()


def back_off(
    snapshot: Snapshot,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedulers: Sequence[Any],
    detector: DivergenceDetector,
) -> None:
    """Carry out a ROLLBACK: restore ``snapshot``, lower every learning rate by the detector's
    backoff (kept in the snapshot too, so a second rollback to it compounds) and start the climb."""
    snapshot.restore(module, optimizer, schedulers)
    scale_learning_rates(optimizer, schedulers, detector.lr_backoff, floors=False)
    snapshot.retake_learning_rates(optimizer, schedulers)
    if detector.rewarm_factor < 1.0:
        scale_learning_rates(optimizer, schedulers, detector.rewarm_factor, floors=False)


def drop_gradients(optimizer: torch.optim.Optimizer, scaler_owns_step: bool = False) -> None:
    """Make the coming ``optimizer.step()`` a no-op for every parameter.

    Gradients set to ``None`` mean "no update and no state change" to every ``torch.optim``
    optimizer (zeroed ones would still move Adam and momentum). ``scaler_owns_step``: a fused
    optimizer under a GradScaler, whose ``scaler.step()`` asserts when there are no gradients to
    check for inf; one is left and made NaN, and the scaler skips the step (and halves its scale).
    """
    poisoned = False
    for group in optimizer.param_groups:
        for param in group["params"]:
            if scaler_owns_step and not poisoned and param.grad is not None:
                param.grad.fill_(float("nan"))
                poisoned = True
                continue
            param.grad = None
