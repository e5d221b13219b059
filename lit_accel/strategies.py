"""FSDP2 through Lightning's ModelParallelStrategy, with data parallelism over every process."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override

__all__ = ["FSDP2Strategy"]


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for pure data parallelism: all processes shard one model (FSDP2).

    Lightning's ``"auto"`` sizes make the data-parallel group one process per *node* and give the
    rest to tensor parallelism; for a model sharded only with ``fully_shard`` (as
    ``ImageClassifier.configure_model`` does) the data-parallel group must be every process.
    Here ``data_parallel_size="auto"`` means ``num_nodes × devices`` and tensor parallelism is off.
    Works with the NCCL (GPU) and gloo (CPU) backends.

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
