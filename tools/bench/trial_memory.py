"""Peak memory per ``lit-accel tune`` trial when trials follow each other in one process.

Runs the smoke recipe's trial (:class:`lit_accel.tune.FitTrials`) at a large batch, then a small
one, for ``--rounds`` rounds in this process, and prints each trial's peak memory column (MiB the
trial added to the process at its peak, :class:`lit_accel.measure.MemoryWindow`). The first round
runs in a fresh process; later rounds show what memory earlier trials left behind does to the
figures.

Usage::

    python -m tools.bench trial_memory --rounds 3
    python -m tools.bench trial_memory --rounds 3 --keep_freed   # without handing freed memory back
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator

import torch

import lit_accel.measure.fit as measure_fit
from lit_accel.measure import markdown_table
from lit_accel.tune import FitTrials, Setting

RECIPE = ["--config", "cifar10", "--config", "smoke", "--data.synthetic_size", "612", "--data.val_size", "100"]


@contextlib.contextmanager
def _freed_memory_kept(keep: bool) -> Iterator[None]:
    """With ``keep``, memory windows open without handing freed memory back (the earlier behaviour)."""
    release = measure_fit.release_free_host_memory
    if keep:
        measure_fit.release_free_host_memory = lambda: False
    try:
        yield
    finally:
        measure_fit.release_free_host_memory = release


def main(argv: list[str] | None = None) -> list[tuple[float, float]]:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench trial_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--large", default="512", help="the large trial's batch size")
    parser.add_argument("--small", default="8", help="the small trial's batch size")
    parser.add_argument("--keep_freed", action="store_true", help="do not hand freed memory back per window")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: use 1 or more")
    trials = FitTrials(RECIPE, warmup_steps=1, timed_steps=1)
    rows: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder), _freed_memory_kept(args.keep_freed):
        for _ in range(args.rounds):
            figures = []
            for batch in (args.large, args.small):
                trial = trials(Setting("batch_size", batch, ("--data.batch_size", batch), {}, True), 300.0)
                if trial.error is not None:
                    raise RuntimeError(f"the batch-{batch} trial failed: {trial.error}")
                figures.append(trial.peak_memory_mb)
            rows.append((figures[0], figures[1]))
    freed = "kept" if args.keep_freed else "handed back"
    print(f"# {os.cpu_count()} CPUs, torch {torch.__version__}; freed memory {freed} at each window's start")
    cells = [[str(i), f"{large:.1f}", f"{small:.1f}"] for i, (large, small) in enumerate(rows)]
    print(markdown_table(["round", f"batch {args.large} MiB:", f"batch {args.small} MiB:"], cells))
    return rows


if __name__ == "__main__":
    main()
