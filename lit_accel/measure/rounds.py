"""Alternating rounds, paired ratios and robust summaries: how every comparison in lit_accel is timed.

A drifting load on a shared machine (other jobs, thermal limits) biases whichever variant runs
later. So variants run in rounds, in the given order on even rounds and reversed on odd ones, and
a variant's figure is the median over rounds of its ratio to the same round's baseline.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple, TypeVar

__all__ = ["Spread", "alternate", "median", "paired_ratios", "rounds", "spread"]

T = TypeVar("T")
R = TypeVar("R")


def rounds(variants: Sequence[T], count: int) -> Iterator[tuple[int, list[T]]]:
    """Yields ``(round index, the variants in this round's order)``: as given, then reversed, alternately.

    Raises:
        ValueError: ``count`` is not a positive integer.

    Example::

        for index, order in rounds(["A", "B"], 3):  # A B, B A, A B
            ...
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count={count!r} is not allowed: use a positive number of rounds")
    for index in range(count):
        yield index, list(variants) if index % 2 == 0 else list(variants)[::-1]


def alternate(runs: Mapping[str, Callable[[], R]], count: int) -> dict[str, list[R]]:
    """Runs every variant once per round for ``count`` rounds in alternating order; results per variant.

    Example::

        results = alternate({"plain": run_plain, "lit-accel": run_fit}, 5)
        ratios = paired_ratios([r["images_per_sec"] for r in results["lit-accel"]],
                               [r["images_per_sec"] for r in results["plain"]])
    """
    results: dict[str, list[R]] = {name: [] for name in runs}
    for _, order in rounds(list(runs), count):
        for name in order:
            results[name].append(runs[name]())
    return results


def paired_ratios(values: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """``values[i] / baseline[i]`` for each round measured by both (a zero or NaN baseline gives NaN).

    Raises:
        ValueError: the two sequences differ in length (the rounds would not be paired).
    """
    if len(values) != len(baseline):
        raise ValueError(f"values ({len(values)}) and baseline ({len(baseline)}) must have one entry per round")
    return [v / b if b and b == b else math.nan for v, b in zip(values, baseline)]


def median(values: Iterable[float]) -> float:
    """The median of the numbers that are not NaN; NaN if none is."""
    kept = [v for v in values if v == v]
    return statistics.median(kept) if kept else math.nan


class Spread(NamedTuple):
    """The median of a set of measurements and their range."""

    median: float
    low: float
    high: float


def spread(values: Iterable[float]) -> Spread:
    """Median, minimum and maximum of the numbers that are not NaN (all NaN when none is)."""
    kept = [v for v in values if v == v]
    if not kept:
        return Spread(math.nan, math.nan, math.nan)
    return Spread(statistics.median(kept), min(kept), max(kept))
