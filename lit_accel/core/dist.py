"""The few distributed helpers the engines need (torch only)."""

from __future__ import annotations

from torch import Tensor

__all__ = ["local_tensor"]


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2, tensor parallel), the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
