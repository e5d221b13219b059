"""Helpers shared by test modules (import as ``from helpers import …``; tests/ is on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"


def lit_accel_command() -> list[str]:
    """The installed console script: the real CLI a user runs."""
    exe = Path(sys.executable).with_name("lit-accel")
    return [str(exe)] if exe.exists() else ["lit-accel"]


def run_cli(args: list[str], cwd: Path, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
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
    """``--config`` arguments for files under configs/."""
    args: list[str] = []
    for name in names:
        args += ["--config", str(CONFIGS / name)]
    return args

