"""Checkpoints from a fresh process: find them by name ("last", "best") and check them first."""

from __future__ import annotations

import glob
import os

from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lit_accel.errors import CheckpointError

__all__ = ["CHECKPOINT_ALIASES", "LastAfterEveryValidation", "check_checkpoint", "find_checkpoint", "read_checkpoint"]

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


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint file's contents (tensors memory-mapped, so cheap).

    Raises:
        CheckpointError: if the file is truncated, corrupted or not a Lightning checkpoint.
    """
    try:
        # weights_only=True, as Lightning loads it: plain types and tensors, no arbitrary code.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise KeyError("no 'state_dict' in the file")
        return checkpoint
    except Exception as err:  # zipfile, pickle and torch errors all mean "unreadable"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {first_line}); it is truncated, corrupted "
            "or not a Lightning checkpoint. Use another checkpoint of the run (e.g. best-*.ckpt), or train again."
        ) from err


def check_checkpoint(path: str, model: nn.Module) -> None:
    """Fail early, with one clear message, on a checkpoint that cannot be used for ``model``.

    Checks that ``path`` exists, loads (not truncated or corrupted) and holds weights whose names
    and shapes match ``model``'s. A sharded (FSDP2, folder) checkpoint is only checked for its
    metadata file: its shards are loaded by the strategy.

    Raises:
        CheckpointError: naming the checkpoint, the problem and what to do.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist. Pass an existing file, or --ckpt_path best|last.")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise CheckpointError(
                f"checkpoint folder {path} has no .metadata file: it is not a complete distributed (FSDP) "
                "checkpoint. Use another checkpoint of the run, e.g. an earlier best-*.ckpt."
            )
        return
    state = read_checkpoint(path)["state_dict"]
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items() if isinstance(t, torch.Tensor)}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing {len(missing)} weights (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unknown weights (e.g. {unexpected[0]})")
        if mismatched:
            name = mismatched[0]
            details.append(f"{len(mismatched)} of other shapes (e.g. {name}: {found[name]} vs {expected[name]})")
        raise CheckpointError(
            f"checkpoint {path} was saved from a different network than the configured one: {'; '.join(details)}. "
            "Use the config the checkpoint was trained with (its run folder holds config.yaml): "
            "--config runs/<name>/version_<n>/config.yaml."
        )


class LastAfterEveryValidation(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` is the state after every validation and at the end of fit.

    Lightning 2.6's ModelCheckpoint rewrites ``last`` at validation end only when it also wrote a
    top-k file at that step, so after a validation that does not improve the monitored metric
    ``last.ckpt`` stays behind; at the end of fit it writes ``last`` only if it never wrote one.
    Both gaps would make ``--ckpt_path last`` (test, or a relaunched fit) use an older state.
    The arguments are ModelCheckpoint's.
    """

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        if not trainer.sanity_checking and not trainer.fast_dev_run:
            self._save_last_if_behind(trainer)

    def _save_last_if_behind(self, trainer: Any) -> None:
        # _last_global_step_saved: the step of this callback's newest file (top-k or last)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
