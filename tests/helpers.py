"""Helpers shared by test modules (import as ``from helpers import …``; tests/ is on sys.path)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

REPO_ROOT = Path(__file__).resolve().parents[1]
# The shipped configs (the repository's configs/ links here): `--config NAME` resolves in this folder.
CONFIGS = REPO_ROOT / "lit_accel" / "configs"


def lit_accel_command() -> list[str]:
    """The installed console script: the real CLI a user runs."""
    exe = Path(sys.executable).with_name("lit-accel")
    return [str(exe)] if exe.exists() else ["lit-accel"]


def run_cli(
    args: list[str], cwd: Path, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``lit-accel ARGS`` in a subprocess; returns the finished process (output captured)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        lit_accel_command() + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of a TensorBoard run folder: ``{tag: [(step, value), …]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def config(*names: str) -> list[str]:
    """``--config`` arguments for shipped config files (``config("cifar10.yaml", "strategy/ddp.yaml")``)."""
    args: list[str] = []
    for name in names:
        args += ["--config", str(CONFIGS / name)]
    return args


# The recipe's ValidationFigures switched off (it does no work at all then). On the command line
# `--trainer.callbacks.init_args.…` sets the last callback of the list: the recipe's figures.
FIGURES_OFF_ARGS = [
    "--trainer.callbacks.init_args.confusion_matrix",
    "false",
    "--trainer.callbacks.init_args.misclassified",
    "0",
]

# The least `lit-accel` trains, validates and tests: the smoke recipe, quiet, one batch of each split
# of a small synthetic set, no figures (tests/callbacks/test_validation_figures.py draws them).
TINY_CLI_ARGS = [
    *config("cifar10.yaml", "smoke.yaml"),
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--data.synthetic_size",
    "320",
    "--data.val_size",
    "64",
    "--data.synthetic_test_size",
    "64",
    "--trainer.limit_train_batches",
    "1",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.limit_test_batches",
    "1",
    *FIGURES_OFF_ARGS,
]


class FakeClock:
    """A clock that moves only when the test says so (seconds)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class MemoryLogger(Logger):
    """A Lightning logger that keeps every ``log_metrics`` call as ``(step, {key: float})`` in ``rows``.

    Args:
        prefix: keep only keys starting with it (rows with none are dropped).
        path: also append each row to this JSON-lines file (for ranks in other processes).
    """

    def __init__(self, prefix: str = "", path: str | None = None) -> None:
        super().__init__()
        self.prefix = prefix
        self.path = path
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {k: float(v) for k, v in metrics.items() if k.startswith(self.prefix)}
        if not row:
            return
        self.rows.append((step, row))
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps([step, row]) + "\n")

    def at(self, step: int, key: str) -> float:
        """The one value logged for ``key`` at ``step``."""
        values = [row[key] for s, row in self.rows if s == step and key in row]
        assert len(values) == 1, (step, key, self.rows)
        return values[0]

    def keys(self) -> set[str]:
        """Every metric key logged so far."""
        return {k for _, row in self.rows for k in row}


def quiet_cpu_trainer(
    root: Path, callbacks: list[Callback] | tuple[Callback, ...] = (), **overrides: Any
) -> pl.Trainer:
    """A one-process CPU Trainer writing under ``root``: no logger, progress bar, model summary or
    checkpointing unless ``overrides`` (which win over every default) say otherwise."""
    settings: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
        callbacks=list(callbacks),
    )
    return pl.Trainer(**{**settings, **overrides})


def same_state(a: Any, b: Any) -> bool:
    """Equal nested state (tensors, dicts, lists, numbers); NaN equals NaN here."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def through_checkpoint(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """``state`` saved in a checkpoint file and loaded back as Lightning loads it (weights_only)."""
    torch.save({"callbacks": {"state": state}}, path)
    return torch.load(path, weights_only=True)["callbacks"]["state"]


def free_port() -> int:
    """A TCP port nothing listens on now (for MASTER_PORT)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
