"""The few distributed helpers the engines need (torch only)."""

from __future__ import annotations

from itertools import chain

import torch
from torch import Tensor

__all__ = ["all_sum", "local_tensor", "shard_groups", "squared_norm_share", "total_norm"]


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2, tensor parallel), the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


# ---------------------------------------------------------------- DivergenceGuard's norms and sums


def all_sum(vec: Tensor) -> Tensor:
    """Sum ``vec`` over the ranks in place with one collective; no-op without a process group.

    One collective, no barrier (Lightning's ``strategy.reduce`` adds one before every all-reduce,
    which would double the collectives and sync the host on NCCL every step).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(vec, op=torch.distributed.ReduceOp.SUM)
    return vec


def shard_groups(module: torch.nn.Module, world: int, params_sharded: bool = False) -> list[tuple[float, list[Tensor]]]:
    """Parameters and buffers grouped by how many distinct shards of each exist across ``world`` ranks.

    A replicated tensor (DDP, buffers) has 1 shard, an FSDP2 DTensor as many as its mesh shards
    it; ``params_sharded``: every plain parameter is one of ``world`` shards (FSDP1's flat
    parameters). :func:`squared_norm_share` weighs each group by this.
    """
    groups: dict[int, list[Tensor]] = {}
    plain = world if params_sharded else 1
    tagged = chain(((p, plain) for p in module.parameters()), ((b, 1) for b in module.buffers()))
    for tensor, shards in tagged:
        if hasattr(tensor, "placements") and hasattr(tensor, "device_mesh"):
            shards = 1
            for dim, placement in enumerate(tensor.placements):
                if placement.is_shard():
                    shards *= tensor.device_mesh.size(dim)
        groups.setdefault(shards, []).append(tensor)
    return [(float(shards), tensors) for shards, tensors in groups.items()]


def total_norm(tensors: list[Tensor]) -> Tensor:
    """The 2-norm of all ``tensors`` together, non-finite values kept (not an error)."""
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: grouped foreach norms
        return torch.nn.utils.get_total_norm(tensors, 2.0, error_if_nonfinite=False)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t).float() for t in tensors]))


def squared_norm_share(
    groups: list[tuple[float, list[Tensor]]], world: int, device: torch.device, *, grads: bool
) -> Tensor:
    """This rank's share of the global squared norm of the parameters (or of their gradients).

    Each rank adds ``local_norm² · shards / world``, so the sum over ranks (:func:`all_sum`) counts
    every element once.
    """
    total = torch.zeros((), device=device)
    for shards, tensors in groups:
        if grads:
            local = [local_tensor(t.grad) for t in tensors if t.grad is not None]
        else:
            local = [local_tensor(t) for t in tensors if t.is_floating_point()]
        if local:
            total = total + total_norm(local).float().to(device).square() * (shards / max(world, 1))
    return total
