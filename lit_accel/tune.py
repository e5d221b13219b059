"""``lit-accel tune``: measure the acceleration levers on this machine and write the fastest as a config.

With the user's own recipe (the same ``--config`` files and overrides as ``lit-accel fit``), it runs
short timed trials through the real ``fit`` code (LightningCLI, Trainer, data module), one lever at
a time against the recipe as given (the baseline), in rounds: every round runs the baseline and
then each setting, in reversed order on every other round, and a setting's figure is the median
over rounds of its images/s divided by the same round's baseline, so a drifting load on a shared
machine cancels. Each trial trains ``warmup_steps + timed_steps`` optimizer steps with validation,
checkpoints and logging off, in a temporary folder; only the timed steps count.

Levers (``--levers``, default: all that apply here, cheapest first):

* ``channels_last``: the other memory layout (training unchanged);
* ``threads``: intra-op CPU threads (``num_threads``: 1, half and all of the cores), on a CPU
  (training unchanged up to the order of floating-point sums);
* ``pipeline``: the other input pipeline: preload in host memory, preload on the GPU
  (``data.residency: device``, where there is a GPU), the DataLoader one with 0 to 4 workers (same
  data, other random streams for augmentation: training unchanged in distribution);
* ``precision``: ``bf16-mixed`` against ``32-true`` (and ``16-mixed`` on a CUDA GPU): **changes
  what is learned** (rounding);
* ``batch_size``: half, 2, 4 and 8 times the per-device batch (up to the training split's size),
  the learning rate scaled by the rule the optimizer needs (square root for Adam-type, linear
  otherwise); a batch that does not fit in memory is a failed trial, so the fastest that fits is
  found: **changes what is learned**;
* ``compile``: ``torch.compile`` of the network (default only on a GPU: on a CPU compiling takes
  longer than a short trial; name it to try);
* ``ddp``: 2 processes or more (the CPU cores / GPUs here), the same global batch: **changes what
  is learned** (BatchNorm statistics per process). Runs as a subprocess.

Each trial's training is stopped when the budget runs out (Trainer ``max_time``; a trial cut
short is shown as failed). ``--unchanged_training_only`` keeps to the levers that leave training unchanged. A setting is
taken when it is at least ``--min_gain`` faster; the winners of several levers are then measured
together once (when the budget allows), and kept together only if that is faster than the best
single one. A trial that fails (out of memory, a setting this machine refuses) is a result, shown
in the table, not a crash.

Usage::

    lit-accel tune --config configs/cifar10.yaml --budget_s 120 --output tuned.yaml
    lit-accel fit --config configs/cifar10.yaml --config tuned.yaml

Prints a table (lever, setting, images/s, ratio to the baseline, data wait, peak memory, whether
training changes) and writes a YAML that composes after the user's configs; each entry carries a
comment saying what it changes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lit_accel._measure import TRIAL_FIT_ARGS, peak_rss_mb, quiet, reset_peak_rss

__all__ = ["Lever", "Setting", "TrialTimer", "combine", "main", "plan_levers", "tune"]

LEVERS = ("channels_last", "threads", "pipeline", "precision", "batch_size", "compile", "ddp")
# Per-device batch sizes tried, as multiples of the recipe's: the largest that fits in memory and
# is fastest wins (a batch that does not fit is a failed trial, "out of memory", not a crash).
BATCH_FACTORS = (0.5, 2.0, 4.0, 8.0)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: the yaml dict is not hashable
class Setting:
    """One alternative to the recipe: its command-line overrides, its YAML and what it changes.

    Args:
        lever: the lever it belongs to.
        name: how the table shows it.
        args: ``lit-accel fit`` overrides that select it.
        yaml: dotted config keys and values for the tuned YAML.
        changes_training: whether it alters what is learned (precision, batch size, processes).
        processes: more than 1 runs the trial as its own process tree (DDP).
    """

    lever: str
    name: str
    args: tuple[str, ...]
    yaml: dict[str, Any]
    changes_training: bool
    processes: int = 1


@dataclass(frozen=True)
class Lever:
    """A group of settings of which at most one is taken."""

    name: str
    settings: tuple[Setting, ...]


@dataclass
class Measured:
    """The trials of one setting (or of the baseline): images/s per round and the other figures."""

    images_per_sec: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    data_wait: list[float] = field(default_factory=list)
    peak_memory_mb: list[float] = field(default_factory=list)
    error: str | None = None


class TrialTimer(Callback):
    """Times training steps after ``warmup_steps`` and stops the trial after ``timed_steps`` more.

    Args:
        warmup_steps: optimizer steps not timed (first-step costs, compilation).
        timed_steps: optimizer steps timed.
        output: a JSON file to write the result to (for a trial in another process; rank 0).
    """

    def __init__(self, warmup_steps: int = 3, timed_steps: int = 10, output: str | None = None) -> None:
        self.warmup_steps = warmup_steps
        self.timed_steps = timed_steps
        self.output = output
        self.result: dict[str, float] = {}
        self._samples = 0
        self._seconds = 0.0
        self._wait = 0.0
        self._last_end: float | None = None
        self._batch_start = 0.0

    def _sync(self, trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sync(trainer)
        now = time.perf_counter()
        step = trainer.global_step  # counts this batch's optimizer step
        if step > self.warmup_steps and self._last_end is not None:
            self._samples += _batch_samples(batch) * trainer.world_size
            self._seconds += now - self._last_end
            self._wait += self._batch_start - self._last_end
        self._last_end = now
        if step >= self.warmup_steps + self.timed_steps:
            trainer.should_stop = True

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._seconds <= 0 or trainer.global_step < self.warmup_steps + self.timed_steps:
            return  # cut short (trainer.max_time, the run's own length): no figure
        if trainer.strategy.root_device.type == "cuda":
            memory = torch.cuda.max_memory_allocated() / 2**20
        else:
            memory = peak_rss_mb()
        self.result = {
            "images_per_sec": self._samples / self._seconds,
            "data_wait": self._wait / self._seconds,
            "peak_memory_mb": memory,
        }
        if self.output and trainer.is_global_zero:
            Path(self.output).write_text(json.dumps(self.result))


# --------------------------------------------------------------------------------- the levers
def plan_levers(config: Any, wanted: Sequence[str] | None, unchanged_only: bool) -> tuple[list[Lever], list[str]]:
    """The levers to measure for a parsed ``fit`` config, and a line for each one left out and why.

    ``wanted`` None means every lever that applies here (``compile`` only on a GPU).
    """
    cuda = torch.cuda.is_available() and str(config.trainer.accelerator) in ("auto", "gpu", "cuda")
    devices_here = torch.cuda.device_count() if cuda else (os.cpu_count() or 1)
    names = list(wanted) if wanted is not None else [n for n in LEVERS if n != "compile" or cuda]
    levers: list[Lever] = []
    skipped: list[str] = []
    for name in names:
        lever = _lever(name, config, cuda, devices_here)
        if isinstance(lever, str):
            skipped.append(f"{name}: {lever}")
            continue
        settings = tuple(s for s in lever.settings if not (unchanged_only and s.changes_training))
        if not settings:
            skipped.append(f"{name}: changes what is learned (--unchanged_training_only)")
            continue
        levers.append(Lever(name, settings))
    return levers, skipped


def _lever(name: str, config: Any, cuda: bool, devices_here: int) -> Lever | str:
    """The lever's settings for this config, or why it does not apply here."""
    model, data, trainer = config.model, config.data, config.trainer
    if name == "channels_last":
        other = not bool(model.channels_last)
        layout = "channels_last" if other else "NCHW"
        value = str(other).lower()
        return Lever(
            name, (Setting(name, layout, ("--model.channels_last", value), {"model.channels_last": other}, False),)
        )
    if name == "threads":
        if cuda:
            return "training runs on a GPU: CPU threads only feed it"
        cores = os.cpu_count() or 1
        current = config.get("num_threads") or torch.get_num_threads()
        counts = sorted({1, max(1, cores // 2), cores} - {current})
        if not counts:
            return f"this machine has {cores} CPU core(s) and the recipe uses them"
        return Lever(
            name,
            tuple(
                Setting(name, f"{n} thread(s)", ("--num_threads", str(n)), {"num_threads": n}, False) for n in counts
            ),
        )
    if name == "pipeline":
        return Lever(name, tuple(_pipeline_settings(data, cuda)))
    if name == "precision":
        current = str(trainer.precision)
        options = ["32-true", "bf16-mixed"] + (["16-mixed"] if cuda else [])
        if cuda and not torch.cuda.is_bf16_supported():
            options.remove("bf16-mixed")
        precisions = tuple(
            Setting(name, p, ("--trainer.precision", p), {"trainer.precision": p}, True)
            for p in options
            if p != current
        )
        return Lever(name, precisions) if precisions else "no other precision runs here"
    if name == "batch_size":
        batch = int(data.batch_size)
        lr = _learning_rate(model)
        rule = _lr_rule(model)
        settings_list = []
        largest = _training_images(data)
        for factor in BATCH_FACTORS:
            new_batch = int(batch * factor)
            if new_batch < 1 or (largest is not None and new_batch > largest):
                continue
            args = ["--data.batch_size", str(new_batch)]
            yaml: dict[str, Any] = {"data.batch_size": new_batch}
            label = f"{new_batch}"
            if lr is not None:
                new_lr = lr * (factor if rule == "linear" else math.sqrt(factor))
                args += ["--model.optimizer.init_args.lr", f"{new_lr:.6g}"]
                yaml["model.optimizer.init_args.lr"] = float(f"{new_lr:.6g}")
                label += f" (lr {new_lr:.4g}, {rule} rule)"
            settings_list.append(Setting(name, label, tuple(args), yaml, True))
        return Lever(name, tuple(settings_list))
    if name == "compile":
        if bool(model.compile):
            return "the recipe already compiles the network"
        return Lever(
            name, (Setting(name, "torch.compile", ("--model.compile", "true"), {"model.compile": True}, False),)
        )
    if name == "ddp":
        if trainer.strategy not in ("auto", None) or str(trainer.devices) not in ("auto", "1", "None"):
            return f"the recipe already sets strategy={trainer.strategy} devices={trainer.devices}"
        processes = min(devices_here, 2 if not cuda else devices_here)
        if processes < 2:
            return f"this machine has {devices_here} {'GPU' if cuda else 'CPU core'}(s): nothing to run in parallel"
        per_device = max(1, int(data.batch_size) // processes)
        ddp_args = (
            "--trainer.strategy",
            "ddp",
            "--trainer.devices",
            str(processes),
            "--data.batch_size",
            str(per_device),
        )
        ddp_yaml = {"trainer.strategy": "ddp", "trainer.devices": processes, "data.batch_size": per_device}
        label = f"{processes} processes, batch {per_device} each"
        return Lever(name, (Setting(name, label, ddp_args, ddp_yaml, True, processes=processes),))
    raise ValueError(f"--levers {name!r} is not allowed: use some of {', '.join(LEVERS)}")


def _pipeline_settings(data: Any, cuda: bool) -> list[Setting]:
    """The other input pipelines: preload (on the GPU too, where there is one), DataLoader with 0-4 workers."""
    residency = str(getattr(data, "residency", "host"))
    preloads = [("host", "preload")] + ([("device", "preload, on the GPU")] if cuda else [])
    settings = []
    for where, label in preloads:
        if data.pipeline == "preload" and residency == where:
            continue
        args = ("--data.pipeline", "preload", "--data.residency", where)
        settings.append(Setting("pipeline", label, args, {"data.pipeline": "preload", "data.residency": where}, False))
    for workers in range(0, min(4, os.cpu_count() or 1) + 1):
        if data.pipeline == "dataloader" and workers == data.num_workers:
            continue
        # residency "device" belongs to the preload pipeline: the DataLoader one needs "host"
        settings.append(
            Setting(
                "pipeline",
                f"dataloader, {workers} workers",
                ("--data.pipeline", "dataloader", "--data.num_workers", str(workers), "--data.residency", "host"),
                {"data.pipeline": "dataloader", "data.num_workers": workers, "data.residency": "host"},
                False,
            )
        )
    return settings


def _training_images(data: Any) -> int | None:
    """Images per epoch in the training split (a batch larger than it cannot be taken), if known."""
    if bool(data.synthetic):
        return int(data.synthetic_size) - int(data.val_size)
    if getattr(data, "data_dir", None) is not None and bool(data.verify_checksums):
        return 50_000 - int(data.val_size)
    return None


def _learning_rate(model: Any) -> float | None:
    optimizer = model.optimizer
    init_args = getattr(optimizer, "init_args", None) if not isinstance(optimizer, dict) else optimizer.get("init_args")
    lr = getattr(init_args, "lr", None) if not isinstance(init_args, dict) else init_args.get("lr")
    return float(lr) if isinstance(lr, (int, float)) else None


def _lr_rule(model: Any) -> str:
    optimizer = model.optimizer
    path = getattr(optimizer, "class_path", None) if not isinstance(optimizer, dict) else optimizer.get("class_path")
    return "sqrt" if "adam" in str(path).lower() else "linear"


# --------------------------------------------------------------------------------- the trials
def _batch_samples(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if hasattr(first, "shape") else 1


def _run_trial(
    fit_args: list[str], setting: Setting | None, warmup: int, timed: int, max_seconds: float
) -> dict[str, Any]:
    """One timed trial, its training stopped after ``max_seconds`` (Trainer ``max_time``);
    ``{"error": ...}`` when it fails (out of memory and out of time included)."""
    # Epochs unbounded, so the trial runs its steps whatever the recipe's epochs and batch limits.
    length = ["--trainer.max_epochs", "-1", "--trainer.max_steps", str(warmup + timed)]
    length += ["--trainer.max_time", _duration(max_seconds)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lit-accel-tune-") as folder:
        # The trial's logs in its temporary folder; the working folder stays the user's, so the
        # recipe's relative paths (--config files, data.data_dir) mean what they mean to fit.
        where = ["--trainer.default_root_dir", folder, "--trainer.logger.init_args.save_dir", folder]
        args = [*fit_args, *(setting.args if setting else ()), *TRIAL_FIT_ARGS, *where, *length]
        try:
            if setting is not None and setting.processes > 1:
                result = _subprocess_trial(args, folder, warmup, timed, max_seconds)
            else:
                result = _in_process_trial(args, folder, warmup, timed)
        except torch.OutOfMemoryError:
            result = {"error": "out of memory"}
        except (SIGTERMException, KeyboardInterrupt):
            raise  # the user stops tune itself (SIGTERMException is a SystemExit: not a failed trial)
        except (Exception, SystemExit) as error:  # a failed trial is a result: the table shows why
            message = str(error).strip().splitlines()
            # "|" would split the Markdown table's cell
            result = {"error": f"{type(error).__name__}: {message[-1] if message else ''}"[:160].replace("|", "/")}
    result["seconds"] = time.perf_counter() - started
    return result


def _duration(seconds: float) -> str:
    """Lightning's ``max_time`` string, ``DD:HH:MM:SS`` (two digits each), at least one second."""
    minutes, secs = divmod(max(1, math.ceil(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{secs:02d}"


def _in_process_trial(args: list[str], folder: str, warmup: int, timed: int) -> dict[str, Any]:
    from lit_accel.cli import LitAccelCLI

    timer = TrialTimer(warmup, timed)

    class _TrialCLI(LitAccelCLI):
        @override
        def instantiate_classes(self) -> None:
            super().instantiate_classes()
            self.trainer.callbacks.append(timer)  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared

    threads = torch.get_num_threads()
    try:
        with quiet():
            _TrialCLI(args=["fit", *args])
    finally:
        torch.set_num_threads(threads)
    if not timer.result:
        raise RuntimeError(
            f"stopped before {warmup + timed} optimizer steps: out of the budget's time, or the run is shorter"
        )
    return dict(timer.result)


def _subprocess_trial(args: list[str], folder: str, warmup: int, timed: int, max_seconds: float) -> dict[str, Any]:
    output = Path(folder) / "timer.json"
    timer = json.dumps(
        {
            "class_path": "lit_accel.tune.TrialTimer",
            "init_args": {"warmup_steps": warmup, "timed_steps": timed, "output": str(output)},
        }
    )
    command = [sys.executable, "-m", "lit_accel", "fit", *args, "--trainer.callbacks+=" + timer]
    # max_time bounds the training; start-up and set-up get a minute on top
    done = subprocess.run(command, capture_output=True, text=True, timeout=max_seconds + 60)
    if done.returncode != 0 or not output.exists():
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(f"exit {done.returncode}: {lines[-1] if lines else 'no timing written'}")
    result: dict[str, Any] = json.loads(output.read_text())
    return result


# --------------------------------------------------------------------------------- the search
def tune(
    fit_args: list[str],
    levers: list[Lever],
    budget_s: float,
    warmup_steps: int = 3,
    timed_steps: int = 10,
    rounds: int = 3,
    min_gain: float = 0.03,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure ``levers`` against the recipe ``fit_args`` within ``budget_s`` seconds.

    Returns ``{"baseline": Measured, "settings": [(Setting, Measured)], "chosen": [Setting],
    "combined": Measured | None, "not_measured": [Setting], "not_combined": bool, "seconds": float}``;
    ``not_combined``: several levers had a winner but the budget left no time to measure them
    together, so only the fastest is chosen.

    Raises:
        ValueError: the budget does not allow the baseline and one setting (the message says how
            much it would take), or the baseline trial itself fails.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    settings = [s for lever in levers for s in lever.settings]
    baseline = Measured()
    measured = {s: Measured() for s in settings}
    trial_seconds: dict[Setting | None, float] = {}
    planned = rounds * (1 + len(settings))
    bar = tqdm(total=planned, desc="lit-accel tune", unit="trial", disable=not progress, file=sys.stderr)

    def run(setting: Setting | None) -> dict[str, Any]:
        left = budget_s - (time.perf_counter() - started)
        result = _run_trial(fit_args, setting, warmup_steps, timed_steps, left)
        trial_seconds[setting] = result["seconds"]
        bar.update(1)
        bar.set_postfix_str(setting.name if setting else "baseline")
        return result

    first = run(None)
    if "error" in first:
        bar.close()
        raise ValueError(f"the recipe itself failed in a trial: {first['error']}")
    if budget_s < 2 * first["seconds"]:
        bar.close()
        raise ValueError(
            f"budget_s={budget_s:g} is too small: one trial of the recipe took {first['seconds']:.1f} s and the"
            f" baseline and one setting need at least {2 * first['seconds']:.0f} s. Raise --budget_s (e.g."
            f" {math.ceil(first['seconds'] * (2 + len(settings)) * 1.2)} for one round of every setting), or"
            " lower --timed_steps"
        )
    _record(baseline, first)
    not_measured: set[Setting] = set()
    for round_index in range(rounds):
        if round_index > 0:
            if _over_budget(started, budget_s, trial_seconds.get(None, first["seconds"])):
                break
            result = run(None)
            if "error" in result:
                break
            _record(baseline, result)
        round_baseline = baseline.images_per_sec[-1]
        order = settings if round_index % 2 == 0 else settings[::-1]
        for setting in order:
            if measured[setting].error is not None:
                continue
            estimate = trial_seconds.get(setting, trial_seconds[None] * setting.processes * 1.5)
            if _over_budget(started, budget_s, estimate):
                if not measured[setting].images_per_sec:
                    not_measured.add(setting)
                continue
            result = run(setting)
            if "error" in result:
                measured[setting].error = result["error"]
                continue
            _record(measured[setting], result, round_baseline)
            not_measured.discard(setting)
    chosen = _choose(levers, measured, min_gain)
    combined = None
    if len(chosen) > 1 and not _time_to_combine(started, budget_s, trial_seconds, chosen):
        # Never measured together: only the fastest single setting has shown it is faster.
        chosen = [max(chosen, key=lambda s: statistics.median(measured[s].ratios))]
        not_combined = True
    else:
        not_combined = False
    if len(chosen) > 1:
        merged = combine(chosen)
        base = run(None)
        result = run(merged)
        combined = Measured()
        if "error" in result or "error" in base:
            combined.error = result.get("error") or base.get("error")
        else:
            _record(combined, result, base["images_per_sec"])
        best_single = max(statistics.median(measured[s].ratios) for s in chosen)
        if combined.error is not None or statistics.median(combined.ratios) < best_single:
            chosen = [max(chosen, key=lambda s: statistics.median(measured[s].ratios))]
    bar.close()
    return {
        "baseline": baseline,
        "settings": [(s, measured[s]) for s in settings],
        "chosen": chosen,
        "combined": combined,
        "not_measured": [s for s in settings if s in not_measured],
        "not_combined": not_combined,
        "seconds": time.perf_counter() - started,
    }


def combine(chosen: list[Setting]) -> Setting:
    """The chosen settings of several levers as one setting, their overrides applied in order.

    The ``batch_size`` lever's batch is the global batch it was measured at; the ``ddp`` lever splits
    the recipe's batch over its processes. Taken together, each process gets the ``batch_size``
    winner's batch divided by the processes, so the global batch (and the learning rate scaled for
    it) stays the one the batch lever chose. Its cap, the training split, thereby caps each rank's
    batch at its shard.
    """
    args = [a for s in chosen for a in s.args]
    yaml = {k: v for s in chosen for k, v in s.yaml.items()}
    processes = max(s.processes for s in chosen)
    by_lever = {s.lever: s for s in chosen}
    if "ddp" in by_lever and "batch_size" in by_lever:
        per_device = max(1, int(by_lever["batch_size"].yaml["data.batch_size"]) // processes)
        args += ["--data.batch_size", str(per_device)]  # the last occurrence of a flag wins
        yaml["data.batch_size"] = per_device
    return Setting(
        "combined",
        " + ".join(s.name for s in chosen),
        tuple(args),
        yaml,
        any(s.changes_training for s in chosen),
        processes,
    )


def _time_to_combine(
    started: float, budget_s: float, trial_seconds: dict[Setting | None, float], chosen: list[Setting]
) -> bool:
    """Whether the budget holds a recipe trial and one of the merged settings (about as long as
    its slowest part)."""
    together_s = trial_seconds[None] + max((trial_seconds.get(s, 0.0) for s in chosen), default=0.0)
    return not _over_budget(started, budget_s, together_s)


def _over_budget(started: float, budget_s: float, next_trial_s: float) -> bool:
    return time.perf_counter() - started + next_trial_s > budget_s


def _record(into: Measured, result: dict[str, Any], baseline_images_per_sec: float | None = None) -> None:
    into.images_per_sec.append(float(result["images_per_sec"]))
    into.data_wait.append(float(result["data_wait"]))
    into.peak_memory_mb.append(float(result["peak_memory_mb"]))
    if baseline_images_per_sec:
        into.ratios.append(float(result["images_per_sec"]) / baseline_images_per_sec)


def _choose(levers: list[Lever], measured: dict[Setting, Measured], min_gain: float) -> list[Setting]:
    """Per lever, the fastest setting if its median ratio beats the baseline by ``min_gain``."""
    chosen = []
    for lever in levers:
        candidates = [s for s in lever.settings if measured[s].ratios and measured[s].error is None]
        if not candidates:
            continue
        best = max(candidates, key=lambda s: statistics.median(measured[s].ratios))
        if statistics.median(measured[best].ratios) >= 1.0 + min_gain:
            chosen.append(best)
    return chosen


# --------------------------------------------------------------------------------- the report
def table(report: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| lever | setting | images/s (median) | ratio to the recipe | data wait | peak memory MB | changes training |"
        " trials |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    base: Measured = report["baseline"]
    rows: list[tuple[str, str, Measured, bool]] = [("recipe", "as configured", base, False)]
    rows += [(s.lever, s.name, m, s.changes_training) for s, m in report["settings"]]
    if report["combined"] is not None:
        chosen = report["chosen"]
        name = " + ".join(s.name for s in chosen) if len(chosen) > 1 else "(slower than the best single setting)"
        rows.append(("combined", name, report["combined"], any(s.changes_training for s in chosen)))
    not_measured = set(report["not_measured"])
    for lever, name, m, changes in rows:
        if m.error is not None:
            cells = ["failed: " + m.error, "—", "—", "—"]
        elif not m.images_per_sec:
            cells = ["not measured (budget)" if any(s.name == name for s in not_measured) else "—", "—", "—", "—"]
        else:
            ratio = f"{statistics.median(m.ratios):.3f}" if m.ratios else "1.000"
            cells = [
                f"{statistics.median(m.images_per_sec):,.0f}",
                ratio,
                f"{statistics.median(m.data_wait):.1%}",
                f"{statistics.median(m.peak_memory_mb):,.0f}",
            ]
        trials = len(m.images_per_sec)
        lines.append(f"| {lever} | {name} | {' | '.join(cells)} | {'yes' if changes else 'no'} | {trials} |")
    return "\n".join(lines)


def tuned_yaml(report: dict[str, Any], command: str) -> str:
    """The YAML for the chosen settings, with a comment per entry saying what it changes."""
    chosen: list[Setting] = report["chosen"]
    lines = [
        "# Written by `lit-accel tune`, measured on this machine:",
        f"#   {command}",
        "# Use it after your own configs: lit-accel fit --config <yours> --config <this file>",
    ]
    if not chosen:
        lines.append("# No lever was faster than the recipe by the required margin: nothing to change.")
        lines.append("{}")
        return "\n".join(lines) + "\n"
    nested: dict[str, Any] = {}
    notes: dict[str, str] = {}
    values = combine(chosen).yaml  # several levers' winners as they were measured together
    for setting in chosen:
        ratio = statistics.median(next(m for s, m in report["settings"] if s == setting).ratios)
        effect = "CHANGES WHAT IS LEARNED" if setting.changes_training else "training unchanged"
        for key in setting.yaml:
            notes[key] = f"{setting.lever}: {setting.name}, x{ratio:.3f} images/s ({effect})"
    if {"ddp", "batch_size"} <= {s.lever for s in chosen}:
        notes["data.batch_size"] = "per process: the batch_size lever's batch split over the ddp processes"
    for key, value in values.items():
        node = nested
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    lines += _yaml_lines(nested, notes, "", 0)
    return "\n".join(lines) + "\n"


def _yaml_lines(node: dict[str, Any], notes: dict[str, str], prefix: str, indent: int) -> list[str]:
    out = []
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.append(" " * indent + f"{key}:")
            out += _yaml_lines(value, notes, dotted + ".", indent + 2)
        else:
            text = json.dumps(value)  # JSON scalars are YAML scalars
            out.append(" " * indent + f"{key}: {text}  # {notes[dotted]}")
    return out


def _check_output(path: str) -> Path:
    output = Path(path)
    if output.is_dir():
        raise ValueError(f"--output {path} is a folder: give a file name, e.g. {output / 'tuned.yaml'}")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"--output {path}: the folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise ValueError(f"--output {path} cannot be written (no permission); choose another path")
    return output


def _write_atomically(path: Path, text: str) -> None:
    """All or nothing: a failed write leaves no partial YAML (and an older file as it was)."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
        temporary = handle.name
    try:
        os.replace(temporary, path)
    except OSError:
        os.unlink(temporary)
        raise


def main(argv: list[str]) -> int:
    """``lit-accel tune ARGS``: returns the exit status (2 with one message for bad input)."""
    parser = argparse.ArgumentParser(
        prog="lit-accel tune",
        description="Measure the acceleration levers on this machine and write the fastest as a config.",
        epilog="Every other argument (--config files, --model.*, --data.*, --trainer.*) is the recipe, as for fit.",
    )
    parser.add_argument("--budget_s", type=float, default=120.0, help="seconds for all trials (default 120)")
    parser.add_argument("--output", default="tuned.yaml", help="the YAML to write (default tuned.yaml)")
    parser.add_argument("--levers", help=f"comma-separated, some of {','.join(LEVERS)} (default: all that apply)")
    parser.add_argument(
        "--unchanged_training_only", action="store_true", help="only levers that leave what is learned unchanged"
    )
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed optimizer steps per trial")
    parser.add_argument("--timed_steps", type=int, default=10, help="timed optimizer steps per trial")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of trials (each: recipe, then every setting)")
    parser.add_argument("--min_gain", type=float, default=0.03, help="a setting must be this much faster (0.03: 3%%)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args, fit_args = parser.parse_known_args(argv)
    try:
        for name in ("budget_s", "warmup_steps", "timed_steps", "rounds"):
            if not 0 < getattr(args, name) < math.inf:
                raise ValueError(f"--{name}={getattr(args, name)} is not allowed: use a positive (finite) number")
        if not args.min_gain >= 0:
            raise ValueError(f"--min_gain={args.min_gain} is not allowed: use 0 or more")
        output = _check_output(args.output)
        wanted = None if args.levers is None else [n.strip() for n in args.levers.split(",") if n.strip()]
        if wanted == []:
            raise ValueError(f"--levers {args.levers!r} names no lever: use some of {', '.join(LEVERS)}")
        unknown = [n for n in wanted or [] if n not in LEVERS]
        if unknown:
            raise ValueError(f"--levers {','.join(unknown)} is not allowed: use some of {', '.join(LEVERS)}")
        config = _parse_recipe(fit_args)
        levers, skipped = plan_levers(config, wanted, args.unchanged_training_only)
        if wanted is not None and skipped:
            raise ValueError("--levers: " + "; ".join(skipped))
        if not levers:
            raise ValueError("no lever applies to this recipe on this machine: " + "; ".join(skipped))
        report = tune(
            fit_args,
            levers,
            args.budget_s,
            args.warmup_steps,
            args.timed_steps,
            args.rounds,
            args.min_gain,
            progress=not args.no_progress,
        )
    except ValueError as error:
        print(f"lit-accel tune: error: {error}", file=sys.stderr)
        return 2
    except (SIGTERMException, KeyboardInterrupt) as stop:
        print(f"lit-accel tune: stopped ({type(stop).__name__}); nothing was written", file=sys.stderr)
        return 143 if isinstance(stop, SIGTERMException) else 130
    print(table(report))
    for line in skipped:
        print(f"# not measured: {line}")
    if report.get("not_combined"):
        print("# the budget left no time to measure the winners of several levers together: only the fastest is kept")
    command = "lit-accel tune " + " ".join(argv)
    _write_atomically(output, tuned_yaml(report, command))
    chosen = ", ".join(f"{s.lever}={s.name}" for s in report["chosen"]) or "nothing (the recipe is the fastest)"
    print(f"# {report['seconds']:.0f} s of trials; chosen: {chosen}; written to {output}")
    return 0


def _parse_recipe(fit_args: list[str]) -> Any:
    """The recipe's ``fit`` config, parsed as ``lit-accel fit`` parses it (bad arguments: exit 2)."""
    from lit_accel.cli import LitAccelCLI

    with quiet():
        cli = LitAccelCLI(args=fit_args, run=False)  # run=False: no subcommand, the fit arguments alone
    return cli.config
