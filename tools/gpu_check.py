"""One prepared GPU check: run it once on a GPU and it writes a report of everything the GPU path does.

Usage::

    python -m tools.gpu_check REPORT_DIR                      # on a CUDA GPU, at most about 8 minutes
    python -m tools.gpu_check REPORT_DIR --data_dir DIR       # also the GPU recipe on real CIFAR-10
    python -m tools.gpu_check REPORT_DIR --quick              # on a CPU: the same code paths, tiny sizes

It writes ``REPORT_DIR/report.md`` and ``REPORT_DIR/report.json`` (never over an earlier report),
after every section, so a check stopped from outside still leaves what it measured. Sections and
their rows start only while the time budget (``--budget_s``, 480 s) leaves room for them; one that
did not fit says so. A started row runs to its end (the comparisons run in this process), so a
check can end up to one row past the budget; subprocesses get what is left as their timeout.

1. **gpu tests**: the ``gpu``-marked tests (``pytest -m gpu`` on the test files that have them).
2. **fits**: a short ``lit-accel fit`` of the GPU recipe (``configs/cifar10.yaml`` +
   ``configs/gpu.yaml``, synthetic data) with every precision and strategy file that applies to
   one GPU: fp32, bf16-mixed, 16-mixed, ddp, fsdp (FSDP2) and fsdp_gpu + 16-mixed, one device
   each: exit status, training images/s, data-wait share, MFU (ThroughputMeter) and peak memory.
   On a GPU each fit is its own process; in quick mode they run in this process.
3. **time to accuracy**: the whole GPU recipe as a user runs it, ``lit-accel fit`` then ``lit-accel
   test``, each its own process (the ``recipe`` benchmark's harness): validation accuracy after each epoch
   against training seconds, the seconds to ``--target``, the test accuracy; on the synthetic set
   and, with ``--data_dir``, on real CIFAR-10.
4. **versus a plain loop**: lit-accel against ``tools/plain_loop.py`` on the same device for
   SeedCNN, BatchNormCNN and the GPU recipe's ResNet9 (the plain loop then with the recipe's
   bf16, channels_last and data held on the device), paired and alternating, with and without
   ``torch.compile``; the ratio is the median of the paired ratios of images/s.

Exit status: 0 when everything ran and passed; 1 when a test, a fit or a section failed, or when
the budget left something out (verdict "failed" or "incomplete"; the report says what); 2 for bad
input (no GPU without ``--quick``, a folder that already holds a report).

Quick mode (``--quick``, for a CPU): the same sections with a narrow ResNet9, a few steps, 2 tiny
epochs, the CPU flags the GPU recipe's own error message names, the plain-loop pairs for SeedCNN
and the recipe's network, and ``torch.compile`` with the ``eager`` backend (it traces with dynamo
but generates no code, which would take minutes on a CPU) for SeedCNN. The fsdp_gpu row is not run
there: Lightning's FSDPStrategy needs a GPU. The gpu tests' pytest process runs alongside the other
sections. The test suite runs the quick mode, so the script is known to work before a GPU is lent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lit_accel.cli import GPU_RECIPE_ON_CPU
from lit_accel.measure import TRIAL_FIT_ARGS, MemoryWindow, cell, markdown_table, quiet
from tools import plain_loop
from tools.bench import fits as bench_fits
from tools.bench import recipe as bench_recipe
from tools.bench.networks import seconds_to_accuracy

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

RECIPE = ("cifar10.yaml", "gpu.yaml")
# (row, config files after the recipe's, extra overrides, needs a GPU)
FITS: tuple[tuple[str, tuple[str, ...], tuple[str, ...], bool], ...] = (
    ("fp32", (), ("--trainer.precision", "32-true"), False),
    ("bf16-mixed", (), (), False),
    ("16-mixed", ("precision/16-mixed.yaml",), (), False),
    ("ddp, 1 device", ("strategy/ddp.yaml",), ("--trainer.devices", "1"), False),
    ("fsdp (FSDP2), 1 device", ("strategy/fsdp.yaml",), ("--trainer.devices", "1"), False),
    (
        "fsdp_gpu + 16-mixed, 1 device",
        ("strategy/fsdp_gpu.yaml", "precision/16-mixed.yaml"),
        ("--trainer.devices", "1"),
        True,
    ),
)
VERSUS_NETS = ("SeedCNN", "BatchNormCNN", "ResNet9 (GPU recipe)")
OUT_OF_TIME = "out of the time budget"
SECTIONS = ("gpu_tests", "fits", "time_to_accuracy", "versus_plain_loop")


@dataclass
class Plan:
    """Sizes of every section: a GPU run or the quick CPU run."""

    quick: bool
    device: str
    budget_s: float
    target: float
    data_dir: str | None
    recipe_width: int = 64
    fit_warmup: int = 10
    fit_timed: int = 40
    fit_images: int = 10_240
    versus_batch: int = 512
    versus_warmup: int = 10
    versus_timed: int = 50
    versus_reps: int = 3
    versus_nets: tuple[str, ...] = VERSUS_NETS
    compile_nets: tuple[str, ...] = VERSUS_NETS
    compile_options: dict[str, Any] = field(default_factory=dict)
    accuracy_args: tuple[str, ...] = ()

    @classmethod
    def for_run(cls, quick: bool, budget_s: float, target: float, data_dir: str | None) -> Plan:
        if not quick:
            return cls(False, "cuda", budget_s, target, data_dir)
        return cls(
            True,
            "cpu",
            budget_s,
            target,
            data_dir,
            recipe_width=8,
            fit_warmup=1,
            fit_timed=3,
            fit_images=512,
            versus_batch=32,
            versus_warmup=1,
            versus_timed=3,
            versus_reps=1,
            compile_nets=("SeedCNN",),
            compile_options={"backend": "eager"},
            # after gpu.yaml (which follows smoke.yaml in bench_recipe's order): smoke-sized again
            accuracy_args=("--data.batch_size", "64", "--data.eval_batch_size", "64", "--trainer.max_epochs", "2"),
            versus_nets=("SeedCNN", "ResNet9 (GPU recipe)"),
        )

    def cpu_args(self) -> list[str]:
        """The overrides that run the GPU recipe on a CPU (quick mode), as its error message names them."""
        return GPU_RECIPE_ON_CPU.split() if self.quick else []


class Clock:
    """The time budget: what is left, and whether a step of a given length still fits."""

    def __init__(self, budget_s: float) -> None:
        self.started = time.perf_counter()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


def _recipe_args(plan: Plan, *extra_configs: str) -> list[str]:
    args = ["fit"]
    for name in (*RECIPE, *extra_configs):
        args += ["--config", str(CONFIGS / name)]
    return [*args, *plan.cpu_args(), "--model.net.width", str(plan.recipe_width)]


def _step_timer(warmup: int, timed: int | None, output: Path) -> str:
    init: dict[str, Any] = {"warmup_steps": warmup, "timed_steps": timed, "output": str(output)}
    return "--trainer.callbacks+=" + json.dumps({"class_path": "lit_accel.measure.FitTimer", "init_args": init})


def run_lit_accel(args: list[str], folder: Path, separate_process: bool, timeout_s: float) -> tuple[int, str]:
    """``lit-accel ARGS`` in ``folder``: its exit status and the end of its error output.

    ``separate_process``: ``python -m lit_accel`` (a GPU fit, the whole recipe); otherwise
    ``lit_accel.cli.main`` in this process, quietly (quick mode), leaving no process group behind.
    """
    if separate_process:
        try:
            done = subprocess.run(
                [sys.executable, "-m", "lit_accel", *args],
                cwd=folder,
                capture_output=True,
                text=True,
                timeout=max(1.0, timeout_s),
            )
        except subprocess.TimeoutExpired:
            return 124, f"stopped after {timeout_s:.0f} s (the time budget)"
        return done.returncode, "\n".join(done.stderr.strip().splitlines()[-3:])
    from lit_accel.cli import main as lit_accel_main

    threads = torch.get_num_threads()
    environment = dict(os.environ)  # DDP/FSDP set MASTER_PORT and friends: later processes must not inherit them
    # A port of its own: torch keeps the rendezvous port of an in-process DDP run bound after the
    # process group is destroyed, and later DDP runs from this process tree would inherit the
    # MASTER_PORT it took from the environment (EADDRINUSE, or a rank waiting for ever).
    os.environ["MASTER_PORT"] = str(free_port())
    status, message = 0, ""
    try:
        with quiet(), contextlib.chdir(folder):
            lit_accel_main(args)
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 1
        message = f"exit {status}"
    except Exception as error:  # a failed fit is a row of the report, not the end of the check
        status, message = 1, f"{type(error).__name__}: {error}"[:300]
    finally:
        torch.set_num_threads(threads)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key in set(os.environ) - set(environment):
            del os.environ[key]
        os.environ.update(environment)
    return status, message


def free_port() -> int:
    """A free TCP port on this machine (an in-process DDP run's rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ------------------------------------------------------------------------------------ sections
def gpu_tests(plan: Plan, clock: Clock, folder: Path) -> dict[str, Any]:
    """``pytest -m gpu`` on the test files that mark tests ``gpu``; counts from its JUnit XML."""
    files = sorted(str(p) for p in (ROOT / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text())
    junit = folder / "gpu_tests.xml"
    # -n 0: one process (the project's pytest settings start two xdist workers, for the whole suite)
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-n", "0"]
    command.append(f"--junitxml={junit}")
    started = time.perf_counter()
    # a copy: in quick mode the fits alongside change and restore os.environ (MASTER_PORT, ...)
    environment = dict(os.environ)
    try:
        done = subprocess.run(
            [*command, *files],
            cwd=ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=max(1.0, clock.left()),
        )
    except subprocess.TimeoutExpired:
        return {"files": files, "error": OUT_OF_TIME}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if junit.exists():
        suite = ElementTree.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        if suite is not None:
            counts = {key: int(suite.get(key, 0)) for key in counts}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {
        "files": [str(Path(f).relative_to(ROOT)) for f in files],
        "exit_status": done.returncode,
        "passed": passed,
        "failed": counts["failures"] + counts["errors"],
        "skipped": counts["skipped"],
        "seconds": time.perf_counter() - started,
        "output_tail": "\n".join(done.stdout.strip().splitlines()[-5:]),
    }


def fits(plan: Plan, clock: Clock, folder: Path) -> list[dict[str, Any]]:
    """A short fit of the GPU recipe with each precision and strategy file for one device."""
    rows = []
    for name, configs, extra, needs_gpu in FITS:
        row: dict[str, Any] = {"fit": name, "configs": [*RECIPE, *configs]}
        rows.append(row)
        if needs_gpu and plan.device != "cuda":
            row["not_run"] = "needs a GPU (Lightning's FSDPStrategy refuses a CPU)"
            continue
        if not clock.allows(10 if plan.quick else 30):
            row["not_run"] = OUT_OF_TIME
            continue
        work = folder / f"fit_{len(rows)}"
        work.mkdir()
        output = work / "timer.json"
        args = [
            *_recipe_args(plan, *configs),
            *extra,
            "--data.synthetic",
            "true",
            "--data.synthetic_size",
            str(plan.fit_images),
            "--data.val_size",
            "256",
            *TRIAL_FIT_ARGS,
            "--trainer.max_epochs",
            "-1",
            "--trainer.max_steps",
            str(plan.fit_warmup + plan.fit_timed),
            _step_timer(plan.fit_warmup, plan.fit_timed, output),
        ]
        started = time.perf_counter()
        status, message = run_lit_accel(args, work, separate_process=not plan.quick, timeout_s=clock.left())
        row.update(exit_status=status, seconds=time.perf_counter() - started)
        if status != 0 or not output.exists():
            row["error"] = message or "no timing written"
            continue
        timed = json.loads(output.read_text())
        throughput = timed.get("throughput", {})
        row.update(
            images_per_sec=timed["images_per_sec"],
            data_wait=timed["data_wait"],
            mfu=throughput.get("mfu"),
            peak_memory_mb=timed["peak_memory_mb"],
        )
    return rows


def time_to_accuracy(plan: Plan, clock: Clock, folder: Path) -> list[dict[str, Any]]:
    """The whole GPU recipe as a user runs it (``lit-accel fit`` then ``lit-accel test``, each its own
    process: tools/bench/recipe.py), on the synthetic set and with ``data_dir`` on real images:
    validation accuracy per epoch against training seconds, seconds to the target, test accuracy."""
    runs: list[tuple[str, str | None]] = [("synthetic", None)]
    if plan.data_dir:
        runs.append(("real CIFAR-10", plan.data_dir))
    recipe_args = ["--config", str(CONFIGS / "gpu.yaml"), *plan.cpu_args()]
    recipe_args += ["--model.net.width", str(plan.recipe_width), *plan.accuracy_args]
    rows = []
    for name, data_dir in runs:
        row: dict[str, Any] = {"data": name, "target": plan.target}
        rows.append(row)
        if not clock.allows(20 if plan.quick else 60):
            row["not_run"] = OUT_OF_TIME
            continue
        data_args = bench_recipe.data_arguments(data_dir, smoke=plan.quick)
        try:
            # each of the two processes (fit, then test) may take half of what is left
            result = bench_recipe.run_recipe(recipe_args, data_args, timeout=max(1.0, clock.left() / 2))
        except (RuntimeError, subprocess.TimeoutExpired) as error:  # the report shows why
            row["error"] = str(error).strip().splitlines()[-1][:300] if str(error).strip() else type(error).__name__
            continue
        curve = result["curve"]
        row.update(
            exit_status=result["fit_exit_code"],
            fit_seconds=result["fit_seconds"],
            images_per_sec=result["images_per_sec"],
            train_seconds=result["train_seconds"],
            curve=curve,
            seconds_to_target=seconds_to_accuracy(curve, plan.target),
            test_acc=result["test_acc"],
        )
    return rows


def _plain_variant(plan: Plan, net_name: str, compiled: bool) -> Callable[[], dict[str, Any]]:
    import lit_accel.models as nets
    from lit_accel.data import make_synthetic_cifar

    images, labels = make_synthetic_cifar((plan.versus_warmup + plan.versus_timed + 2) * plan.versus_batch, seed=0)
    recipe = net_name.startswith("ResNet9")

    def run() -> dict[str, Any]:
        memory = MemoryWindow()
        torch.manual_seed(0)
        net = nets.ResNet9(width=plan.recipe_width) if recipe else getattr(nets, net_name)()
        result = plain_loop.train(
            net,
            images,
            labels,
            plan.versus_batch,
            plan.versus_warmup,
            plan.versus_timed,
            precision="bf16-mixed" if recipe and not plan.quick else "32-true",
            device=plan.device,
            channels_last=recipe,
            data_on_device=recipe,
            compile=compiled,
            compile_options=plan.compile_options,
        )
        return {"images_per_sec": result.images_per_sec, "peak_memory_mb": memory.peak_mb(plan.device)}

    return run


def _lit_variant(plan: Plan, net_name: str, compiled: bool) -> Callable[[], dict[str, Any]]:
    settings = bench_fits.Settings(plan.device, plan.versus_batch, plan.versus_warmup, plan.versus_timed, 1, 1.0)
    steps = ["--trainer.max_steps", str(plan.versus_warmup + plan.versus_timed), "--trainer.limit_val_batches", "0"]
    if net_name.startswith("ResNet9"):
        images = (plan.versus_warmup + plan.versus_timed + 2) * plan.versus_batch + 64
        args = [*_recipe_args(plan), *TRIAL_FIT_ARGS, "--data.synthetic", "true"]
        args += ["--data.synthetic_size", str(images), "--data.val_size", "64", "--data.batch_size"]
        args += [str(plan.versus_batch), "--trainer.max_epochs", "-1"]
    else:
        args = bench_fits.lit_args(settings, net=net_name)
    if compiled:
        args += ["--model.compile", "true", "--model.compile_options", json.dumps(plan.compile_options)]
    return lambda: bench_fits.timed_fit(settings, [*args, *steps])


def versus_plain_loop(plan: Plan, clock: Clock, folder: Path) -> list[dict[str, Any]]:
    """lit-accel against the hand-written loop, paired and alternating, per network and compile."""
    rows = []
    for compiled in (False, True):
        for net_name in VERSUS_NETS:
            row: dict[str, Any] = {"network": net_name, "compile": compiled}
            rows.append(row)
            if net_name not in plan.versus_nets or (compiled and net_name not in plan.compile_nets):
                row["not_run"] = "quick mode: SeedCNN (compiled too) and the recipe's network only"
                continue
            # a started row runs to its end (in this process, it cannot be cut): start one only with
            # room for it; a compiled one compiles the network on both sides first
            if not clock.allows(15 if plan.quick else (150 if compiled else 60)):
                row["not_run"] = OUT_OF_TIME
                continue
            variants = {
                "plain loop": _plain_variant(plan, net_name, compiled),
                "lit-accel": _lit_variant(plan, net_name, compiled),
            }
            try:
                plain, lit = bench_fits.measure("versus", variants, plan.versus_reps)
            except Exception as error:  # one failed pair is a row, not the end of the check
                row["error"] = f"{type(error).__name__}: {error}"[:300]
                continue
            row.update(
                plain_images_per_sec=plain["images_per_sec"],
                lit_images_per_sec=lit["images_per_sec"],
                ratio=lit["ratio"],
                reps=lit["reps"],
            )
    return rows


# -------------------------------------------------------------------------------------- report
def _table(title: str, columns: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown section with one table; a column name ending in ``:`` is right-aligned (a number)."""
    return ["", f"## {title}", "", *markdown_table(columns, rows).splitlines()]


def _note(row: dict[str, Any]) -> str:
    return str(row.get("not_run") or row.get("error") or "")


def _seconds_to_target(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return "not reached" if seconds == float("inf") else f"{seconds:.1f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one table per section."""
    lines = [
        "# lit_accel GPU check",
        "",
        f"- machine: {report['machine']}",
        f"- mode: {report['mode']}; command: `{report['command']}`",
        f"- {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget; overall: **{report['verdict']}**",
        "- seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in report["section_seconds"].items()),
        "",
        "## gpu-marked tests",
        "",
    ]
    tests = report["sections"].get("gpu_tests", {})
    if "error" in tests:
        lines.append(f"not run: {tests['error']}")
    else:
        lines.append(
            f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, {tests.get('skipped', 0)} skipped "
            f"(exit {tests.get('exit_status')}, files: {', '.join(tests.get('files', []))})"
        )
    sections = report["sections"]
    lines += _table(
        "Short fits of the GPU recipe, one device",
        ["fit", "exit:", "images/s:", "data wait:", "MFU:", "peak memory MB:", "note"],
        [
            [
                row["fit"],
                str(row.get("exit_status", "—")),
                cell(row.get("images_per_sec"), "{:,.0f}"),
                cell(row.get("data_wait"), "{:.1%}"),
                cell(row.get("mfu"), "{:.1%}"),
                cell(row.get("peak_memory_mb"), "{:,.0f}"),
                _note(row),
            ]
            for row in sections.get("fits", [])
        ],
    )
    lines += _table(
        "Time to accuracy, the whole GPU recipe",
        ["data", "fit exit:", "fit process s:", "images/s:", "training s:", "val acc per epoch", "s to target:"]
        + ["test acc:", "note"],
        [
            [
                row["data"],
                str(row.get("exit_status", "—")),
                cell(row.get("fit_seconds"), "{:.1f}"),
                cell(row.get("images_per_sec"), "{:,.0f}"),
                cell(row.get("train_seconds"), "{:.1f}"),
                ", ".join(f"{point[2]:.3f}" for point in row.get("curve", [])) or "—",
                f"{_seconds_to_target(row.get('seconds_to_target'))} (target {row['target']})",
                cell(row.get("test_acc"), "{:.4f}"),
                _note(row),
            ]
            for row in sections.get("time_to_accuracy", [])
        ],
    )
    lines += _table(
        "lit-accel against a plain PyTorch loop (same device, paired, alternating)",
        ["network", "torch.compile", "plain loop images/s:", "lit-accel images/s:", "ratio (median of pairs):"]
        + ["reps:", "note"],
        [
            [
                row["network"],
                "yes" if row["compile"] else "no",
                cell(row.get("plain_images_per_sec"), "{:,.0f}"),
                cell(row.get("lit_images_per_sec"), "{:,.0f}"),
                cell(row.get("ratio"), "{:.3f}"),
                str(row.get("reps", "—")),
                _note(row),
            ]
            for row in sections.get("versus_plain_loop", [])
        ],
    )
    for name, error in report.get("section_errors", {}).items():
        lines += ["", f"Section {name} failed: {error}"]
    return "\n".join(lines) + "\n"


def verdict(report: dict[str, Any]) -> str:
    """``failed`` if anything failed, else ``incomplete`` if the time budget left anything out, else ``passed``."""
    sections = report["sections"]
    tests = sections.get("gpu_tests", {})
    rows = [*sections.get("fits", []), *sections.get("time_to_accuracy", []), *sections.get("versus_plain_loop", [])]
    failed = bool(report.get("section_errors")) or any("error" in row for row in rows)
    failed |= "error" not in tests and (tests.get("exit_status") not in (0, 5) or tests.get("failed", 0) > 0)
    if failed:  # pytest's exit status 5: no test collected
        return "failed"
    timed_out = tests.get("error") == OUT_OF_TIME or any(row.get("not_run") == OUT_OF_TIME for row in rows)
    missing = any(name not in sections for name in SECTIONS)
    return "incomplete" if timed_out or missing else "passed"


def _write_report(report: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "report.md").write_text(markdown(report))


def run(plan: Plan, out_dir: Path, command: str) -> dict[str, Any]:
    """Every section within the plan's budget; returns the report (also written to ``out_dir``)."""
    clock = Clock(plan.budget_s)
    report: dict[str, Any] = {
        "machine": bench_fits.machine(),
        "mode": "quick (CPU)" if plan.quick else "GPU",
        "command": command,
        "budget_s": plan.budget_s,
        "plan": asdict(plan),
        "sections": {},
        "section_errors": {},
        "section_seconds": {},
        "seconds": 0.0,
    }
    steps: list[tuple[str, Callable[[Plan, Clock, Path], Any]]] = [
        ("gpu_tests", gpu_tests),
        ("fits", fits),
        ("time_to_accuracy", time_to_accuracy),
        ("versus_plain_loop", versus_plain_loop),
    ]
    # As lit-accel's CLI sets it (TF32 matmuls on a GPU), for the plain loop too, from the first run on.
    torch.set_float32_matmul_precision("high")
    report["verdict"] = "running (the check has not finished: this report is partial)"
    lock = threading.Lock()

    def run_section(name: str, section: Callable[[Plan, Clock, Path], Any], scratch: str) -> None:
        work = Path(scratch) / name
        work.mkdir()
        print(f"# gpu_check: {name} ({clock.left():.0f} s left)", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            report["sections"][name] = section(plan, clock, work)
        except Exception as error:  # the report says which section failed and why
            report["section_errors"][name] = f"{type(error).__name__}: {error}"[:500]
        report["section_seconds"][name] = time.perf_counter() - started
        report["seconds"] = time.perf_counter() - clock.started
        with lock:  # written after every section: a check stopped from outside still leaves a report
            _write_report(report, out_dir)

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        # Quick mode: the gpu tests' pytest process runs beside the other sections (its start-up
        # is most of its time). On a GPU one after the other, so nothing shares the card.
        alongside = threading.Thread(target=run_section, args=(*steps[0], scratch)) if plan.quick else None
        if alongside is not None:
            alongside.start()
        for name, section in steps[1:] if alongside is not None else steps:
            run_section(name, section, scratch)
        if alongside is not None:
            alongside.join()
    report["sections"] = {name: report["sections"][name] for name, _ in steps if name in report["sections"]}
    report["seconds"] = time.perf_counter() - clock.started
    report["verdict"] = verdict(report)
    _write_report(report, out_dir)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", help="folder for report.md and report.json (created; must hold no report)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on a CPU: checks the script itself")
    parser.add_argument("--data_dir", help="a folder with cifar-10-batches-py/: the GPU recipe on real images too")
    parser.add_argument("--target", type=float, default=0.94, help="validation accuracy to time (default 0.94)")
    parser.add_argument("--budget_s", type=float, default=480.0, help="seconds for every section (default 480)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    problem = None
    if not args.quick and not torch.cuda.is_available():
        problem = "this machine has no CUDA GPU: run it on one, or add --quick to check the script on this CPU"
    elif out_dir.exists() and not out_dir.is_dir():
        problem = f"{out_dir} is a file: give a folder for the report"
    elif (out_dir / "report.json").exists() or (out_dir / "report.md").exists():
        problem = f"{out_dir} already holds a report: give a new folder (a report is never overwritten)"
    elif args.data_dir and not (Path(args.data_dir) / "cifar-10-batches-py").is_dir():
        problem = f"--data_dir {args.data_dir}: no cifar-10-batches-py/ folder in it"
    elif not (0 < args.target <= 1 and args.budget_s > 0):
        problem = "--target must be in (0, 1] and --budget_s positive"
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = Plan.for_run(args.quick, args.budget_s, args.target, args.data_dir)
    command = "python -m tools.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:])
    report = run(plan, out_dir, command)
    print(markdown(report))
    return 0 if report["verdict"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
