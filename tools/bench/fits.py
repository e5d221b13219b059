"""The throughput cases' shared harness: timed ``lit-accel fit`` runs (in this process or as their own
process tree), timed plain-loop runs, their rounds, summary rows and tables.

Each throughput case module (``overhead``, ``callbacks``, ...) has ``variants(settings)``: its
variants by name, the first the one the others are compared with.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lit_accel.measure import (
    NO_CHECKPOINT_ARGS,
    FitTimer,
    MemoryWindow,
    alternate,
    cell,
    fit_in_process_tree,
    markdown_table,
    median,
    paired_ratios,
    quiet,
)
from tools import plain_loop

# networks case, NET[@WIDTH]:LR each (--networks): SeedCNN at the recipe's former LR and at its best,
# BatchNormCNN at its best (the LR and width sweeps are in BENCHMARKS.md), ResNet9 for reference.
NETWORKS = "SeedCNN:0.02,SeedCNN:0.05,BatchNormCNN:0.05,ResNet9:0.05"

Run = Callable[[], dict[str, Any]]


@dataclass
class Settings:
    """Sizes of the throughput cases (``--smoke``, quick or ``--full``, then the flags)."""

    device: str
    batch_size: int
    warmup_steps: int
    timed_steps: int
    reps: int
    network_seconds: float
    network_reps: int = 1
    network_val_every: int = 50
    network_train_images: int = 20_000  # networks case: synthetic training images
    network_val_images: int = 2_000  # and held-out images validated every network_val_every steps
    networks: str = NETWORKS
    net: str = "SeedCNN"
    resnet_width: int = 64


# --------------------------------------------------------------------------------- lit-accel runs
def lit_args(s: Settings, net: str | None = None, data_images: int | None = None, val_images: int = 64) -> list[str]:
    """``lit-accel fit`` arguments of the benchmark's training: SGD, synthetic data, nothing written."""
    net = net or s.net
    images = data_images or (s.warmup_steps + s.timed_steps + 2) * s.batch_size + val_images
    args = ["fit", "--model.net", f"lit_accel.models.{net}", "--model.optimizer", "torch.optim.SGD"]
    args += ["--model.optimizer.lr", "0.02", "--model.optimizer.momentum", "0.9", "--model.optimizer.nesterov", "true"]
    args += ["--model.optimizer.weight_decay", "5e-4", "--model.label_smoothing", "0.1"]
    args += ["--data.synthetic", "true", "--data.synthetic_size", str(images), "--data.val_size", str(val_images)]
    args += ["--data.batch_size", str(s.batch_size), "--trainer.accelerator", "gpu" if s.device == "cuda" else "cpu"]
    args += ["--trainer.devices", "1", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0", *NO_CHECKPOINT_ARGS]
    if net == "ResNet9":
        args += ["--model.net.width", str(s.resnet_width)]
    return args


def timed_fit(
    s: Settings,
    args: list[str],
    callbacks: list[Any] | None = None,
    validate: bool = False,
    budget_seconds: float | None = None,
) -> dict[str, Any]:
    """One in-process ``lit-accel fit ARGS`` (the real CLI class) timed by a FitTimer; its result.

    With ``validate``, the model is validated once more after the fit (``val_acc``; also the last
    point of ``curve``); with ``budget_seconds``, training stops after that much training time.
    """
    from lit_accel.cli import LitAccelCLI

    with tempfile.TemporaryDirectory() as folder, quiet(), contextlib.chdir(folder):
        timer = FitTimer(s.warmup_steps, None if validate else s.timed_steps, budget_seconds=budget_seconds)

        class _BenchCLI(LitAccelCLI):
            def instantiate_classes(self) -> None:
                super().instantiate_classes()
                self.trainer.callbacks.extend([timer, *(callbacks or [])])

        cli = _BenchCLI(args=args)
        result = dict(timer.result)
        if validate:
            (metrics,) = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)
            result["val_acc"] = metrics["val/acc"]
            curve = result.get("curve", [])
            if not curve or curve[-1][1] != cli.trainer.global_step:  # the fit may have validated there
                end = (round(result.get("train_seconds", 0.0), 3), cli.trainer.global_step, metrics["val/acc"])
                result["curve"] = [*curve, end]
    return result


def lit_run(s: Settings, *extra: str, callbacks: Callable[[], list[Any]] | None = None) -> Run:
    """A variant: ``lit-accel fit`` of the benchmark's training with ``extra`` overrides (and callbacks)."""
    steps = s.warmup_steps + s.timed_steps
    args = [*lit_args(s), "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0", *extra]
    return lambda: timed_fit(s, args, callbacks() if callbacks else None)


def plain_run(s: Settings, precision: str = "32-true") -> Run:
    """A variant: the same training as a plain PyTorch loop (tools/plain_loop.py)."""
    import lit_accel.models as nets
    from lit_accel.data import make_synthetic_cifar

    images, labels = make_synthetic_cifar((s.warmup_steps + s.timed_steps + 2) * s.batch_size, seed=0)

    def run() -> dict[str, Any]:
        memory = MemoryWindow()
        torch.manual_seed(0)
        net = getattr(nets, s.net)(**({"width": s.resnet_width} if s.net == "ResNet9" else {}))
        result = plain_loop.train(
            net, images, labels, s.batch_size, s.warmup_steps, s.timed_steps, precision=precision, device=s.device
        )
        return {"images_per_sec": result.images_per_sec, "peak_memory_mb": memory.peak_mb(s.device)}

    return run


def subprocess_run(s: Settings, devices: int) -> Run:
    """A variant: ``lit-accel fit`` as its own process tree (DDP needs one)."""
    # Per-device batch halves with 2 processes: the same global batch, as a fair scaling test.
    args = [*lit_args(s)[1:], "--data.batch_size", str(max(1, s.batch_size // devices))]
    args += ["--trainer.max_steps", str(s.warmup_steps + s.timed_steps), "--trainer.limit_val_batches", "0"]
    args += ["--trainer.devices", str(devices), *(["--trainer.strategy", "ddp"] if devices > 1 else [])]

    def run() -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as folder:
            return fit_in_process_tree(args, s.warmup_steps, s.timed_steps, timeout=900, cwd=folder)

    return run


# ------------------------------------------------------------------------------------ the rounds
def measure(case: str, variants: dict[str, Run], reps: int) -> list[dict[str, Any]]:
    """Every variant ``reps`` times in alternating rounds; a summary row per variant (medians, and the
    median of the paired ratios to the first variant)."""
    results = alternate(variants, reps)
    base = [r["images_per_sec"] for r in next(iter(results.values()))]
    rows = []
    for name, runs in results.items():
        rates = [r["images_per_sec"] for r in runs]
        row: dict[str, Any] = {
            "case": case,
            "variant": name,
            "images_per_sec": median(rates),
            "ratio": median(paired_ratios(rates, base)),
            "data_wait": median(r.get("data_wait", float("nan")) for r in runs),
            "peak_memory_mb": median(r.get("peak_memory_mb", float("nan")) for r in runs),
            "reps": len(rates),
        }
        if "val_acc" in runs[0]:
            row["val_acc"] = median(r["val_acc"] for r in runs)
        if "curve" in runs[0] and case == "networks":
            from tools.bench.networks import summarize_curves

            row.update(summarize_curves(runs))
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The throughput table: a row per case and variant."""
    columns = ["case", "variant", "images/s (median):", "ratio to first:", "data wait:", "peak memory MB:"]
    cells = [
        [
            row["case"],
            row["variant"],
            cell(row["images_per_sec"]),
            cell(row["ratio"], "{:.3f}"),
            cell(row["data_wait"], "{:.1%}"),
            cell(row["peak_memory_mb"]),
            cell(row.get("val_acc"), "{:.3f}"),
            str(row["reps"]),
        ]
        for row in rows
    ]
    return markdown_table([*columns, "val acc:", "reps:"], cells)


def machine() -> str:
    """The machine and versions, for a report's header."""
    import lightning

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    return (
        f"{os.cpu_count()} CPU cores, {device}, torch {torch.__version__}, lightning {lightning.__version__}, "
        f"{torch.get_num_threads()} torch threads"
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The sizes for ``--smoke`` / quick / ``--full``, then the flags that override them."""
    gpu = args.device == "cuda"
    if args.smoke:
        s = Settings(args.device, 32, 1, 3, 1, 1.0, resnet_width=8, network_val_every=10)
        s.network_train_images, s.network_val_images = 1_024, 128
    elif args.full:
        s = Settings(args.device, 512 if gpu else 128, 10, 300 if gpu else 150, 5, 30.0 if gpu else 45.0, 3)
    else:
        s = Settings(args.device, 512 if gpu else 128, 5, 100 if gpu else 30, 3, 15.0, network_reps=1)
    s.reps = args.reps or s.reps
    s.network_reps = args.network_reps or s.network_reps
    s.network_seconds = args.network_seconds or s.network_seconds
    s.batch_size = args.batch_size or s.batch_size
    s.net, s.networks = args.net, args.networks
    if not args.smoke:
        s.resnet_width = args.resnet_width
    return s


def parse(argv: list[str], cases: tuple[str, ...] = ("all",)) -> argparse.Namespace:
    """The throughput cases' flags (one message and exit 2 for a bad one)."""
    from tools.bench.networks import parse_networks

    parser = argparse.ArgumentParser(prog=f"python -m tools.bench {','.join(cases)}", description=__doc__)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="more steps and repetitions (BENCHMARKS.md)")
    size.add_argument("--smoke", action="store_true", help="seconds: checks that the cases run")
    parser.add_argument("--reps", type=int, help="rounds per case (default: quick 3, full 5, smoke 1)")
    parser.add_argument("--network_reps", type=int, help="rounds of the networks case (quick 1, full 3)")
    parser.add_argument("--batch_size", type=int, help="per step (default 128 on CPU, 512 on CUDA)")
    parser.add_argument("--resnet_width", type=int, default=64, help="ResNet9 width (networks case, --net ResNet9)")
    parser.add_argument("--networks", default=NETWORKS, help="networks case: NET[@WIDTH]:LR, comma-separated")
    parser.add_argument("--network_seconds", type=float, help="networks case: training seconds per run")
    parser.add_argument(
        "--net",
        default="SeedCNN",
        choices=("SeedCNN", "BatchNormCNN", "LiteCNN", "ResNet9"),
        help="the network of every case but networks (default SeedCNN, the baseline)",
    )
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU on this machine")
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps {args.reps}: use 1 or more")
    try:
        parse_networks(args.networks)  # a bad spec fails now, not after the other cases
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str], cases: tuple[str, ...]) -> list[dict[str, Any]]:
    """``python -m tools.bench CASE[,CASE...] [--flags]`` for the throughput cases; returns the rows."""
    from tools.bench.networks import network_table

    args = parse(argv, cases)
    s = settings_from_args(args)
    print(f"# lit_accel bench — {machine()}")
    print(f"# settings: {s}")
    rows: list[dict[str, Any]] = []
    for case in cases:
        started = time.perf_counter()
        variants = importlib.import_module(f"tools.bench.{case}").variants(s)
        rows += measure(case, variants, s.network_reps if case == "networks" else s.reps)
        print(f"# {case}: {time.perf_counter() - started:.0f} s", flush=True)
    print(table(rows))
    if any("seconds_to" in row for row in rows):
        print()
        print(network_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "settings": asdict(s), "rows": rows}, indent=2))
    return rows
