"""FSDP2 through Lightning's ModelParallelStrategy, with data parallelism over every process."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override

__all__ = ["FSDP2Strategy", "remove_path", "swap_into_place"]


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for pure data parallelism: all processes shard one model (FSDP2).

    Lightning's ``"auto"`` sizes make the data-parallel group one process per *node* and give the
    rest to tensor parallelism; for a model sharded only with ``fully_shard`` (as
    ``ImageClassifier.configure_model`` does) the data-parallel group must be every process.
    Here ``data_parallel_size="auto"`` means ``num_nodes × devices`` and tensor parallelism is off.
    Works with the NCCL (GPU) and gloo (CPU) backends.

    A distributed (folder) checkpoint is written whole into a staging folder beside its target
    (``.<name>.partial``) and then swapped in with two renames, so a process killed mid-save leaves
    the previous folder as it was (Lightning writes the shards into the target folder itself).

    Args:
        data_parallel_size: processes that shard the model; ``"auto"``: all of them.
        **kwargs: passed on to ``ModelParallelStrategy`` (e.g. ``save_distributed_checkpoint``,
            ``process_group_backend``, ``timeout``).

    Example::

        trainer:
          strategy:
            class_path: lit_accel.strategies.FSDP2Strategy
    """

    def __init__(self, data_parallel_size: Literal["auto"] | int = "auto", **kwargs: Any) -> None:
        if data_parallel_size != "auto" and (not isinstance(data_parallel_size, int) or data_parallel_size < 1):
            raise ValueError(f"data_parallel_size={data_parallel_size!r} is not allowed: use 'auto' or a positive int")
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1, **kwargs)

    @override
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint or storage_options is not None or "://" in str(filepath):
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        target = Path(self.broadcast(filepath))
        staging = target.with_name(f".{target.name}.partial")
        if self.global_rank == 0:
            remove_path(staging)  # what a killed save left
        self.barrier("lit_accel_checkpoint_staging")
        super().save_checkpoint(checkpoint, staging)
        self.barrier("lit_accel_checkpoint_written")
        if self.global_rank == 0:
            swap_into_place(staging, target)
        self.barrier("lit_accel_checkpoint_swapped")


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree; nothing if it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def swap_into_place(staging: Path, target: Path) -> None:
    """Put the finished ``staging`` folder at ``target``: the old target is renamed aside first and
    removed last, so at every moment one complete checkpoint exists under one of the two names."""
    aside = target.with_name(f".{target.name}.old")
    remove_path(aside)
    if target.exists() or target.is_symlink():
        os.replace(target, aside)
    os.replace(staging, target)
    folder = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    remove_path(aside)
