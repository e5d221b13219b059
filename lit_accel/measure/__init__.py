"""One measurement harness: alternating rounds, paired ratios, medians, the fit timer, per-trial peak
memory and one table renderer, used by ``lit-accel tune``, the benchmarks (``python -m tools.bench``)
and ``tools/gpu_check.py``.

Example::

    from lit_accel.measure import alternate, markdown_table, median, paired_ratios

    results = alternate({"plain": run_plain, "lit-accel": run_fit}, 5)  # A B, B A, A B, ...
    ratio = median(paired_ratios(results["lit-accel"], results["plain"]))
"""

from lit_accel.measure.fit import (
    NO_CHECKPOINT_ARGS,
    TRIAL_FIT_ARGS,
    FitTimer,
    MemoryWindow,
    MetricsWriter,
    batch_samples,
    fit_in_process_tree,
    memory_in_use_mb,
    quiet,
)
from lit_accel.measure.rounds import Spread, alternate, median, paired_ratios, rounds, spread
from lit_accel.measure.table import cell, markdown_table

__all__ = [
    "NO_CHECKPOINT_ARGS",
    "TRIAL_FIT_ARGS",
    "FitTimer",
    "MemoryWindow",
    "MetricsWriter",
    "Spread",
    "alternate",
    "batch_samples",
    "cell",
    "fit_in_process_tree",
    "markdown_table",
    "median",
    "memory_in_use_mb",
    "paired_ratios",
    "quiet",
    "rounds",
    "spread",
]
