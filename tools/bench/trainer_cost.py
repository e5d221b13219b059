"""Where ``lit-accel fit`` loses time against a plain PyTorch loop with the recipe's own settings.

The baseline is ``tools/plain_loop.py`` with the shipped recipe's training: LiteCNN in channels_last,
AdamW (LR 0.004, weight decay 0.01), label smoothing 0.1, horizontal flips, batch 256, fp32 (the
recipe's warm-up + cosine schedule is left out: one multiply per step). Against it, ``lit-accel fit
--config cifar10`` on the synthetic set, then the same with one part taken away at a time, so each
row's gain over the row above is that part's cost:

1. the recipe as shipped: its callbacks (meter, guard, GeneralizationMonitor, HParamsSummary,
   ValidationFigures), ``last.ckpt`` every 100 steps, TensorBoard logging every 20 steps;
2. without the step checkpoints (``--step_checkpoint.every_n_train_steps 0``);
3. and without the recipe's callbacks (``--trainer.callbacks []``);
4. and without a logger (``--trainer.logger false``): Lightning's own loop, nothing of lit_accel's
   but the data module and the LightningModule.

Every variant trains ``--warmup_steps`` untimed steps, then ``--timed_steps`` timed ones (a step
checkpoint falls inside the timed window at step 100); the clock covers everything between the
first and the last timed step (logging, checkpoint saves), validation excluded
(:class:`lit_accel.measure.FitTimer`). The progress bar is off in every variant (its cost depends
on the terminal). Rounds alternate the variants' order; each figure is the median over rounds of a
variant's images/s over the same round's plain loop.

    python -m tools.bench trainer_cost --rounds 5          # minutes, on a quiet machine
    python -m tools.bench trainer_cost --smoke             # seconds: checks the case itself
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from lit_accel.measure import alternate, cell, markdown_table, paired_ratios, spread
from tools import plain_loop

RECIPE_LR = 0.004  # configs/cifar10.yaml's AdamW LR
RECIPE_BATCH = 256

Run = Callable[[], dict[str, Any]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench trainer_cost", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup_steps", type=int, default=5)
    p.add_argument("--timed_steps", type=int, default=150, help="timed steps (the step checkpoint is at step 100)")
    p.add_argument("--batch_size", type=int, default=RECIPE_BATCH)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks the case runs")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.warmup_steps, args.timed_steps, args.batch_size = 1, 1, 3, 16
    for name in ("rounds", "timed_steps", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: use 1 or more")
    if args.warmup_steps < 0:
        p.error(f"--warmup_steps {args.warmup_steps}: use 0 or more")
    return args


def recipe_args(args: argparse.Namespace) -> list[str]:
    """``lit-accel fit`` of the shipped recipe on enough synthetic images for the timed steps in one epoch."""
    val_images = 2 * args.batch_size
    images = (args.warmup_steps + args.timed_steps + 2) * args.batch_size + val_images
    return [
        "fit",
        "--config",
        "cifar10",
        "--data.synthetic",
        "true",
        "--data.synthetic_size",
        str(images),
        "--data.val_size",
        str(val_images),
        "--data.batch_size",
        str(args.batch_size),
        "--trainer.max_epochs",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.accelerator",
        "cpu",
    ]


# Cumulative: each variant takes one more part away than the one before.
REMOVALS = {
    "lit-accel fit: the recipe": [],
    "- step checkpoints": ["--step_checkpoint.every_n_train_steps", "0"],
    "- recipe callbacks": ["--trainer.callbacks", "[]"],
    "- logger": ["--trainer.logger", "false"],
}


def variants(args: argparse.Namespace) -> dict[str, Run]:
    """The plain loop first (the others' reference), then the recipe with parts taken away."""
    from lit_accel.data import make_synthetic_cifar
    from lit_accel.models import LiteCNN
    from tools.bench.fits import Settings, timed_fit

    images, labels = make_synthetic_cifar((args.warmup_steps + args.timed_steps + 2) * args.batch_size, seed=0)

    def plain() -> dict[str, Any]:
        result = plain_loop.train(
            LiteCNN(),
            images,
            labels,
            args.batch_size,
            args.warmup_steps,
            args.timed_steps,
            lr=RECIPE_LR,
            channels_last=True,
            optimizer_name="adamw",
            random_crop=False,
        )
        return {"images_per_sec": result.images_per_sec}

    settings = Settings("cpu", args.batch_size, args.warmup_steps, args.timed_steps, args.rounds, 0.0)
    runs: dict[str, Run] = {"plain loop (channels_last)": plain}
    removed: list[str] = []
    for name, flags in REMOVALS.items():
        removed = [*removed, *flags]
        fit_args = [*recipe_args(args), *removed]
        runs[name] = lambda fit_args=fit_args: timed_fit(settings, fit_args)
    return runs


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Prints the table; returns a row per variant (images/s per round, ratio to the plain loop)."""
    import json

    args = parse_args(argv)
    results = alternate(variants(args), args.rounds)
    base = [r["images_per_sec"] for r in next(iter(results.values()))]
    rows, cells = [], []
    previous: float | None = None
    for name, runs in results.items():
        rates = [r["images_per_sec"] for r in runs]
        ratio = spread(paired_ratios(rates, base))
        rows.append({"variant": name, "images_per_sec": rates, "ratio": ratio.median})
        step = "" if previous is None else f"{ratio.median - previous:+.3f}"
        cells.append(
            [
                name,
                cell(spread(rates).median),
                cell(ratio.median, "{:.3f}"),
                f"{ratio.low:.3f}-{ratio.high:.3f}",
                step,
            ]
        )
        previous = ratio.median
    print(
        f"{args.rounds} rounds; {args.warmup_steps} warm-up + {args.timed_steps} timed steps, batch {args.batch_size}; "
        "target: the recipe >= 0.97 x the plain loop"
    )
    columns = ["variant", "images/s (median):", "ratio to plain:", "range:", "change from the row above:"]
    print(markdown_table(columns, cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows
