"""Checkpoints: written atomically, found by name ("last", "best") from a fresh process, checked
before use, and never allowed to choose code to import."""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import os
import pickle
import re
import secrets
import zipfile
from collections.abc import Collection, Iterator, Mapping
from fnmatch import fnmatch
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from torch import nn
from typing_extensions import override

from lit_accel.errors import CheckpointError

__all__ = [
    "CHECKPOINT_ALIASES",
    "TRUSTED_MODULES",
    "AtomicCheckpointIO",
    "LastAfterEveryValidation",
    "check_checkpoint",
    "check_import_paths",
    "check_readable",
    "find_checkpoint",
    "hpc_checkpoints",
    "import_paths",
    "read_checkpoint",
    "read_folder_meta",
    "run_checkpoints",
    "save_atomically",
    "verify_distributed_checkpoint",
]

CHECKPOINT_ALIASES = ("best", "last")
# ModelCheckpoint's file names, set in lit_accel.cli: "last.ckpt" and one "best-….ckpt" per run.
# A checkpoint is a file, or a folder of .distcp shards under FSDP2 (ModelParallelStrategy).
_LAST_NAME = "last.ckpt"
# A distributed (folder) last.ckpt moved aside while its successor is renamed into place
# (lit_accel.strategies.swap_into_place): complete, and the run's last when the swap was cut short.
_LAST_ASIDE = ".last.ckpt.old"
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
    if which == "last":
        found += [
            aside
            for aside in _in_run_folders(root, _LAST_ASIDE, recursive)
            if not os.path.exists(os.path.join(os.path.dirname(aside), _LAST_NAME))
        ]
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


def read_folder_meta(folder: str) -> dict[str, Any] | None:
    """The entries of an FSDP2 checkpoint folder that are not sharded tensors (Lightning's ``meta.pt``:
    epoch, callbacks, hyper-parameters, ``image_size``, ``class_names``, …), read with
    ``weights_only`` (plain data and tensors, nothing run); None when there is none or it cannot be
    read (the folder itself is checked before it is loaded: :func:`check_checkpoint`)."""
    try:
        meta = torch.load(os.path.join(folder, "meta.pt"), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, unreadable or refused
        return None
    return meta if isinstance(meta, dict) else None


def _callback_states(path: str) -> dict[str, Any]:
    """The callbacks' states saved in a checkpoint file (or an FSDP folder's ``meta.pt``), read with
    ``weights_only`` (plain data and tensors, nothing run); empty when they cannot be read."""
    if os.path.isdir(path):
        checkpoint = read_folder_meta(path)
    else:
        try:
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


# ------------------------------------------------------------------------------- atomic saving
# Temporary files sit beside their target, so the final step is a rename within one filesystem.
_PARTIAL_SUFFIX = ".partial"


def save_atomically(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``checkpoint`` to ``path`` so that ``path`` is always either the old file or the new one.

    The bytes go to a temporary file in the same folder (``.<name>.<random>.partial``), are flushed
    to the disk (``fsync``), then renamed over ``path`` with ``os.replace`` (atomic within one
    filesystem) and the folder is synced, so the rename survives a power cut. A kill at any moment
    leaves the previous checkpoint readable. Lightning's own save writes its temporary file in
    ``TMPDIR``: where that is another filesystem (tmpfs), its "move" is a copy into the final name,
    and a kill during the copy leaves a truncated checkpoint. Temporary files that an earlier, killed
    save left for the same name are removed after a successful save.

    Raises:
        CheckpointError: when the file cannot be written (disk full, no permission, a file in the
            way), naming the file and the cause; the temporary file is removed and the previous
            checkpoint is untouched.
    """
    target = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(target)
    data = io.BytesIO()
    torch.save(checkpoint, data)  # serialized first: an unpicklable object touches no file
    temp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}{_PARTIAL_SUFFIX}")
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode as umask allows, like open()
        try:
            view = data.getbuffer()
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
    except OSError as err:
        if os.path.exists(temp):
            os.remove(temp)
        cause = err.strerror or str(err)
        code = f"{errno.errorcode.get(err.errno, err.errno)}: " if err.errno else ""
        raise CheckpointError(
            f"checkpoint {target} could not be saved ({code}{cause}); the previous {name}, if any, is unchanged. "
            f"Free space or fix the permissions of {folder} (or choose another --checkpoint.dirpath), then run the "
            "same command with --ckpt_path last to resume."
        ) from None
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    _sync_folder(folder)
    for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*{_PARTIAL_SUFFIX}")):
        with contextlib.suppress(OSError):  # gone already: not this save's business
            os.remove(stale)


def _sync_folder(folder: str) -> None:
    """fsync a folder, so that a rename in it reaches the disk (POSIX; some filesystems refuse it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose local saves go through :func:`save_atomically`.

    Every checkpoint saved through the strategy (``ModelCheckpoint``'s last, step and best files,
    ``PreemptionCheckpoint``, ``DivergenceGuard``'s ``divergence.ckpt``, Lightning's
    ``hpc_ckpt_<n>.ckpt`` on SLURM's requeue signal) is then written beside its target and renamed
    into place. Remote paths (``s3://…``) keep Lightning's save. ``lit-accel`` installs it on the
    strategy it builds; elsewhere::

        trainer = Trainer(plugins=[AtomicCheckpointIO()])
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        save_atomically(checkpoint, path)


# ------------------------------------------------------------------------------- resuming from "last"
def check_readable(path: str) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a checkpoint that can be read safely: a file
    that :func:`read_checkpoint` reads, or a distributed-checkpoint folder that
    :func:`verify_distributed_checkpoint` admits."""
    if os.path.isdir(path):
        verify_distributed_checkpoint(path)
    else:
        read_checkpoint(path)


def run_checkpoints(path: str, root: str, hpc_dir: str | None = None, recursive: bool = True) -> list[str]:
    """The other checkpoints of the run that wrote ``path`` (one that :func:`find_checkpoint` found
    under ``root``), newest first.

    A run's checkpoints are the ``.ckpt`` files and folders in its ``checkpoints/`` folder
    (``best-*``, step and other files) and the ``hpc_ckpt_<n>.ckpt`` files in ``hpc_dir`` that its
    ModelCheckpoint wrote. For an ``hpc_ckpt_<n>.ckpt`` itself, whose run cannot be read from it,
    they are the experiment's other hpc files and the newest run folder's checkpoints.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if hpc_dir is not None and os.path.abspath(hpc_dir) == folder and fnmatch(os.path.basename(path), _HPC_PATTERN):
        found = hpc_checkpoints(hpc_dir, root if recursive else os.path.join(root, "checkpoints"))
        in_runs = _in_run_folders(root, "*.ckpt", recursive)
        if in_runs:
            newest_run = os.path.dirname(max(in_runs, key=os.path.getmtime))
            found += glob.glob(os.path.join(glob.escape(newest_run), "*.ckpt"))
    else:
        found = glob.glob(os.path.join(glob.escape(folder), "*.ckpt"))
        if hpc_dir is not None:
            found += hpc_checkpoints(hpc_dir, folder)
    others = {os.path.abspath(p) for p in found} - {os.path.abspath(path)}
    return sorted(others, key=os.path.getmtime, reverse=True)


# ------------------------------------------------------------------------------- what a checkpoint may import
TRUSTED_MODULES = ("lit_accel", "torch", "torchvision")
"""Packages whose classes a checkpoint may name without the user naming them too."""

# A string that jsonargparse would take for an import path (a class path, or a callable's path).
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
# Lightning checks this one itself, against its own allow-list (lightning.pytorch.core.saving).
_LIGHTNING_INSTANTIATOR_KEY = "_instantiator"


def import_paths(value: Any, key: str, plain_strings: bool = True) -> Iterator[tuple[str, str]]:
    """Every ``(key, path)`` in nested data whose string an argument parser could import.

    jsonargparse imports ``class_path`` values, at any depth (``init_args`` of ``init_args``,
    lists), and, with ``plain_strings``, a plain dotted string is counted too: given for an argument
    typed as a class or a callable (``net: this.LiteCNN``), it is imported as well.
    """
    if isinstance(value, Mapping):
        for name, item in value.items():
            if name == _LIGHTNING_INSTANTIATOR_KEY:
                continue
            where = f"{key}.{name}" if key else str(name)
            if name in ("class_path", "_class_path") and isinstance(item, str):
                yield where, item
            else:
                yield from import_paths(item, where, plain_strings)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from import_paths(item, f"{key}[{index}]", plain_strings)
    elif plain_strings and isinstance(value, str) and _IMPORT_PATH.fullmatch(value):
        yield key, value


def check_import_paths(checkpoint: Mapping[str, Any], path: str, allowed: Collection[str] = ()) -> None:
    """Refuse a checkpoint whose saved hyperparameters name a class outside what is trusted.

    LightningCLI rebuilds the model from a checkpoint's ``hyper_parameters`` (class paths of the
    network, optimizer, scheduler, …), and ``ImageClassifier.load_from_checkpoint`` does too; each
    named module is imported, which runs its import-time code. Call this first: every import path
    in ``hyper_parameters`` (class paths and dotted strings, see :func:`import_paths`) and every
    class path in ``datamodule_hyper_parameters`` must lie in a package of :data:`TRUSTED_MODULES`
    or be one that the user's own config or command line names (``allowed``).

    Raises:
        CheckpointError: naming the checkpoint, the key and the class; nothing was imported.
    """
    trusted = set(allowed)
    # The data module's settings hold paths ("data.v2/" reads as a dotted name): only its class paths.
    for section, plain_strings in (("hyper_parameters", True), ("datamodule_hyper_parameters", False)):
        for key, name in import_paths(checkpoint.get(section), section, plain_strings):
            if name in trusted or name.split(".")[0] in TRUSTED_MODULES:
                continue
            option = f"--{'model' if section == 'hyper_parameters' else 'data'}.{(key + '.?').split('.')[1]}"
            raise CheckpointError(
                f"checkpoint {path} names {name!r} at {key}: refused, and nothing was imported. A checkpoint may "
                f"name classes of {', '.join(TRUSTED_MODULES)}, or those your config or command line names; if "
                f"you trust this checkpoint and that module, name it yourself (e.g. {option} {name})."
            )
