"""Stability of whole ``lit-accel`` runs when the learning rate is wrong, with and without the guard.

The shipped recipe (``configs/cifar10.yaml``) runs with its peak learning rate multiplied by each
factor (default ×1, ×10, ×40), once with the recipe's callbacks as shipped (``DivergenceGuard``
on) and once with the guard taken out of the recipe (every other callback kept, so the two runs
differ only by the guard). Each run is ``lit-accel fit`` then ``lit-accel test --ckpt_path best``
in a fresh folder (the ``recipe`` case's harness). Per run it prints the test accuracy, the final val
accuracy, the gap to the tuned run (×1 with the guard), the guard's skipped steps, rollbacks, LR
factor and whether it stopped the run (exit 3), and the whole-process seconds of ``fit``.

Usage::

    python -m tools.bench stability --data_dir DIR          # DIR holds cifar-10-batches-py/
    python -m tools.bench stability                         # the synthetic set (offline)
    python -m tools.bench stability --lr_multipliers 1,40 --epochs 3 --reps 2
    python -m tools.bench stability --smoke                 # seconds

Factors, guard on/off and repetitions alternate in order; the table shows medians.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from lit_accel.measure import cell, markdown_table, median, rounds
from tools.bench import recipe as bench_recipe

GUARD_CLASS = "lit_accel.callbacks.DivergenceGuard"
DEFAULT_MULTIPLIERS = "1,10,40"
DEFAULT_EPOCHS = 3


@dataclass
class StabilityRun:
    lr_multiplier: float
    guard: bool
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"x{self.lr_multiplier:g} {'guard' if self.guard else 'no guard'}"


def recipe_lr(config: Path = bench_recipe.RECIPE_CONFIG) -> float:
    """The recipe's peak learning rate (``model.optimizer.init_args.lr``)."""
    return float(yaml.safe_load(config.read_text())["model"]["optimizer"]["init_args"]["lr"])


def write_unguarded_recipe(folder: Path, config: Path = bench_recipe.RECIPE_CONFIG) -> Path:
    """The recipe with DivergenceGuard removed from ``trainer.callbacks``, written into ``folder``."""
    recipe = yaml.safe_load(config.read_text())
    callbacks = recipe["trainer"]["callbacks"]
    kept = [c for c in callbacks if c.get("class_path") != GUARD_CLASS]
    if len(kept) == len(callbacks):
        raise ValueError(f"{config} has no {GUARD_CLASS} in trainer.callbacks: nothing to compare against")
    recipe["trainer"]["callbacks"] = kept
    path = folder / "recipe_without_guard.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def guard_state(folder: Path) -> dict[str, Any]:
    """The guard's counters from the run's last checkpoint (``divergence.ckpt`` after a stop)."""
    found = sorted(folder.glob("runs/*/version_*/divergence.ckpt")) or sorted(
        folder.glob("runs/*/version_*/checkpoints/last.ckpt")
    )
    state: dict[str, Any] = {"skipped_steps": 0, "rollbacks": 0, "lr_factor": 1.0}
    if found:
        callbacks = torch.load(found[-1], map_location="cpu", weights_only=True).get("callbacks", {})
        for key, value in callbacks.items():
            if key.startswith("DivergenceGuard"):
                state.update({k: value[k] for k in state if k in value})
    return state


def parse_multipliers(text: str) -> list[float]:
    values = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            value = float(item)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--lr_multipliers: {item!r} is not allowed: use positive numbers, e.g. 1,10,40")
        values.append(value)
    if not values:
        raise ValueError("--lr_multipliers: give at least one factor, e.g. 1,10,40")
    return values


def run(
    runs: list[StabilityRun],
    data_args: list[str],
    epochs: int,
    reps: int,
    timeout: float,
    base_lr: float,
    log: Any = None,
) -> None:
    log = log or sys.stderr  # at call time: a caller may have replaced sys.stderr since the import
    with tempfile.TemporaryDirectory(prefix="lit-accel-stability-") as folder:
        unguarded = write_unguarded_recipe(Path(folder))
        for rep, order in rounds(runs, reps):
            for item in order:
                args = [
                    "--trainer.max_epochs",
                    str(epochs),
                    "--model.optimizer.init_args.lr",
                    repr(base_lr * item.lr_multiplier),
                ]
                result = bench_recipe.run_recipe(
                    args,
                    data_args,
                    timeout,
                    config=bench_recipe.RECIPE_CONFIG if item.guard else unguarded,
                    fit_exit_codes=(0, 3),  # 3: the guard stopped the run (lit-accel's exit status)
                    inspect=guard_state,
                )
                item.results.append(result)
                print(
                    f"# {item.label} (rep {rep + 1}/{reps}): test acc {result['test_acc']:.4f}, "
                    f"skips {result['skipped_steps']}, rollbacks {result['rollbacks']}, exit {result['fit_exit_code']}",
                    file=log,
                    flush=True,
                )


def summarize(runs: list[StabilityRun]) -> list[dict[str, Any]]:
    """One row per (factor, guard): medians over repetitions; ``vs_tuned`` is the test-accuracy
    difference to the ×1 guarded row (when there is one)."""
    rows = []
    for item in runs:
        results = item.results
        row: dict[str, Any] = {"lr_multiplier": item.lr_multiplier, "guard": item.guard, "reps": len(results)}
        for key in ("test_acc", "val_acc", "train_acc", "fit_seconds", "skipped_steps", "rollbacks", "lr_factor"):
            row[key] = median(r[key] for r in results)
        row["stopped"] = sum(r["fit_exit_code"] == 3 for r in results)
        rows.append(row)
    tuned = [r["test_acc"] for r in rows if r["lr_multiplier"] == 1 and r["guard"]]
    for row in rows:
        row["vs_tuned"] = row["test_acc"] - tuned[0] if tuned else float("nan")
    return rows


def table(rows: list[dict[str, Any]], base_lr: float) -> str:
    columns = ["LR", "guard", "test acc:", "vs tuned:", "val acc:", "train acc:", "skipped steps:", "rollbacks:"]
    columns += ["LR factor:", "stopped:", "fit s:", "reps:"]
    cells = [
        [
            f"x{row['lr_multiplier']:g} ({base_lr * row['lr_multiplier']:.3g})",
            "on" if row["guard"] else "off",
            cell(row["test_acc"], "{:.4f}"),
            cell(row["vs_tuned"], "{:+.4f}"),
            cell(row["val_acc"], "{:.3f}"),
            cell(row["train_acc"], "{:.3f}"),
            f"{row['skipped_steps']:g}",
            f"{row['rollbacks']:g}",
            f"{row['lr_factor']:.3g}",
            str(row["stopped"]),
            f"{row['fit_seconds']:.1f}",
            str(row["reps"]),
        ]
        for row in rows
    ]
    return markdown_table(columns, cells)


def add_arguments(parser: argparse.ArgumentParser | Any) -> None:
    parser.add_argument(
        "--lr_multipliers", default=DEFAULT_MULTIPLIERS, help="factors on the recipe's LR (default 1,10,40)"
    )
    parser.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help="trainer.max_epochs of every run (default 3)"
    )


def run_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, reps: int, smoke: bool, json_path: str | None
) -> list[dict[str, Any]]:
    """The case, once its arguments are parsed."""
    if reps < 1:
        parser.error(f"--reps {reps}: use 1 or more")
    if args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: use 1 or more")
    try:
        multipliers = parse_multipliers(args.lr_multipliers)
        data_args = bench_recipe.data_arguments(args.data_dir, smoke)
    except ValueError as error:
        parser.error(str(error))
    base_lr = recipe_lr()
    runs = [StabilityRun(m, guard) for m in multipliers for guard in (True, False)]
    where = args.data_dir or "the synthetic set"
    print(
        f"# stability on {where}: recipe LR {base_lr:g} x {', '.join(f'{m:g}' for m in multipliers)}, guard on/off, "
        f"{args.epochs} epoch(s), {reps} repetition(s)",
        flush=True,
    )
    run(runs, data_args, args.epochs, reps, args.recipe_timeout, base_lr)
    rows = summarize(runs)
    print(table(rows, base_lr))
    if json_path:
        Path(json_path).write_text(json.dumps({"data": where, "base_lr": base_lr, "rows": rows}, indent=2))
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench stability",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data_dir", help="a folder holding cifar-10-batches-py/ (default: the synthetic set)")
    parser.add_argument("--recipe_timeout", type=float, default=1800, help="seconds one fit or test may take")
    add_arguments(parser)
    parser.add_argument("--reps", type=int, default=1, help="repetitions of each run (alternating order)")
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny runs (configs/smoke.yaml)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    return run_from_args(parser, args, args.reps, args.smoke, args.json)


if __name__ == "__main__":
    main()
