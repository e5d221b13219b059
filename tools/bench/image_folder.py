"""``lit-accel fit`` on a folder of image files against torchvision's ``ImageFolder`` + ``DataLoader``,
and the start-up of a fit on a cached image folder against one on CIFAR-10's format (issue 28).

Two parts, on folders that :mod:`tools.make_image_folder` writes (offline, seeded); every run is a
fresh process, and the variants alternate their order from one round to the next:

``epochs``
    ``--images`` images at ``--size`` px (``--format``), ``train/`` and ``val/`` (10 %), read at
    ``--train_size`` px (default ``--size``; photos are usually larger than what is trained on), trained
    ``--epochs`` epochs, validation off, by ``lit-accel fit --config image_folder`` (its cache
    removed before each run, so its first epoch decodes, caches and trains) and by
    :mod:`tools.image_folder_loop` (2 ``DataLoader`` workers decoding, resizing and flipping every
    file every epoch). Same network (``--net``), batch, optimizer (AdamW 0.004, weight decay 0.01,
    constant LR), loss (label smoothing 0.1), channels-last, fp32, flips. Figures: the first
    epoch's seconds (lit-accel: from the fit's start, before the data is decoded, to its first
    epoch's end; it decodes ``val/`` too), the later epochs' images/s, and the paired ratios.
``startup``
    ``--startup_images`` images at 32 px, written once as an image folder and once in CIFAR-10's
    format (the same pixels: :func:`tools.make_image_folder.write_image_folder` with
    ``cifar_dir``); the folder's cache built by a first, untimed fit. Figure: seconds from the
    launch of ``lit-accel fit`` to its first training step, for each, and the paired difference.

Targets (issue 28, item 5), printed with the measured figures: later epochs at least 3x the
``ImageFolder`` loop's images/s; the first epoch no slower than one of the loop's (later) epochs;
with the cache present, the first training step at most 2 s later than on CIFAR-10's format.

The files were just written, so both variants read them from the page cache: on a cold disk the
loop would read every file every epoch, lit-accel once.

Usage::

    python -m tools.bench image_folder                    # both parts at full size
    python -m tools.bench image_folder --parts startup --rounds 9
    python -m tools.bench image_folder --parts epochs --size 256 --train_size 64   # photo-sized files
    python -m tools.bench image_folder --smoke            # seconds: checks the case itself
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_accel.measure import TRIAL_FIT_ARGS, alternate, batch_samples, cell, markdown_table, paired_ratios, spread

REPO = Path(__file__).resolve().parents[2]
PARTS = ("epochs", "startup")
VAL_FRACTION = 0.1  # of the generated folders' images, in val/
EPOCHS_CACHE = "epochs-cache"  # the epochs part's lit-accel runs cache the folder here (removed before each)

# The targets of issue 28, item 5.
LATER_EPOCHS_RATIO = 3.0  # lit-accel's later epochs / the ImageFolder loop's, images/s, at least
FIRST_EPOCH_RATIO = 1.0  # lit-accel's first epoch / one ImageFolder epoch, seconds, at most
STARTUP_SECONDS = 2.0  # first training step on the cached folder minus on CIFAR-10's format, at most


@dataclass
class Settings:
    """The sizes of the case (full by default; ``--smoke`` for seconds)."""

    images: int = 10_000  # epochs part: training and validation images together
    size: int = 64  # epochs part: pixels per side of the written images
    train_size: int | None = None  # epochs part: pixels per side trained on (None: size); photos are larger
    format: str = "jpeg"
    rounds: int = 3
    epochs: int = 3
    batch_size: int = 256
    net: str = "LiteCNN"
    startup_images: int = 20_000  # startup part, at 32 px
    loader_workers: int = 2  # the ImageFolder loop's DataLoader workers
    writer_workers: int | None = None  # tools.make_image_folder's processes (None: one per core)
    timeout: float = 1800.0  # seconds one process may take


SMOKE = Settings(images=600, size=32, format="mixed", rounds=1, epochs=2, batch_size=64, startup_images=600)


class EpochClock(Callback):
    """Writes a fit's wall-clock times (``time.time()``) to a JSON file, for a process that times it.

    Args:
        output: the JSON file (rank 0 writes it; rewritten after each event).

    Keys written: ``created`` (when the callback was built: the CLI builds it with the data module
    and the model, before the fit prepares its data), ``first_batch`` (the first training batch's
    start: the data is ready and the first step begins), ``epochs`` (``start``, ``end`` and
    ``images`` of each training epoch; validation runs after ``end``).

    Example::

        --trainer.callbacks+='{"class_path": "tools.bench.image_folder.EpochClock",
                               "init_args": {"output": "clock.json"}}'
    """

    def __init__(self, output: str) -> None:
        self.output = output
        self.record: dict[str, Any] = {"created": time.time(), "first_batch": None, "epochs": []}
        self._start = 0.0
        self._images = 0

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._images = time.time(), 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.record["first_batch"] is None:
            self.record["first_batch"] = time.time()
            self._write(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += batch_samples(batch) * trainer.world_size

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the epoch ends when its last step has run
        self.record["epochs"].append({"start": self._start, "end": time.time(), "images": self._images})
        self._write(trainer)

    def _write(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero:
            Path(self.output).write_text(json.dumps(self.record))


# ------------------------------------------------------------------------------- the runs
def training_args(s: Settings) -> list[str]:
    """``lit-accel fit`` arguments of the training the ImageFolder loop does too (tools/image_folder_loop.py)."""
    args = ["--model.net", f"lit_accel.models.{s.net}", "--model.optimizer", "torch.optim.AdamW"]
    args += ["--model.optimizer.lr", "0.004", "--model.optimizer.weight_decay", "0.01", "--model.lr_scheduler", "null"]
    args += ["--model.label_smoothing", "0.1", "--model.channels_last", "true", "--model.flip_tta", "false"]
    args += ["--data.batch_size", str(s.batch_size), "--data.augment", "true", "--data.random_crop", "false"]
    args += ["--data.horizontal_flip", "true", "--trainer.precision", "32-true", *TRIAL_FIT_ARGS]
    return args


def folder_args(root: Path, size: int, cache_dir: Path) -> list[str]:
    """``lit-accel fit`` arguments that train on the image folder at ``root``."""
    args = ["--config", "image_folder", "--data.root", str(root), "--data.image_size", str(size)]
    return [*args, "--data.cache_dir", str(cache_dir)]


def cifar_args(folder: Path, val_images: int) -> list[str]:
    """``lit-accel fit`` arguments that train on the CIFAR-format folder ``folder`` (the default recipe's data)."""
    args = ["--data.data_dir", str(folder), "--data.verify_checksums", "false", "--data.download", "false"]
    return [*args, "--data.val_size", str(val_images)]


def _environment() -> dict[str, str]:
    # The fit process imports tools.bench.image_folder (the EpochClock) from this repository.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def _run(command: list[str], cwd: Path, timeout: float) -> None:
    done = subprocess.run(command, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} … exited with {done.returncode}:\n{done.stderr[-3000:]}")


def run_fit(args: list[str], work: Path, timeout: float) -> dict[str, Any]:
    """One ``lit-accel fit ARGS`` process with an :class:`EpochClock`; its record plus ``launched``
    (``time.time()`` just before the process was started)."""
    output = work / f"clock-{uuid.uuid4().hex}.json"
    clock = {"class_path": "tools.bench.image_folder.EpochClock", "init_args": {"output": str(output)}}
    command = [sys.executable, "-m", "lit_accel", "fit", *args, "--trainer.callbacks+=" + json.dumps(clock)]
    launched = time.time()
    _run(command, work, timeout)
    if not output.exists():
        raise RuntimeError("lit-accel fit ended without a training step (no clock file written)")
    record: dict[str, Any] = json.loads(output.read_text())
    output.unlink()
    return {**record, "launched": launched}


def epoch_figures(seconds: list[float], images: list[int], first_seconds: float) -> dict[str, float]:
    """A run's figures: its first epoch's seconds, its later epochs' mean seconds and their images/s
    (all later epochs together)."""
    later = seconds[1:]
    return {
        "first_epoch_s": first_seconds,
        "later_epoch_s": sum(later) / len(later),
        "later_images_per_sec": sum(images[1:]) / sum(later),
    }


def lit_epochs_run(s: Settings, root: Path, work: Path) -> dict[str, Any]:
    """``lit-accel fit`` on the folder, its cache removed first: its :func:`epoch_figures`."""
    cache = work / EPOCHS_CACHE
    shutil.rmtree(cache, ignore_errors=True)
    args = [*training_args(s), *folder_args(root, s.train_size or s.size, cache), "--trainer.max_epochs", str(s.epochs)]
    record = run_fit(args, work, s.timeout)
    if not cache.is_dir() or not cache_files(cache):
        raise RuntimeError(f"lit-accel fit wrote no cache in {cache}: the first epoch did not decode and cache")
    epochs = record["epochs"]
    seconds = [e["end"] - e["start"] for e in epochs]
    return epoch_figures(seconds, [e["images"] for e in epochs], epochs[0]["end"] - record["created"])


def loop_epochs_run(s: Settings, train_dir: Path, work: Path) -> dict[str, Any]:
    """tools/image_folder_loop.py on the folder's ``train/``: its :func:`epoch_figures`."""
    output = work / f"loop-{uuid.uuid4().hex}.json"
    command = [sys.executable, "-m", "tools.image_folder_loop", str(train_dir), "--size", str(s.train_size or s.size)]
    command += ["--epochs", str(s.epochs), "--batch_size", str(s.batch_size), "--net", s.net]
    command += ["--workers", str(s.loader_workers), "--json", str(output)]
    _run(command, work, s.timeout)
    epochs = json.loads(output.read_text())
    output.unlink()
    seconds = [e["seconds"] for e in epochs]
    return epoch_figures(seconds, [e["images"] for e in epochs], seconds[0])


# ------------------------------------------------------------------------------- the parts
LOOP = f"ImageFolder + DataLoader ({Settings.loader_workers} workers)"
LIT = "lit-accel fit, image folder (cache rebuilt)"
CIFAR = "CIFAR-10's format"
FOLDER = "image folder, cache present"


def epochs_part(s: Settings, root: Path, work: Path) -> dict[str, list[dict[str, Any]]]:
    """The ``epochs`` part's runs: ``{variant: [figures per round]}``."""
    runs = {LOOP: lambda: loop_epochs_run(s, root / "train", work), LIT: lambda: lit_epochs_run(s, root, work)}
    return alternate(_announced(runs), s.rounds)


def startup_part(
    s: Settings, root: Path, cifar: Path, val_images: int, work: Path, cache: Path
) -> dict[str, list[float]]:
    """The ``startup`` part's runs: ``{variant: [seconds from launch to the first training step per round]}``.

    A first, untimed fit builds the folder's cache in ``cache`` unless that folder exists.

    Raises:
        RuntimeError: a fit failed, or a timed fit rewrote the cache (it decoded instead of loading).
    """
    one_step = [*training_args(s), "--trainer.max_steps", "1"]
    folder = [*one_step, *folder_args(root, 32, cache)]
    if not cache.exists():
        run_fit(folder, work, s.timeout)
    runs = {
        CIFAR: lambda: _startup(run_fit([*one_step, *cifar_args(cifar, val_images)], work, s.timeout)),
        FOLDER: lambda: _startup(run_fit(folder, work, s.timeout)),
    }
    before = cache_files(cache)
    results = alternate(_announced(runs), s.rounds)
    if cache_files(cache) != before:  # a timed fit decoded (and rewrote the cache): its figure is not a start-up
        raise RuntimeError(f"the image folder's cache in {cache} was rewritten by a timed fit: it did not find it")
    return results


def cache_files(folder: Path) -> list[tuple[str, int, int]]:
    """``(name, size, modification time in ns)`` of each file in ``folder``: changes when a cache is rewritten."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file())


def _startup(record: dict[str, Any]) -> float:
    return float(record["first_batch"] - record["launched"])


def _announced(runs: dict[str, Any]) -> dict[str, Any]:
    def announced(name: str, run: Any) -> Any:
        def call() -> Any:
            result = run()
            print(f"# {name}: {result if isinstance(result, float) else json.dumps(result)}", flush=True)
            return result

        return call

    return {name: announced(name, run) for name, run in runs.items()}


# ------------------------------------------------------------------------------- the tables
def _range(values: list[float], pattern: str) -> str:
    median, low, high = spread(values)
    return "—" if median != median else f"{pattern.format(low)}–{pattern.format(high)}"


def epochs_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """A row per variant: the first epoch's seconds and the later epochs' images/s (medians and ranges)."""
    rows = []
    for name, runs in results.items():
        first = [r["first_epoch_s"] for r in runs]
        later = [r["later_images_per_sec"] for r in runs]
        rows.append(
            [
                name,
                cell(spread(first).median, "{:.2f}"),
                _range(first, "{:.2f}"),
                cell(spread(later).median),
                _range(later, "{:,.0f}"),
                str(len(runs)),
            ]
        )
    columns = ["variant", "first epoch s (median):", "range", "later epochs images/s (median):", "range", "rounds:"]
    return markdown_table(columns, rows)


def startup_table(results: dict[str, list[float]], images: int) -> str:
    """A row per variant: seconds from the launch of ``lit-accel fit`` to its first training step."""
    rows = [
        [f"{name} ({images:,} images at 32 px)", cell(spread(v).median, "{:.2f}"), _range(v, "{:.2f}"), str(len(v))]
        for name, v in results.items()
    ]
    return markdown_table(["data", "s to first training step (median):", "range", "rounds:"], rows)


def target_rows(
    epochs: dict[str, list[dict[str, Any]]] | None, startup: dict[str, list[float]] | None
) -> list[dict[str, Any]]:
    """The issue's targets with their paired figures (median and range over rounds) and whether each is met."""
    rows = []
    if epochs is not None:
        lit, loop = epochs[LIT], epochs[LOOP]
        later = paired_ratios([r["later_images_per_sec"] for r in lit], [r["later_images_per_sec"] for r in loop])
        rows.append(_target("later epochs: lit-accel / ImageFolder images/s", later, ">=", LATER_EPOCHS_RATIO, "x"))
        # one ImageFolder epoch: a later one (its first also scans the folder and starts the workers)
        first = paired_ratios([r["first_epoch_s"] for r in lit], [r["later_epoch_s"] for r in loop])
        rows.append(_target("first epoch: lit-accel s / one ImageFolder epoch s", first, "<=", FIRST_EPOCH_RATIO, "x"))
    if startup is not None:
        later_by = [f - c for f, c in zip(startup[FOLDER], startup[CIFAR])]
        rows.append(_target("start-up: image folder - CIFAR format, s", later_by, "<=", STARTUP_SECONDS, " s"))
    return rows


def _target(figure: str, values: list[float], sense: str, target: float, unit: str) -> dict[str, Any]:
    median, low, high = spread(values)
    met = median >= target if sense == ">=" else median <= target
    return {
        "figure": figure,
        "median": median,
        "low": low,
        "high": high,
        "target": f"{sense} {target:g}{unit}",
        "met": met,
    }


def targets_table(rows: list[dict[str, Any]]) -> str:
    cells = [
        [
            r["figure"],
            cell(r["median"], "{:.2f}"),
            "—" if r["low"] != r["low"] else f"{r['low']:.2f}–{r['high']:.2f}",
            r["target"],
            "yes" if r["met"] else "no",
        ]
        for r in rows
    ]
    return markdown_table(["figure (paired over rounds)", "median:", "range", "target", "met"], cells)


# ------------------------------------------------------------------------------- the entry
def _write_folder(root: Path, images: int, size: int, format: str, s: Settings, cifar: bool) -> Path:
    """The generated folder at ``root`` (and with ``cifar``, its CIFAR-format copy in ``ROOT-cifar``)."""
    from tools.make_image_folder import write_image_folder

    copy = root.with_name(root.name + "-cifar") if cifar else None
    written = write_image_folder(
        root, images, size, format, val_fraction=VAL_FRACTION, workers=s.writer_workers, cifar_dir=copy
    )
    print(f"# wrote {images:,} images at {size} px ({format}) in {written.seconds:.0f} s", flush=True)
    return root


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The full sizes, or ``--smoke``'s, then the flags that override them."""
    s = Settings(**asdict(SMOKE)) if args.smoke else Settings()
    for name in ("images", "size", "train_size", "format", "rounds", "epochs", "batch_size", "net", "startup_images"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.smoke:
        s.writer_workers = 1  # no process pool: the images are few
    return s


def parse(argv: list[str]) -> argparse.Namespace:
    """The case's flags (one message and exit 2 for a bad one)."""
    from tools.make_image_folder import FORMATS

    full = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench image_folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    parser.add_argument("--images", type=int, help=f"epochs part: images, train and val (default {full.images:,})")
    parser.add_argument("--size", type=int, help=f"epochs part: pixels per side (default {full.size})")
    parser.add_argument("--train_size", type=int, help="epochs part: pixels per side trained on (default: --size)")
    parser.add_argument("--format", choices=FORMATS, help=f"epochs part: file format (default {full.format})")
    parser.add_argument("--epochs", type=int, help=f"epochs part: epochs per run, 2 or more (default {full.epochs})")
    parser.add_argument("--batch_size", type=int, help=f"images per step (default {full.batch_size})")
    parser.add_argument("--net", help=f"a network of lit_accel.models (default {full.net})")
    parser.add_argument("--startup_images", type=int, help=f"startup part: images (default {full.startup_images:,})")
    parser.add_argument("--rounds", type=int, help=f"rounds of each part (default {full.rounds})")
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny sizes, checks the case itself")
    parser.add_argument("--json", help="also write the runs and the figures to this file")
    args = parser.parse_args(argv)
    args.parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    if not args.parts or any(p not in PARTS for p in args.parts):
        parser.error(f"--parts {','.join(args.parts)}: use one or both of {', '.join(PARTS)}")
    for name, least in (
        ("images", 1),
        ("size", 1),
        ("train_size", 8),
        ("epochs", 2),
        ("batch_size", 1),
        ("startup_images", 1),
    ):
        value = getattr(args, name)
        if value is not None and value < least:
            parser.error(f"--{name} {value}: use {least} or more")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: use 1 or more")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m tools.bench image_folder [--flags]``: runs the parts, prints their tables; returns the report."""
    from tools.bench.fits import machine
    from tools.make_image_folder import split_sizes

    args = parse(sys.argv[1:] if argv is None else list(argv))
    s = settings_from_args(args)
    print(f"# lit_accel bench image_folder — {machine()}")
    print(f"# settings: {s}; parts: {', '.join(args.parts)}", flush=True)
    report: dict[str, Any] = {"machine": machine(), "settings": asdict(s), "parts": list(args.parts)}
    epochs = startup = None
    with tempfile.TemporaryDirectory(prefix="lit-accel-bench-folder-") as temporary:
        work = Path(temporary)
        # one folder for both parts when they coincide (a smoke run): one less to write, one fit less
        same = s.size == 32 and s.startup_images == s.images and args.parts == PARTS
        if "epochs" in args.parts:
            root = _write_folder(work / "epochs", s.images, s.size, s.format, s, cifar=same)
            epochs = report["epochs"] = epochs_part(s, root, work)
        if "startup" in args.parts:
            root = work / "epochs" if same else _write_folder(work / "startup", s.startup_images, 32, "jpeg", s, True)
            val_images = split_sizes(s.startup_images, VAL_FRACTION)[1]
            cifar, cache = root.with_name(root.name + "-cifar"), work / (EPOCHS_CACHE if same else "startup-cache")
            startup = report["startup"] = startup_part(s, root, cifar, val_images, work, cache)
    if epochs is not None:
        trained = f", trained at {s.train_size} px" if s.train_size and s.train_size != s.size else ""
        print(f"\n{s.images:,} images at {s.size} px ({s.format}){trained}, {s.epochs} epochs, batch {s.batch_size}")
        print(epochs_table(epochs))
    if startup is not None:
        print(f"\nStart-up, {s.startup_images:,} images at 32 px")
        print(startup_table(startup, s.startup_images))
    report["targets"] = target_rows(epochs, startup)
    print()
    print(targets_table(report["targets"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report
