"""Finding a finished run's checkpoints by name ("last", "best") from a fresh process."""

from __future__ import annotations

import glob
import os

__all__ = ["find_checkpoint", "CHECKPOINT_ALIASES"]

CHECKPOINT_ALIASES = ("best", "last")
# ModelCheckpoint's file names, set in lit_accel.cli: "last.ckpt" and one "best-….ckpt" per run.
# A checkpoint is a file, or a folder of .distcp shards under FSDP2 (ModelParallelStrategy).
_LAST_NAME = "last.ckpt"
_BEST_PATTERN = "best-*.ckpt"


def find_checkpoint(root: str, which: str) -> str | None:
    """The newest run's ``last`` or ``best`` checkpoint under ``root``, or None.

    Runs are the ``…/checkpoints/`` folders below ``root`` (for TensorBoard logs:
    ``runs/<name>/version_<n>/checkpoints``); the newest is the one whose checkpoint was written
    last.

    Args:
        root: the folder to search (the logger's save dir).
        which: ``"last"`` or ``"best"``.

    Raises:
        ValueError: if ``which`` is not one of ``"best"``, ``"last"``.
    """
    if which not in CHECKPOINT_ALIASES:
        raise ValueError(f"which={which!r} is not allowed: use 'best' or 'last'")
    pattern = _LAST_NAME if which == "last" else _BEST_PATTERN
    found = glob.glob(os.path.join(glob.escape(root), "**", "checkpoints", pattern), recursive=True)
    if not found:
        return None
    return max(found, key=os.path.getmtime)
