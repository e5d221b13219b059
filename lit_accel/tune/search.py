"""The search of ``lit-accel tune``: trials of the recipe and each setting in alternating rounds within a
budget, the winners per lever, and the winners of several levers measured together.

The trials themselves come from an injected runner (:class:`lit_accel.tune.trials.FitTrials` runs
real fits; tests pass scripted ones), and the clock is injected too, so the search is a pure
function of the runner's answers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lit_accel.measure import median
from lit_accel.measure import rounds as round_orders
from lit_accel.tune.levers import Lever, Setting, combine

__all__ = ["Measured", "Report", "Trial", "TrialRunner", "search"]


@dataclass
class Trial:
    """What one trial measured, or why it failed (``error``: out of memory, out of time, ...).

    Args:
        images_per_sec: training images/s over the timed steps.
        data_wait: share of the step time spent waiting for data.
        peak_memory_mb: the trial's own peak memory (above what the process held before it).
        seconds: the whole trial's wall time (the budget is spent in these).
        error: None, or one line for the table.
    """

    images_per_sec: float = math.nan
    data_wait: float = math.nan
    peak_memory_mb: float = math.nan
    seconds: float = 0.0
    error: str | None = None


# (setting, or None for the recipe as given; seconds of the budget left) -> its Trial
TrialRunner = Callable[[Setting | None, float], Trial]


@dataclass
class Measured:
    """The trials of one setting (or of the recipe): a figure per round, and the ratio to that round's recipe."""

    images_per_sec: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    data_wait: list[float] = field(default_factory=list)
    peak_memory_mb: list[float] = field(default_factory=list)
    error: str | None = None

    def record(self, trial: Trial, baseline_images_per_sec: float | None = None) -> None:
        """Adds a trial's figures (and its ratio to the recipe's trial of the same round, when given)."""
        self.images_per_sec.append(trial.images_per_sec)
        self.data_wait.append(trial.data_wait)
        self.peak_memory_mb.append(trial.peak_memory_mb)
        if baseline_images_per_sec:
            self.ratios.append(trial.images_per_sec / baseline_images_per_sec)

    @property
    def ratio(self) -> float:
        """The median ratio to the recipe (NaN before any paired trial)."""
        return median(self.ratios)


@dataclass
class Report:
    """The search's outcome.

    Args:
        baseline: the recipe's trials.
        settings: every setting with its trials, in the levers' order.
        chosen: the settings to write (one per lever at most).
        combined: the trial of the chosen settings together (several levers had a winner).
        not_measured: settings the budget left no time for.
        not_combined: several levers had a winner, but the budget left no time to measure them
            together, so only the fastest is chosen.
        seconds: the search's time.
    """

    baseline: Measured
    settings: list[tuple[Setting, Measured]]
    chosen: list[Setting]
    combined: Measured | None = None
    not_measured: list[Setting] = field(default_factory=list)
    not_combined: bool = False
    seconds: float = 0.0

    def measured(self, setting: Setting) -> Measured:
        """The trials of ``setting``."""
        return next(m for s, m in self.settings if s is setting)


def search(
    levers: list[Lever],
    run_trial: TrialRunner,
    budget_s: float,
    rounds: int = 3,
    min_gain: float = 0.03,
    clock: Callable[[], float] = time.perf_counter,
) -> Report:
    """Measure ``levers`` against the recipe within ``budget_s`` seconds of ``clock``.

    Each round runs the recipe, then every setting (in reverse order on odd rounds); a setting's
    figure is the median of its ratios to its round's recipe trial. A setting is chosen when it is
    the fastest of its lever and at least ``min_gain`` faster than the recipe. The winners of several
    levers are then measured together once, when the budget holds it, and kept together only if
    that is faster than the best single one; otherwise only the fastest single one is kept. A trial
    is not started when the time it took last (or an estimate) would overrun the budget.

    Raises:
        ValueError: the recipe's own trial fails, or the budget does not hold the recipe and one
            setting (the message says how much it would take).

    Example::

        report = search(levers, FitTrials(fit_args), budget_s=120)
        report.chosen  # [Setting(lever="batch_size", ...)]
    """
    started = clock()
    settings = [s for lever in levers for s in lever.settings]
    baseline = Measured()
    measured = {s: Measured() for s in settings}
    trial_seconds: dict[Setting | None, float] = {}

    def run(setting: Setting | None) -> Trial:
        trial = run_trial(setting, budget_s - (clock() - started))
        trial_seconds[setting] = trial.seconds
        return trial

    def fits(next_trial_s: float) -> bool:
        return clock() - started + next_trial_s <= budget_s

    first = run(None)
    if first.error is not None:
        raise ValueError(f"the recipe itself failed in a trial: {first.error}")
    if budget_s < 2 * first.seconds:
        raise ValueError(
            f"budget_s={budget_s:g} is too small: one trial of the recipe took {first.seconds:.1f} s and the"
            f" baseline and one setting need at least {2 * first.seconds:.0f} s. Raise --budget_s (e.g."
            f" {math.ceil(first.seconds * (2 + len(settings)) * 1.2)} for one round of every setting), or"
            " lower --timed_steps"
        )
    baseline.record(first)
    not_measured: set[Setting] = set()
    for index, order in round_orders(settings, rounds):
        if index > 0:
            if not fits(trial_seconds[None]):
                break
            trial = run(None)
            if trial.error is not None:
                break
            baseline.record(trial)
        round_baseline = baseline.images_per_sec[-1]
        for setting in order:
            if measured[setting].error is not None:
                continue
            # a setting not tried yet: the recipe's time, more for more processes
            if not fits(trial_seconds.get(setting, trial_seconds[None] * setting.processes * 1.5)):
                if not measured[setting].images_per_sec:
                    not_measured.add(setting)
                continue
            trial = run(setting)
            if trial.error is not None:
                measured[setting].error = trial.error
                continue
            measured[setting].record(trial, round_baseline)
            not_measured.discard(setting)

    chosen = _choose(levers, measured, min_gain)
    combined = None
    not_combined = False
    if len(chosen) > 1:
        best = max(chosen, key=lambda s: measured[s].ratio)
        # the recipe and the merged settings (about as long as the slowest of them)
        together_s = trial_seconds[None] + max(trial_seconds.get(s, 0.0) for s in chosen)
        if not fits(together_s):
            chosen, not_combined = [best], True  # never measured together: only the fastest has shown it pays
        else:
            base, trial = run(None), run(combine(chosen))
            combined = Measured()
            if trial.error is not None or base.error is not None:
                combined.error = trial.error or base.error
            else:
                combined.record(trial, base.images_per_sec)
            if combined.error is not None or combined.ratio < measured[best].ratio:
                chosen = [best]
    return Report(
        baseline=baseline,
        settings=[(s, measured[s]) for s in settings],
        chosen=chosen,
        combined=combined,
        not_measured=[s for s in settings if s in not_measured],
        not_combined=not_combined,
        seconds=clock() - started,
    )


def _choose(levers: list[Lever], measured: dict[Setting, Measured], min_gain: float) -> list[Setting]:
    """Per lever, the fastest setting if its median ratio beats the recipe by ``min_gain``."""
    chosen = []
    for lever in levers:
        candidates = [s for s in lever.settings if measured[s].ratios and measured[s].error is None]
        if not candidates:
            continue
        best = max(candidates, key=lambda s: measured[s].ratio)
        if measured[best].ratio >= 1.0 + min_gain:
            chosen.append(best)
    return chosen
