"""Does a bigger batch train faster here? The recipe's images/s against the batch size, and what a
batch-growth schedule would save on this curve or on another one (a GPU-like one).

Growing the batch during a run (``DynamicBatchLR``, ``configs/dynamic_progress.yaml``) can save
wall time only through a higher training throughput at the larger batch: the run sees the same
images either way. So measure the curve first:

* ``curve``: ``lit-accel fit`` of the shipped recipe (``configs/cifar10.yaml`` on the synthetic
  set, in-process, the real CLI) at each batch size, timed by ``lit_accel.measure.FitTimer``,
  batch sizes alternating between repetitions; medians. It also fits the step-time model
  ``seconds per step = overhead + batch / peak`` (least squares), which explains the curve: a
  fixed cost per optimizer step (Python, hooks, the optimizer, kernel launches) that a larger
  batch spreads over more images, and a cost per image.
* ``simulate``: the training time of a run whose batch follows a growth table, relative to the
  same run at the starting batch, on a step-time model: the one just measured, or one given with
  ``--overhead_ms`` and ``--peak``. The optimization itself (images seen, accuracy reached) does not
  depend on the device, so a ratio from this model and an accuracy measured on any device
  combine into a time-to-accuracy estimate for that device.

Usage::

    python -m tools.bench batch_curve --batches 128,256,512,1024 --reps 3
    python -m tools.bench batch_curve --simulate --overhead_ms 2 --peak 200000 --growth 0.4:512
    python -m tools.bench batch_curve --batches 256,512 --reps 1 --steps_images 1536   # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from lit_accel.measure import TRIAL_FIT_ARGS, markdown_table, median, rounds
from tools.bench.fits import Settings, timed_fit

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "cifar10.yaml"


def measure_curve(batches: list[int], reps: int, images_per_run: int) -> dict[int, list[float]]:
    """Images/s of the recipe's training steps at each batch size, ``reps`` times, alternating."""
    results: dict[int, list[float]] = {b: [] for b in batches}
    for rep, order in rounds(batches, reps):
        for batch in order:
            warmup = 2
            timed = max(3, images_per_run // batch)
            settings = Settings("cpu", batch, warmup, timed, 1, 1.0)
            args = [
                "fit",
                "--config",
                str(RECIPE),
                "--data.synthetic",
                "true",
                "--data.synthetic_size",
                str((warmup + timed + 1) * batch + 64),
                "--data.val_size",
                "64",
                "--data.batch_size",
                str(batch),
                "--trainer.max_epochs",
                "1",
                "--trainer.max_steps",
                str(warmup + timed),
                *TRIAL_FIT_ARGS,  # what lit-accel tune's trials use: nothing written but the timing
            ]
            result = timed_fit(settings, args)
            results[batch].append(float(result["images_per_sec"]))
            print(f"# batch {batch} (rep {rep + 1}/{reps}): {result['images_per_sec']:,.0f} images/s", flush=True)
    return results


def fit_step_model(medians: dict[int, float]) -> tuple[float, float]:
    """``(overhead_seconds, peak_images_per_sec)`` of ``step seconds = overhead + batch / peak``,
    least squares over the measured points (needs two batch sizes or more)."""
    if len(medians) < 2:
        raise ValueError(f"the step-time model needs at least 2 batch sizes, got {sorted(medians)}")
    xs = [float(b) for b in medians]
    ys = [b / medians[b] for b in medians]  # seconds per step
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    overhead = mean_y - slope * mean_x
    if slope <= 0:
        raise ValueError("the measured seconds per step do not rise with the batch: measure more repetitions")
    return max(overhead, 0.0), 1.0 / slope


def images_per_sec(batch: int, overhead: float, peak: float) -> float:
    return batch / (overhead + batch / peak)


def growth_epochs(growth: dict[float, int], epochs: int) -> dict[int, int]:
    """The epoch table of a ``batch_size_progress`` growth table (the callback's own rule)."""
    from lit_accel.core.batch_plan import progress_epochs

    return progress_epochs(growth, epochs)


def simulate(start: int, growth: dict[float, int], epochs: int, overhead: float, peak: float) -> dict[str, Any]:
    """Training time with the growth table relative to the whole run at ``start`` (same images)."""
    table = growth_epochs(growth, epochs)
    batch, per_epoch = start, []
    for epoch in range(epochs):
        batch = table.get(epoch, batch)
        per_epoch.append(batch)
    # Seconds per image at each epoch's batch; every epoch has the same images.
    grown = sum(1.0 / images_per_sec(b, overhead, peak) for b in per_epoch)
    fixed = epochs / images_per_sec(start, overhead, peak)
    return {"batches": per_epoch, "time_ratio": grown / fixed}


def parse_growth(text: str) -> dict[float, int]:
    growth: dict[float, int] = {}
    for item in text.split(","):
        fraction, _, batch = item.partition(":")
        try:
            growth[float(fraction)] = int(batch)
        except ValueError:
            raise ValueError(f"--growth item {item!r} is not allowed: use FRACTION:BATCH, e.g. 0.4:512") from None
    return growth


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench batch_curve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--batches", default="128,256,512,1024", help="batch sizes to measure, comma-separated")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per batch size (alternating order)")
    parser.add_argument("--steps_images", type=int, default=6000, help="images per timed run (sets its steps)")
    parser.add_argument("--simulate", action="store_true", help="only simulate, on --overhead_ms and --peak")
    parser.add_argument("--overhead_ms", type=float, help="step-time model: fixed milliseconds per step")
    parser.add_argument("--peak", type=float, help="step-time model: images/s with no per-step overhead")
    parser.add_argument("--start", type=int, default=256, help="the run's starting batch (the recipe's)")
    parser.add_argument("--growth", default="0.4:512", help="FRACTION:BATCH,... (configs/dynamic_progress.yaml)")
    parser.add_argument("--epochs", type=int, default=5, help="the run's epochs (the recipe's)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    try:
        growth = parse_growth(args.growth)
        growth_epochs(growth, args.epochs)  # a table the callback would refuse fails here too
    except ValueError as error:
        parser.error(str(error))
    report: dict[str, Any] = {"start": args.start, "growth": growth, "epochs": args.epochs}
    if args.simulate:
        if args.overhead_ms is None or args.peak is None:
            parser.error("--simulate needs --overhead_ms and --peak (or measure a curve: leave out --simulate)")
        overhead, peak = args.overhead_ms / 1000, args.peak
    else:
        try:
            batches = [int(b) for b in args.batches.split(",")]
        except ValueError:
            parser.error(f"--batches {args.batches!r}: use integers, e.g. 128,256,512")
        samples = measure_curve(batches, args.reps, args.steps_images)
        medians = {b: median(v) for b, v in samples.items()}
        report["curve"] = {str(b): {"median": medians[b], "all": samples[b]} for b in batches}
        cells = [[str(b), f"{medians[b]:,.0f}", f"{medians[b] / medians[batches[0]]:.3f}"] for b in batches]
        print(markdown_table(["batch:", "images/s (median):", "ratio to the first:"], cells))
        try:
            overhead, peak = fit_step_model(medians)
        except ValueError as error:  # a noisy machine: the curve is still worth having
            print(f"# no step-time model: {error}")
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2, default=str))
            return report
    result = simulate(args.start, growth, args.epochs, overhead, peak)
    report.update(overhead_ms=overhead * 1000, peak=peak, **result)
    print(
        f"# step-time model: {overhead * 1000:.2f} ms per step + batch / {peak:,.0f} images/s;"
        f" at the start batch {args.start}: {images_per_sec(args.start, overhead, peak):,.0f} images/s, at"
        f" {max(growth.values())}: {images_per_sec(max(growth.values()), overhead, peak):,.0f}"
    )
    print(
        f"# growth {args.growth} over {args.epochs} epochs (batches {result['batches']}): training time"
        f" x{result['time_ratio']:.3f} of the run at {args.start}"
        + ("" if math.isfinite(result["time_ratio"]) else " (not finite: check the model)")
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
