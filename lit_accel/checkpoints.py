"""Checkpoints from a fresh process: find them by name ("last", "best") and check them first."""

from __future__ import annotations

import glob
import io
import os
import pickle
import zipfile
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from typing_extensions import override

from lit_accel.errors import CheckpointError

__all__ = [
    "CHECKPOINT_ALIASES",
    "LastAfterEveryValidation",
    "check_checkpoint",
    "find_checkpoint",
    "hpc_checkpoints",
    "read_checkpoint",
    "verify_distributed_checkpoint",
]

CHECKPOINT_ALIASES = ("best", "last")
# ModelCheckpoint's file names, set in lit_accel.cli: "last.ckpt" and one "best-….ckpt" per run.
# A checkpoint is a file, or a folder of .distcp shards under FSDP2 (ModelParallelStrategy).
_LAST_NAME = "last.ckpt"
_BEST_PATTERN = "best-*.ckpt"
# What Lightning saves on SLURM's requeue signal: <default_root_dir>/hpc_ckpt_<n>.ckpt
# (lightning.pytorch.trainer.connectors.checkpoint_connector, hpc_save_path).
_HPC_PATTERN = "hpc_ckpt_*.ckpt"


def find_checkpoint(root: str, which: str, hpc_dir: str | None = None, recursive: bool = True) -> str | None:
    """The newest run's ``last`` or ``best`` checkpoint under ``root``, or None.

    Runs are the ``…/checkpoints/`` folders below ``root`` (for TensorBoard logs:
    ``runs/<name>/version_<n>/checkpoints``); the newest is the one whose checkpoint was written
    last. ``last`` is the newest of the runs' ``last.ckpt`` and the ``hpc_ckpt_<n>.ckpt`` files
    that Lightning writes into ``hpc_dir`` (the Trainer's ``default_root_dir``) on SLURM's requeue
    signal, of those saved by a run under ``root`` (its ModelCheckpoint's folder, recorded in the
    file, lies under ``root``, or the file itself does).

    ``best`` is the file that the newest run's ModelCheckpoint recorded as its best
    (``best_model_path``, read from the run's ``last.ckpt``, else from its newest checkpoint, with
    ``weights_only``), whatever its file name and however many top-k files the run keeps; it must
    lie in that run's folder. Without such a record (a run that never validated, a file that cannot
    be read), ``best`` is the newest ``best-*.ckpt`` (the name lit-accel gives it).

    Args:
        root: the folder to search (the logger's save dir).
        which: ``"last"`` or ``"best"``.
        hpc_dir: where to look for Lightning's ``hpc_ckpt_<n>.ckpt`` files (``last`` only).
        recursive: search every ``checkpoints/`` folder below ``root``; False: only
            ``root/checkpoints/`` (where Lightning saves without a logger: ``default_root_dir``).

    Raises:
        ValueError: if ``which`` is not one of ``"best"``, ``"last"``.
    """
    if which not in CHECKPOINT_ALIASES:
        raise ValueError(f"which={which!r} is not allowed: use 'best' or 'last'")
    if which == "best":
        recorded = _recorded_best(root, recursive)
        if recorded is not None:
            return recorded
    found = _in_run_folders(root, _LAST_NAME if which == "last" else _BEST_PATTERN, recursive)
    if which == "last" and hpc_dir is not None:
        # Without a logger every run saves its hpc files into default_root_dir: only those whose
        # ModelCheckpoint saved in root/checkpoints/ are this run's.
        found += hpc_checkpoints(hpc_dir, root if recursive else os.path.join(root, "checkpoints"))
    if not found:
        return None
    return max(found, key=os.path.getmtime)


def _in_run_folders(root: str, pattern: str, recursive: bool) -> list[str]:
    """The checkpoints matching ``pattern`` in the run folders below ``root`` (``root/checkpoints/``
    only, when not ``recursive``)."""
    folders = (
        os.path.join(glob.escape(root), "**", "checkpoints")
        if recursive
        else os.path.join(glob.escape(root), "checkpoints")
    )
    return glob.glob(os.path.join(folders, pattern), recursive=recursive)


def _recorded_best(root: str, recursive: bool) -> str | None:
    """The newest run's best checkpoint as its ModelCheckpoint recorded it; None without a usable record."""
    checkpoints = _in_run_folders(root, "*.ckpt", recursive)
    if not checkpoints:
        return None
    folder = os.path.dirname(max(checkpoints, key=os.path.getmtime))
    last = os.path.join(folder, _LAST_NAME)
    newest_in_run = max(glob.glob(os.path.join(glob.escape(folder), "*.ckpt")), key=os.path.getmtime)
    return _best_in_record(_callback_states(last if os.path.exists(last) else newest_in_run), folder)


def _best_in_record(states: dict[str, Any], folder: str) -> str | None:
    """The best checkpoint that a checkpoint's ModelCheckpoint states (``checkpoint["callbacks"]``) name in ``folder``.

    A state counts when it monitors a metric and its ``best_model_path`` names ``folder`` (by the
    absolute path, or by a relative one that the folder's path ends with: Lightning records the
    path as the run saw it, relative to its working folder) and a file or folder of that name is
    there. lit-accel's own ``checkpoint`` callback wins over other ModelCheckpoints; two others that
    disagree are no answer.
    """
    found: dict[str, str] = {}
    for key, state in states.items():
        if not isinstance(state, dict) or state.get("monitor") is None:
            continue
        recorded = state.get("best_model_path")
        if not isinstance(recorded, str) or not recorded or not _names_folder(os.path.dirname(recorded), folder):
            continue
        path = os.path.join(folder, os.path.basename(recorded))
        if os.path.exists(path):
            found[str(key)] = path
    ours = [path for key, path in found.items() if key.startswith(LastAfterEveryValidation.__name__ + "{")]
    if ours:
        return ours[0]
    return found.popitem()[1] if len(set(found.values())) == 1 else None


def _names_folder(recorded: str, folder: str) -> bool:
    if os.path.isabs(recorded):
        return os.path.realpath(recorded) == os.path.realpath(folder)
    tail = os.path.normpath(recorded)
    return any(
        path == tail or path.endswith(os.sep + tail) for path in (os.path.abspath(folder), os.path.realpath(folder))
    )


def _callback_states(path: str) -> dict[str, Any]:
    """The callbacks' states saved in a checkpoint file (or an FSDP folder's ``meta.pt``), read with
    ``weights_only`` (plain data and tensors, nothing run); empty when they cannot be read."""
    try:
        if os.path.isdir(path):
            meta = os.path.join(path, "meta.pt")
            checkpoint = torch.load(meta, map_location="cpu", weights_only=True, mmap=True)
        else:
            checkpoint = read_checkpoint(path)
    except Exception:  # unreadable or refused: no record (the file found is checked before it is used)
        return {}
    callbacks = checkpoint.get("callbacks") if isinstance(checkpoint, dict) else None
    return callbacks if isinstance(callbacks, dict) else {}


def hpc_checkpoints(folder: str, root: str) -> list[str]:
    """Lightning's SLURM requeue checkpoints (``hpc_ckpt_<n>.ckpt``) in ``folder`` saved by a run under ``root``.

    A file that cannot be read (e.g. the job was killed while writing it) is left out.
    """
    root_path = os.path.realpath(root)
    found = []
    for path in glob.glob(os.path.join(glob.escape(folder), _HPC_PATTERN)):
        if _is_under(os.path.realpath(path), root_path):
            found.append(path)
            continue
        try:
            callbacks = read_checkpoint(path).get("callbacks") or {}
        except CheckpointError:
            continue
        folders = [state.get("dirpath") for state in callbacks.values() if isinstance(state, dict)]
        if any(isinstance(d, str) and _is_under(os.path.realpath(d), root_path) for d in folders):
            found.append(path)
    return found


def _is_under(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint file's contents (tensors memory-mapped, so cheap).

    Raises:
        CheckpointError: if the file is truncated, corrupted or not a Lightning checkpoint.
    """
    try:
        if not zipfile.is_zipfile(path):  # torch.save's format; else mmap's error would be the message
            raise ValueError("not a torch checkpoint archive")
        # weights_only=True, as Lightning loads it: plain types and tensors, no arbitrary code.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise KeyError("no 'state_dict' in the file")
        return checkpoint
    except Exception as err:  # zipfile, pickle and torch errors all mean "unreadable"
        if _is_refused_object(err):
            raise CheckpointError(refused_object_message(path, err)) from None
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {first_line}); it is truncated, corrupted "
            "or not a Lightning checkpoint. Use another checkpoint of the run (e.g. best-*.ckpt), or train again."
        ) from err


def _is_refused_object(err: Exception) -> bool:
    """torch's ``weights_only`` loader met an object it does not admit (it ran nothing)."""
    return isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err)


def refused_object_message(path: str, err: Exception) -> str:
    """One message for a checkpoint that holds objects other than tensors and plain data.

    torch's own message suggests loading again with ``weights_only=False``, which would run
    whatever the file holds: the one thing not to do with a file of unknown origin. This names
    what was refused instead.
    """
    found = next(
        (line.strip() for line in str(err).splitlines() if "Unsupported global" in line or "GLOBAL" in line), ""
    )
    detail = f" ({found.rstrip('.')})" if found else ""
    return (
        f"checkpoint {path} holds Python objects other than tensors and plain data{detail}: refused, and nothing in "
        "it was run. lit-accel's checkpoints never hold such objects; use a checkpoint from a source you trust."
    )


def check_checkpoint(path: str, model: nn.Module, sharded: bool = False) -> None:
    """Fail early, with one clear message, on a checkpoint that cannot be used for ``model``.

    Checks that ``path`` exists, loads (not truncated or corrupted) and holds weights whose names
    and shapes match ``model``'s. A sharded (FSDP2, folder) checkpoint is checked by
    :func:`verify_distributed_checkpoint` (it holds only data) and must be loaded by a sharded
    strategy (``sharded``); its weights are loaded by the strategy.

    Raises:
        CheckpointError: naming the checkpoint, the problem and what to do.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist. Pass an existing file, or --ckpt_path best|last.")
    if os.path.isdir(path):
        verify_distributed_checkpoint(path)
        if not sharded:
            raise CheckpointError(
                f"checkpoint {path} is a distributed (FSDP2) checkpoint folder, which only the FSDP strategy loads: "
                "add --config configs/strategy/fsdp.yaml --trainer.devices N (N: the processes it was saved with). "
                f"To serve the model outside lit-accel, 'lit-accel-export {path} -o DIR' writes its weights as "
                "TorchScript and torch.export files (these are not checkpoints lit-accel loads)."
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
            f"Use the config the checkpoint was trained with: {_run_config_hint(path)}."
        )


def _run_config_hint(path: str) -> str:
    """``--config <run>/config.yaml`` for a checkpoint in a run's ``checkpoints/`` folder that has
    one (LightningCLI saves it there), else where such a file lies."""
    folder = os.path.dirname(os.path.abspath(path))
    run_config = os.path.join(os.path.dirname(os.path.dirname(path)), "config.yaml")
    if os.path.basename(folder) == "checkpoints" and os.path.isfile(run_config):
        return f"--config {run_config}"
    return "its run folder holds config.yaml (--config runs/<name>/version_<n>/config.yaml)"


# What the ".metadata" file of a torch.distributed.checkpoint folder holds (torch 2.4-2.14):
# dataclasses of torch.distributed.checkpoint.metadata, the file reader's storage records, sizes,
# dtypes, layouts, and the checkpoint's path. Nothing else is unpickled.
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _DistributedMetadataUnpickler(pickle.Unpickler):
    @override
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def verify_distributed_checkpoint(folder: str) -> None:
    """Refuse a distributed (FSDP2) checkpoint folder unless it holds only data; read nothing else first.

    torch's distributed-checkpoint reader unpickles the folder's ``.metadata`` and every non-tensor
    item of its ``.distcp`` shards without restriction, so a crafted folder would run code as it
    is loaded. This reads ``.metadata`` with an unpickler that admits only the checkpoint-metadata
    types, each non-tensor item with ``torch.load(weights_only=True)``, and Lightning's ``meta.pt``
    likewise; tensors are read by torch with ``weights_only=True`` anyway. Items must lie inside the
    folder.

    Raises:
        CheckpointError: naming the folder and what was refused or missing.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    metadata_path = os.path.join(folder, ".metadata")
    if not os.path.isfile(metadata_path):
        raise CheckpointError(
            f"checkpoint folder {folder} has no .metadata file: it is not a complete distributed (FSDP) "
            "checkpoint. Use another checkpoint of the run, e.g. an earlier best-*.ckpt."
        )
    refused = (
        f"checkpoint folder {folder} holds Python objects other than checkpoint data"
        " ({why}): refused, and nothing in it was run. Use a checkpoint from a source you trust."
    )
    try:
        with open(metadata_path, "rb") as f:
            metadata = _DistributedMetadataUnpickler(f).load()
    except Exception as err:  # UnpicklingError for a refused global; any other error: not metadata
        raise CheckpointError(refused.format(why=f".metadata: {type(err).__name__}: {err}")) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(refused.format(why=".metadata is not a distributed-checkpoint index"))
    root = os.path.realpath(folder)
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        shard = os.path.realpath(os.path.join(root, str(info.relative_path)))
        if os.path.dirname(shard) != root or getattr(info, "transform_descriptors", None):
            raise CheckpointError(refused.format(why=f"item {index.fqn} is stored outside the folder or transformed"))
        try:
            with open(shard, "rb") as f:
                f.seek(int(info.offset))
                torch.load(io.BytesIO(f.read(int(info.length))), map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(refused.format(why=f"item {index.fqn}: {type(err).__name__}")) from None
    extra = os.path.join(folder, "meta.pt")
    if os.path.isfile(extra):
        try:
            torch.load(extra, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise CheckpointError(refused.format(why=f"meta.pt: {type(err).__name__}")) from None


class LastAfterEveryValidation(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` is the state after every validation and at the end of fit.

    Lightning 2.6's ModelCheckpoint rewrites ``last`` at validation end only when it also wrote a
    top-k file at that step, so after a validation that does not improve the monitored metric
    ``last.ckpt`` stays behind; at the end of fit it writes ``last`` only if it never wrote one.
    Both gaps would make ``--ckpt_path last`` (test, or a relaunched fit) use an older state.
    The arguments are ModelCheckpoint's.
    """

    @override
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        if not trainer.sanity_checking and not trainer.fast_dev_run:
            self._save_last_if_behind(trainer)

    def _save_last_if_behind(self, trainer: Any) -> None:
        # _last_global_step_saved: the step of this callback's newest file (top-k or last)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
