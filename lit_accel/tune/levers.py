"""The levers ``lit-accel tune`` measures: each a group of settings (command-line overrides and the
YAML they become), planned from the recipe's parsed ``fit`` config and this machine."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BATCH_FACTORS", "LEVERS", "Lever", "Setting", "combine", "plan_levers"]

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
    data = data.init_args if "init_args" in data else data  # --data CLASS: the data class's own arguments
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
    if bool(getattr(data, "synthetic", False)):  # CIFAR10DataModule's (not an image folder's)
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
