"""lit_accel benchmarks: what the trainer costs over a plain PyTorch loop, and what each lever buys.

Every case runs its variants in one process tree, alternating the order of the variants from one
repetition to the next, after warm-up steps, and reports medians: training images/s (start-up and
validation excluded), the ratio to the case's first variant (median of the per-repetition ratios),
the data-wait share of step time, and peak memory (CUDA: max allocated; CPU: the process's peak
RSS during the run, Linux). Cases:

=========  ==================================================================================
overhead   tools/plain_loop.py vs ``lit-accel fit`` (recipe callbacks off), same settings
callbacks  lit-accel with ThroughputMeter + DivergenceGuard + DynamicBatchLR vs none
pipeline   preload vs dataloader with 0, 1, 2 workers
precision  32-true vs bf16-mixed vs 16-mixed (runs as bf16-mixed on a CPU)
ddp        1 vs 2 processes (global images/s; scaling efficiency = ratio / 2); subprocesses
networks   accuracy per second of training: SeedCNN (two LRs), BatchNormCNN, ResNet9 trained
           for the same training time (validation left out), validated every 50 steps; images/s,
           accuracy after 15 s and at the end, seconds to reach 0.90 / 0.93 / 0.95
recipe     whole ``lit-accel fit`` + ``lit-accel test`` processes of the shipped recipe and named
           alternatives, on the synthetic set or any CIFAR-format folder (``--data-dir``): seconds,
           test accuracy, train vs val accuracy, val accuracy per epoch (tools/bench_recipe.py).
           Not part of ``all``: run it by name.
stability  the recipe with its LR x1, x10, x40 (``--lr-multipliers``), with and without
           DivergenceGuard, ``--epochs`` 3: test accuracy, gap to the tuned run, skips, rollbacks,
           seconds (tools/bench_stability.py). Not part of ``all``: run it by name.
=========  ==================================================================================

Usage::

    python tools/bench.py                        # quick: every case, a couple of minutes on 2 CPU cores
    python tools/bench.py --full                 # the BENCHMARKS.md run
    python tools/bench.py --cases overhead,precision --reps 7
    python tools/bench.py --full --cases pipeline,precision --net BatchNormCNN   # the recipe's network
    python tools/bench.py --device cuda --full   # the GPU variant (under 8 minutes on one GPU)
    python tools/bench.py --smoke                # seconds: checks the bench itself (used by a test)
    python tools/bench.py --cases recipe --data-dir DIR   # time to accuracy of whole runs on real images
    python tools/bench.py --cases stability --data-dir DIR   # a wrong LR, with and without the guard

A note on noise: on a shared 2-core machine, run-to-run noise is several percent. Only ratios
measured in the same run, with alternating order, mean anything; the medians damp outliers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

import bench_recipe  # noqa: E402
import bench_stability  # noqa: E402
import plain_loop  # noqa: E402
from bench_timer import StepTimer, reset_peak_rss  # noqa: E402

from lit_accel._measure import NO_CHECKPOINT_ARGS, quiet  # noqa: E402

CASES = ("overhead", "callbacks", "pipeline", "precision", "ddp", "networks")
# networks case, NET[@WIDTH]:LR each (--networks): SeedCNN at the recipe's former LR and at its best,
# BatchNormCNN at its best (the LR and width sweeps are in BENCHMARKS.md), ResNet9 for reference.
NETWORKS = "SeedCNN:0.02,SeedCNN:0.05,BatchNormCNN:0.05,ResNet9:0.05"
# validation accuracies the networks case reports the training time to reach
ACCURACY_TARGETS = (0.90, 0.93, 0.95)
# and the validation accuracy reached after this many seconds of training
EARLY_SECONDS = 15.0


@dataclass
class Settings:
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


@dataclass
class Variant:
    name: str
    run: Callable[[], dict[str, Any]]
    results: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------- lit-accel runs
def _lit_args(s: Settings, net: str | None = None, data_images: int | None = None, val_images: int = 64) -> list[str]:
    net = net or s.net
    images = data_images or (s.warmup_steps + s.timed_steps + 2) * s.batch_size + val_images
    args = [
        "fit",
        "--model.net",
        f"lit_accel.models.{net}",
        "--model.optimizer",
        "torch.optim.SGD",
        "--model.optimizer.lr",
        "0.02",
        "--model.optimizer.momentum",
        "0.9",
        "--model.optimizer.nesterov",
        "true",
        "--model.optimizer.weight_decay",
        "5e-4",
        "--model.label_smoothing",
        "0.1",
        "--data.synthetic",
        "true",
        "--data.synthetic_size",
        str(images),
        "--data.val_size",
        str(val_images),
        "--data.batch_size",
        str(s.batch_size),
        "--trainer.accelerator",
        "gpu" if s.device == "cuda" else "cpu",
        "--trainer.devices",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.num_sanity_val_steps",
        "0",
        *NO_CHECKPOINT_ARGS,
    ]
    if net == "ResNet9":
        args += ["--model.net.width", str(s.resnet_width)]
    return args


def _timed_fit(
    s: Settings,
    extra: list[str],
    callbacks: list[Any] | None = None,
    validate: bool = False,
    budget_seconds: float | None = None,
) -> dict[str, Any]:
    """One in-process ``lit-accel fit`` (the real CLI class) with a StepTimer; returns its numbers.

    With ``validate``, the model is validated once more after the fit (``val_acc``; also the last
    point of ``curve`` unless the fit validated at its last step); with ``budget_seconds``, training
    stops after that much training time.
    """
    from lit_accel.cli import LitAccelCLI

    timer = StepTimer(s.warmup_steps, None if validate else s.timed_steps, budget_seconds=budget_seconds)

    class _BenchCLI(LitAccelCLI):
        def instantiate_classes(self) -> None:
            super().instantiate_classes()
            self.trainer.callbacks.extend([timer, *(callbacks or [])])

    with tempfile.TemporaryDirectory() as folder, quiet(), contextlib.chdir(folder):
        reset_peak_rss()
        cli = _BenchCLI(args=extra)
        result = dict(timer.result)
        if validate:
            (metrics,) = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)
            result["val_acc"] = metrics["val/acc"]
            result["train_steps"] = cli.trainer.global_step
            curve = result.get("curve", [])
            if not curve or curve[-1][1] != cli.trainer.global_step:  # the fit may have validated there
                end = (round(result.get("train_seconds", 0.0), 3), cli.trainer.global_step, metrics["val/acc"])
                result["curve"] = [*curve, end]
    return result


def _lit_run(
    s: Settings, *extra: str, callbacks: Callable[[], list[Any]] | None = None
) -> Callable[[], dict[str, Any]]:
    steps = s.warmup_steps + s.timed_steps
    args = [*_lit_args(s), "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0", *extra]
    return lambda: _timed_fit(s, args, callbacks() if callbacks else None)


def _plain_run(s: Settings, precision: str = "32-true") -> Callable[[], dict[str, Any]]:
    import lit_accel.models as nets
    from lit_accel.data import make_synthetic_cifar

    images, labels = make_synthetic_cifar((s.warmup_steps + s.timed_steps + 2) * s.batch_size, seed=0)

    def run() -> dict[str, Any]:
        torch.manual_seed(0)
        net = getattr(nets, s.net)(**({"width": s.resnet_width} if s.net == "ResNet9" else {}))
        if s.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()
        result = plain_loop.train(
            net, images, labels, s.batch_size, s.warmup_steps, s.timed_steps, precision=precision, device=s.device
        )
        return {"images_per_sec": result.images_per_sec, "peak_memory_mb": result.peak_memory_mb}

    return run


def _subprocess_run(s: Settings, devices: int) -> Callable[[], dict[str, Any]]:
    """``lit-accel fit`` as its own process tree (DDP needs one); the timer reports through a file."""
    steps = s.warmup_steps + s.timed_steps

    def run() -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as folder:
            output = Path(folder) / "timer.json"
            timer = json.dumps(
                {
                    "class_path": "bench_timer.StepTimer",
                    "init_args": {"warmup_steps": s.warmup_steps, "timed_steps": s.timed_steps, "output": str(output)},
                }
            )
            # Per-device batch halves with 2 processes: the same global batch, as a fair scaling test.
            per_device = max(1, s.batch_size // devices)
            args = [
                *_lit_args(s),
                "--data.batch_size",
                str(per_device),
                "--trainer.max_steps",
                str(steps),
                "--trainer.limit_val_batches",
                "0",
                "--trainer.devices",
                str(devices),
                "--trainer.callbacks+=" + timer,
            ]
            if devices > 1:
                args += ["--trainer.strategy", "ddp"]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TOOLS), os.environ.get("PYTHONPATH", "")])}
            command = [sys.executable, "-m", "lit_accel", *args]
            done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
            return json.loads(output.read_text())

    return run


# ------------------------------------------------------------------------------------- the cases
def _all_callbacks() -> list[Any]:
    from lit_accel.callbacks import DivergenceGuard, DynamicBatchLR, ThroughputMeter

    return [ThroughputMeter(), DivergenceGuard(), DynamicBatchLR()]


def build_case(name: str, s: Settings) -> list[Variant]:
    if name == "overhead":
        return [Variant("plain PyTorch loop", _plain_run(s)), Variant("lit-accel fit", _lit_run(s))]
    if name == "callbacks":
        return [
            Variant("no callbacks", _lit_run(s)),
            Variant("meter + guard + dynamic", _lit_run(s, callbacks=_all_callbacks)),
        ]
    if name == "pipeline":
        variants = [Variant("preload", _lit_run(s))]
        for workers in (0, 1, 2):
            variants.append(
                Variant(
                    f"dataloader, {workers} workers",
                    _lit_run(s, "--data.pipeline", "dataloader", "--data.num_workers", str(workers)),
                )
            )
        return variants
    if name == "precision":
        variants = [
            Variant("32-true", _lit_run(s)),
            Variant("bf16-mixed", _lit_run(s, "--trainer.precision", "bf16-mixed")),
        ]
        label = "16-mixed" if s.device == "cuda" else "16-mixed (runs as bf16-mixed on CPU)"
        variants.append(Variant(label, _lit_run(s, "--trainer.precision", "16-mixed")))
        return variants
    if name == "ddp":
        return [Variant("1 process", _subprocess_run(s, 1)), Variant("DDP, 2 processes", _subprocess_run(s, 2))]
    if name == "networks":
        variants = []
        for net, width, lr in parse_networks(s.networks):
            args = [
                *_lit_args(
                    s,
                    net=net,
                    data_images=s.network_train_images + s.network_val_images,
                    val_images=s.network_val_images,
                ),
                "--model.optimizer.lr",
                str(lr),
                "--trainer.max_epochs",
                "1000",
                "--trainer.check_val_every_n_epoch",
                "null",
                "--trainer.val_check_interval",
                str(s.network_val_every),
            ]
            if net == "ResNet9" and width is None:
                width = s.resnet_width
            if width is not None:
                args += ["--model.net.width", str(width)]
            label = f"{net} (width {width}), lr {lr}" if width is not None else f"{net}, lr {lr}"
            run = partial(_timed_fit, s, args, validate=True, budget_seconds=s.network_seconds)
            variants.append(Variant(label, run))
        return variants
    raise ValueError(f"case {name!r} is not known: use one of {', '.join(CASES)}")


def parse_networks(spec: str) -> list[tuple[str, int | None, float]]:
    """``"SeedCNN:0.05,BatchNormCNN@24:0.05"`` → ``[("SeedCNN", None, 0.05), ("BatchNormCNN", 24, 0.05)]``."""
    import lit_accel.models as nets

    parsed = []
    for item in spec.split(","):
        name_width, _, lr = item.strip().partition(":")
        name, _, width = name_width.partition("@")
        if name not in nets.__all__ or name == "ImageClassifier" or not lr:
            raise ValueError(f"--networks item {item!r} is not allowed: use NET[@WIDTH]:LR, e.g. BatchNormCNN@16:0.05")
        parsed.append((name, int(width) if width else None, float(lr)))
    return parsed


def run_case(variants: list[Variant], reps: int) -> None:
    for rep in range(reps):
        order = variants if rep % 2 == 0 else variants[::-1]
        for variant in order:
            variant.results.append(variant.run())


# ------------------------------------------------------------------------------------ reporting
def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def summarize(case: str, variants: list[Variant]) -> list[dict[str, Any]]:
    base = variants[0].results
    rows = []
    for variant in variants:
        rates = [r["images_per_sec"] for r in variant.results]
        ratios = [r["images_per_sec"] / b["images_per_sec"] for r, b in zip(variant.results, base)]
        row = {
            "case": case,
            "variant": variant.name,
            "images_per_sec": _median(rates),
            "ratio": _median(ratios),
            "data_wait": _median([r.get("data_wait_fraction", float("nan")) for r in variant.results]),
            "peak_memory_mb": _median([r.get("peak_memory_mb", float("nan")) for r in variant.results]),
            "reps": len(rates),
        }
        if "val_acc" in variant.results[0]:
            row["val_acc"] = _median([r["val_acc"] for r in variant.results])
        if "curve" in variant.results[0] and case == "networks":
            row["train_seconds"] = _median([r["train_seconds"] for r in variant.results])
            row["seconds_to"] = {
                f"{target:.2f}": _median([seconds_to_accuracy(r["curve"], target) for r in variant.results])
                for target in ACCURACY_TARGETS
            }
            row["early_val_acc"] = _median([accuracy_after(r["curve"], EARLY_SECONDS) for r in variant.results])
            row["curves"] = [r["curve"] for r in variant.results]
        rows.append(row)
    return rows


def seconds_to_accuracy(curve: list[tuple[float, int, float]], target: float) -> float:
    """Training seconds at the first validation with accuracy ≥ ``target``; inf if none reached it."""
    return next((seconds for seconds, _step, accuracy in curve if accuracy >= target), float("inf"))


def accuracy_after(curve: list[tuple[float, int, float]], seconds: float) -> float:
    """Accuracy at the last validation within ``seconds`` of training; NaN if there was none."""
    return max((point for point in curve if point[0] <= seconds), default=(0.0, 0, float("nan")))[2]


def _fmt(value: float, pattern: str) -> str:
    return "—" if value != value else pattern.format(value)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | variant | images/s (median) | ratio to first | data wait | peak memory MB | val acc | reps |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['variant']} | {_fmt(row['images_per_sec'], '{:,.0f}')} | "
            f"{_fmt(row['ratio'], '{:.3f}')} | {_fmt(row['data_wait'], '{:.1%}')} | "
            f"{_fmt(row['peak_memory_mb'], '{:,.0f}')} | {_fmt(row.get('val_acc', float('nan')), '{:.3f}')} | "
            f"{row['reps']} |"
        )
    return "\n".join(lines)


def network_table(rows: list[dict[str, Any]]) -> str:
    """Accuracy per second of training: the networks case's time-to-accuracy view."""
    targets = [f"{t:.2f}" for t in ACCURACY_TARGETS]
    lines = [
        f"| network | images/s | training s | val acc after {EARLY_SECONDS:.0f} s | val acc at the end | "
        + " | ".join(f"s to val acc {t}" for t in targets)
        + " |",
        "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in targets) + " |",
    ]
    for row in rows:
        if "seconds_to" not in row:
            continue
        reached = ["not reached" if v == float("inf") else f"{v:.1f}" for v in (row["seconds_to"][t] for t in targets)]
        lines.append(
            f"| {row['variant']} | {_fmt(row['images_per_sec'], '{:,.0f}')} | {row['train_seconds']:.1f} | "
            f"{_fmt(row['early_val_acc'], '{:.3f}')} | {row['val_acc']:.3f} | {' | '.join(reached)} |"
        )
    return "\n".join(lines)


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    import lightning

    return (
        f"{os.cpu_count()} CPU cores, {device}, torch {torch.__version__}, lightning {lightning.__version__}, "
        f"{torch.get_num_threads()} torch threads"
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="all", help=f"comma-separated subset of {','.join(CASES)}, or all")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="more steps and repetitions (BENCHMARKS.md)")
    size.add_argument("--smoke", action="store_true", help="seconds: checks that the bench runs")
    parser.add_argument("--reps", type=int, help="repetitions per variant (default: quick 3, full 5, smoke 1)")
    parser.add_argument("--network-reps", type=int, help="repetitions in the networks case (quick 1, full 3)")
    parser.add_argument("--batch-size", type=int, help="per step (default 128 on CPU, 512 on CUDA)")
    parser.add_argument("--resnet-width", type=int, default=64, help="ResNet9 width (networks case, --net ResNet9)")
    parser.add_argument("--networks", default=NETWORKS, help="networks case: NET[@WIDTH]:LR, comma-separated")
    parser.add_argument("--network-seconds", type=float, help="networks case: training seconds per run")
    parser.add_argument(
        "--net",
        default="SeedCNN",
        choices=("SeedCNN", "BatchNormCNN", "LiteCNN", "ResNet9"),
        help="the network of every case but networks (default SeedCNN, the baseline)",
    )
    parser.add_argument("--json", help="also write the rows to this file")
    bench_recipe.add_arguments(parser.add_argument_group("recipe and stability cases (tools/bench_recipe.py)"))
    bench_stability.add_arguments(parser.add_argument_group("stability case (tools/bench_stability.py)"))
    args = parser.parse_args(argv)
    if args.cases == "recipe":
        return bench_recipe.run_from_args(parser, args, args.reps or 1, args.smoke, args.json)
    if args.cases == "stability":
        return bench_stability.run_from_args(parser, args, args.reps or 1, args.smoke, args.json)

    cases = CASES if args.cases == "all" else tuple(c.strip() for c in args.cases.split(","))
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}: choose from {', '.join(CASES)}, or recipe or stability alone")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU on this machine")
    gpu = args.device == "cuda"
    if args.smoke:
        s = Settings(
            args.device,
            32,
            1,
            3,
            1,
            1.0,
            resnet_width=8,
            network_val_every=10,
            network_train_images=1_024,
            network_val_images=128,
        )
    elif args.full:
        s = Settings(
            args.device, 512 if gpu else 128, 10, 300 if gpu else 150, 5, 30.0 if gpu else 45.0, network_reps=3
        )
    else:
        s = Settings(args.device, 512 if gpu else 128, 5, 100 if gpu else 30, 3, 15.0, network_reps=1)
    if args.reps:
        s.reps = args.reps
    if args.network_reps:
        s.network_reps = args.network_reps
    s.net = args.net
    s.networks = args.networks
    try:
        parse_networks(s.networks)  # a bad spec fails now, not after the other cases
    except ValueError as error:
        parser.error(str(error))
    if args.network_seconds:
        s.network_seconds = args.network_seconds
    if args.batch_size:
        s.batch_size = args.batch_size
    if not args.smoke:
        s.resnet_width = args.resnet_width

    print(f"# lit_accel bench — {machine()}")
    print(f"# settings: {s}")
    rows: list[dict[str, Any]] = []
    for case in cases:
        started = time.perf_counter()
        variants = build_case(case, s)
        run_case(variants, s.network_reps if case == "networks" else s.reps)
        rows += summarize(case, variants)
        print(f"# {case}: {time.perf_counter() - started:.0f} s", flush=True)
    print(table(rows))
    if any("seconds_to" in row for row in rows):
        print()
        print(network_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "settings": s.__dict__, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
