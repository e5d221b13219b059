"""Time to accuracy of whole ``lit-accel`` runs, as a user runs them, on any CIFAR-format folder.

Each recipe is the shipped ``configs/cifar10.yaml`` plus a few command-line arguments. A run is
``lit-accel fit`` then ``lit-accel test --ckpt_path best`` (the README's commands), each its own
process in a fresh folder, so the seconds are what a user waits for: start-up, data loading,
training, validation, checkpoints and the recipe's callbacks included. Per recipe it prints the
whole-process seconds of ``fit`` and of ``test``, the test accuracy, the final ``train/acc`` and
``val/acc`` (a heuristic capacity check: a ``train/acc`` well below ``val/acc`` says the recipe
underfits and more capacity or less regularization would pay; ``train/acc`` is the epoch's running
accuracy with augmentation and dropout on, ``val/acc`` includes flip averaging when it is on), the
training seconds (validation excluded) and the validation accuracy after each epoch against
training time. Recipes alternate from one repetition to the
next; the table shows medians.

Usage::

    python -m tools.bench recipe --data_dir DIR           # DIR holds cifar-10-batches-py/
    python -m tools.bench recipe                          # the synthetic set (offline)
    python -m tools.bench recipe --recipes recipe,epochs3,sgd-old --reps 3
    python -m tools.bench recipe --recipe "mine=--model.optimizer.init_args.lr 0.004"
    python -m tools.bench recipe --list                   # the named recipes

``DIR`` is any folder in CIFAR-10's on-disk format (``cifar-10-batches-py/`` with the five
training batches, ``test_batch`` and ``batches.meta``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_accel.measure import cell, markdown_table, median, rounds

REPO = Path(__file__).resolve().parents[2]
RECIPE_CONFIG = REPO / "configs" / "cifar10.yaml"
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"

# name: (what it is, arguments after the recipe). The shipped recipe first: ratios are to it.
RECIPES: dict[str, tuple[str, list[str]]] = {
    "recipe": ("configs/cifar10.yaml as shipped", []),
    "epochs3": ("the recipe, --trainer.max_epochs 3", ["--trainer.max_epochs", "3"]),
    "epochs2": ("the recipe, --trainer.max_epochs 2", ["--trainer.max_epochs", "2"]),
    "epochs8": ("the recipe, --trainer.max_epochs 8 (is more time worth it?)", ["--trainer.max_epochs", "8"]),
    "crop": (
        "the recipe plus random 4-pixel crops (more augmentation)",
        ["--data.random_crop", "true"],
    ),
    "no-flip": (
        "the recipe without flips (training and test time): for images whose mirror image is another class",
        ["--data.horizontal_flip", "false", "--model.flip_tta", "false"],
    ),
    "wider": (
        "the recipe with the network at 1.5x width (more capacity, slower)",
        ["--model.net.init_args.width", "24"],
    ),
    "sgd-old": (
        "the previous recipe: BatchNormCNN width 16, SGD+Nesterov 0.05, label smoothing 0.1, crop+flip, fp32 "
        "NCHW, 15 epochs; its cosine now over optimizer steps (WarmupDecayLR, no warm-up), not epochs",
        [
            "--model.net",
            "lit_accel.models.BatchNormCNN",
            "--model.net.init_args.width",
            "16",
            "--model.optimizer",
            "torch.optim.SGD",
            "--model.optimizer.init_args.lr",
            "0.05",
            "--model.optimizer.init_args.momentum",
            "0.9",
            "--model.optimizer.init_args.nesterov",
            "true",
            "--model.optimizer.init_args.weight_decay",
            "5e-4",
            "--model.lr_scheduler.init_args.warmup_fraction",
            "0.0",
            "--model.label_smoothing",
            "0.1",
            "--model.channels_last",
            "false",
            "--model.flip_tta",
            "false",
            "--data.random_crop",
            "true",
            "--data.batch_size",
            "256",
            "--trainer.max_epochs",
            "15",
        ],
    ),
    "seed-adam": (
        "the plain-loop reference through lit-accel: SeedCNN, Adam 1e-3, constant LR, batch 128, no "
        "augmentation, no label smoothing, 3 epochs",
        [
            "--model.net",
            "lit_accel.models.SeedCNN",
            "--model.optimizer",
            "torch.optim.Adam",
            "--model.optimizer.init_args.lr",
            "0.001",
            "--model.lr_scheduler",
            "null",
            "--model.label_smoothing",
            "0.0",
            "--model.channels_last",
            "false",
            "--model.flip_tta",
            "false",
            "--data.augment",
            "false",
            "--data.batch_size",
            "128",
            "--trainer.max_epochs",
            "3",
        ],
    ),
}
DEFAULT_RECIPES = "recipe,epochs3,epochs2"


@dataclass
class Recipe:
    name: str
    args: list[str]
    results: list[dict[str, Any]] = field(default_factory=list)


def _callback(class_path: str, **init_args: Any) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})


def run_recipe(
    recipe_args: list[str],
    data_args: list[str],
    timeout: float,
    config: Path = RECIPE_CONFIG,
    fit_exit_codes: tuple[int, ...] = (0,),
    inspect: Callable[[Path], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``lit-accel fit`` then ``lit-accel test --ckpt_path best`` in a fresh folder; their numbers.

    Args:
        recipe_args: arguments after ``--config config`` (and the data arguments).
        data_args: from :func:`data_arguments`.
        timeout: seconds each process may take.
        config: the recipe file.
        fit_exit_codes: exit statuses of ``fit`` that still count as a result (``fit_exit_code``
            says which one it was); ``test`` is skipped when no best checkpoint was written.
        inspect: called with the run's folder after both processes; its dict joins the result.
    """
    with tempfile.TemporaryDirectory(prefix="lit-accel-recipe-") as folder:
        timer_file, test_file = Path(folder) / "timer.json", Path(folder) / "test.json"
        common = ["--config", str(config), *data_args, *recipe_args, "--trainer.enable_progress_bar", "false"]
        timer = _callback("lit_accel.measure.FitTimer", warmup_steps=0, timed_steps=None, output=str(timer_file))
        fit_seconds, fit_exit_code = _run(
            [sys.executable, "-m", "lit_accel", "fit", *common, timer], folder, timeout, fit_exit_codes
        )
        tested: dict[str, float] = {}
        test_seconds = float("nan")
        if any(Path(folder).glob("runs/*/version_*/checkpoints/best-*.ckpt")):
            writer = _callback("lit_accel.measure.MetricsWriter", output=str(test_file))
            test = [*common, "--ckpt_path", "best", writer]
            test_seconds, _ = _run([sys.executable, "-m", "lit_accel", "test", *test], folder, timeout)
            tested = json.loads(test_file.read_text())
        timer = json.loads(timer_file.read_text()) if timer_file.exists() else _NO_TIMER
        extra = inspect(Path(folder)) if inspect is not None else {}
    return {
        **extra,
        "fit_exit_code": fit_exit_code,
        "fit_seconds": fit_seconds,
        "test_seconds": test_seconds,
        "test_acc": tested.get("test/acc", float("nan")),
        "train_acc": timer["final_metrics"].get("train/acc", float("nan")),
        "val_acc": timer["final_metrics"].get("val/acc", float("nan")),
        "train_seconds": timer["train_seconds"],
        "images_per_sec": timer["images_per_sec"],
        "curve": timer["curve"],
    }


# What a fit that stopped before FitTimer wrote its file (a DivergenceGuard stop) reports.
_NO_TIMER: dict[str, Any] = {
    "final_metrics": {},
    "train_seconds": float("nan"),
    "images_per_sec": float("nan"),
    "curve": [],
}


def _run(command: list[str], cwd: str, timeout: float, exit_codes: tuple[int, ...] = (0,)) -> tuple[float, int]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    if done.returncode not in exit_codes:
        shown = " ".join(shlex.quote(part) for part in command)
        raise RuntimeError(f"{shown} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, done.returncode


def parse_recipes(names: str, extra: list[str]) -> list[Recipe]:
    """Named recipes (``--recipes a,b``) followed by ``NAME=ARGS`` ones (``--recipe``)."""
    recipes = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name not in RECIPES:
            raise ValueError(f"recipe {name!r} is not known: use one of {', '.join(RECIPES)}, or --recipe NAME=ARGS")
        recipes.append(Recipe(name, list(RECIPES[name][1])))
    for item in extra:
        name, sep, args = item.partition("=")
        if not sep or not name.strip() or name.strip() in {r.name for r in recipes}:
            raise ValueError(
                f"--recipe {item!r} is not allowed: use NAME=ARGS with a new NAME, "
                "e.g. 'lr4=--model.optimizer.init_args.lr 0.004'"
            )
        recipes.append(Recipe(name.strip(), shlex.split(args)))
    if not recipes:
        raise ValueError("no recipe to run: name at least one with --recipes or --recipe")
    return recipes


def data_arguments(data_dir: str | None, smoke: bool) -> list[str]:
    """Arguments that point the recipe at a CIFAR-format folder, or at the synthetic set."""
    if data_dir is None:
        args = ["--data.synthetic", "true"]
    else:
        folder = Path(data_dir)
        if not (folder / "cifar-10-batches-py").is_dir():
            raise ValueError(
                f"--data_dir {data_dir}: no cifar-10-batches-py/ folder in it. Give the folder that holds "
                "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)."
            )
        # verify_checksums false: any CIFAR-format folder, read by the restricted loader
        args = ["--data.synthetic", "false", "--data.download", "false", "--data.verify_checksums", "false"]
        args += ["--data.data_dir", str(folder.resolve())]
    if smoke:
        args = ["--config", str(SMOKE_CONFIG), *args]
        if data_dir is not None:
            args += ["--data.val_size", "50"]
    return args


def run(recipes: list[Recipe], data_args: list[str], reps: int, timeout: float, log: Any = None) -> None:
    log = log or sys.stderr  # at call time: a caller may have replaced sys.stderr since the import
    for rep, order in rounds(recipes, reps):
        for recipe in order:
            result = run_recipe(recipe.args, data_args, timeout)
            recipe.results.append(result)
            print(
                f"# {recipe.name} (rep {rep + 1}/{reps}): fit {result['fit_seconds']:.1f} s, "
                f"test acc {result['test_acc']:.4f}",
                file=log,
                flush=True,
            )


def summarize(recipes: list[Recipe]) -> list[dict[str, Any]]:
    rows = []
    for recipe in recipes:
        results = recipe.results
        row: dict[str, Any] = {"recipe": recipe.name, "args": recipe.args, "reps": len(results)}
        for key in (
            "fit_seconds",
            "test_seconds",
            "test_acc",
            "train_acc",
            "val_acc",
            "train_seconds",
            "images_per_sec",
        ):
            row[key] = median(r[key] for r in results)
        row["curves"] = [r["curve"] for r in results]
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    columns = ["recipe", "fit s (whole process):", "test s:", "test acc:", "train acc:", "val acc:", "training s:"]
    columns += ["images/s:", "val acc after each epoch @ training s (first rep)", "reps:"]
    cells = []
    for row in rows:
        curve = ", ".join(f"{acc:.3f}@{seconds:.0f}s" for seconds, _step, acc in row["curves"][0])
        cells.append(
            [
                row["recipe"],
                f"{row['fit_seconds']:.1f}",
                f"{row['test_seconds']:.1f}",
                cell(row["test_acc"], "{:.4f}"),
                cell(row["train_acc"], "{:.3f}"),
                cell(row["val_acc"], "{:.3f}"),
                f"{row['train_seconds']:.1f}",
                cell(row["images_per_sec"]),
                curve or "—",
                str(row["reps"]),
            ]
        )
    return markdown_table(columns, cells)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_dir", help="a folder holding cifar-10-batches-py/ (default: the synthetic set)")
    parser.add_argument(
        "--recipes", default=None, help=f"named recipes, comma-separated (default {DEFAULT_RECIPES}); --list shows them"
    )
    parser.add_argument(
        "--recipe", action="append", default=[], metavar="NAME=ARGS", help="an extra recipe: the shipped one plus ARGS"
    )
    parser.add_argument("--recipe_timeout", type=float, default=1800, help="seconds one fit or test may take")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench recipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    parser.add_argument("--reps", type=int, default=1, help="repetitions of each recipe (alternating order)")
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: the recipes on a tiny budget (configs/smoke.yaml)"
    )
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--list", action="store_true", help="print the named recipes and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (what, extra) in RECIPES.items():
            print(f"{name:10s} {what}\n{'':10s} {' '.join(extra) or '(no arguments)'}")
        return []
    return run_from_args(parser, args, args.reps, args.smoke, args.json)


def run_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, reps: int, smoke: bool, json_path: str | None
) -> list[dict[str, Any]]:
    """The case, once its arguments are parsed (``stability`` has its own)."""
    if reps < 1:
        parser.error(f"--reps {reps}: use 1 or more")
    try:
        recipes = parse_recipes(args.recipes or DEFAULT_RECIPES, args.recipe)
        data_args = data_arguments(args.data_dir, smoke)
    except ValueError as error:
        parser.error(str(error))
    where = args.data_dir or "the synthetic set"
    print(f"# recipes on {where}: {', '.join(r.name for r in recipes)}; {reps} repetition(s)", flush=True)
    run(recipes, data_args, reps, args.recipe_timeout)
    rows = summarize(recipes)
    print(table(rows))
    if json_path:
        Path(json_path).write_text(json.dumps({"data": where, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
