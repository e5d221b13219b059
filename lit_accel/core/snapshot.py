"""Host-memory copies of a model's weights and its optimizer's state, restored in place.

One implementation for DivergenceGuard (rollback snapshots: weights, optimizer and scheduler state)
and GeneralizationMonitor (the best weights), usable in any PyTorch loop. FSDP-aware: a DTensor
(FSDP2, tensor parallel) is copied as this rank's local shard and restored into it, so every rank
keeps and restores its own shards. Imports torch and the standard library only.

Example::

    snapshot = Snapshot.take(model, optimizer, [scheduler], step=0)
    ...  # training goes wrong
    snapshot.restore(model, optimizer, [scheduler])
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from lit_accel.core.dist import local_tensor

__all__ = ["HostTensor", "Snapshot", "host_weights", "load_weights", "named_state", "to_host"]


def named_state(module: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Parameters, then buffers, by name: no gathering under FSDP (unlike ``state_dict()``)."""
    return chain(module.named_parameters(), module.named_buffers())


def to_host(tensor: Tensor, buffer: Tensor | None = None, *, asynchronous: bool = False) -> Tensor:
    """A CPU copy of ``tensor``'s local shard, written into ``buffer`` when it fits (else a new one).

    ``asynchronous``: a pinned buffer and a non-blocking copy from a GPU, which keeps the copy off
    the host's critical path; the caller must synchronize the device before reading the buffer.
    """
    src = local_tensor(tensor).detach()
    if buffer is None or buffer.shape != src.shape or buffer.dtype != src.dtype:
        buffer = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=asynchronous and src.is_cuda)
    buffer.copy_(src, non_blocking=asynchronous and src.is_cuda)
    return buffer


@torch.no_grad()
def host_weights(
    module: torch.nn.Module, reuse: Mapping[str, Tensor] | None = None, *, asynchronous: bool = False
) -> dict[str, Tensor]:
    """Host copies of the module's parameters and buffers by name (this rank's shards).

    ``reuse``: an earlier copy whose buffers are overwritten; leave it out when a checkpoint being
    written (possibly asynchronously) may still hold that copy.
    """
    old = reuse or {}
    return {name: to_host(t, old.get(name), asynchronous=asynchronous) for name, t in named_state(module)}


@torch.no_grad()
def load_weights(module: torch.nn.Module, weights: Mapping[str, Tensor]) -> str:
    """Copy ``weights`` into the module in place; returns what does not fit ('' when all did; nothing
    is copied then)."""
    live = {name: local_tensor(t) for name, t in named_state(module)}
    missing, unexpected = sorted(live.keys() - weights.keys()), sorted(weights.keys() - live.keys())
    if missing or unexpected:
        return f"names differ (missing {missing[:5]}, unexpected {unexpected[:5]})"
    wrong = [n for n, t in live.items() if t.shape != weights[n].shape]
    if wrong:
        return f"shapes differ for {wrong[:5]} (a checkpoint from another model or strategy?)"
    for name, tensor in live.items():
        tensor.copy_(weights[name])
    return ""


@dataclass
class HostTensor:
    """A host copy of one optimizer-state tensor, with what it takes to rebuild it if it is gone."""

    data: Tensor
    device: torch.device
    dtensor: tuple[Any, ...] | None  # a DTensor's class, device mesh, placements, global shape and stride

    @classmethod
    def of(cls, tensor: Tensor, old: Any = None) -> HostTensor:
        buffer = old.data if isinstance(old, HostTensor) else None
        spec = None
        if hasattr(tensor, "device_mesh") and hasattr(tensor, "placements"):  # a DTensor
            spec = (type(tensor), tensor.device_mesh, tensor.placements, tensor.shape, tensor.stride())
        return cls(to_host(tensor, buffer, asynchronous=True), local_tensor(tensor).device, spec)

    def restore_into(self, live: Tensor | None) -> Tensor:
        if live is not None and local_tensor(live).shape == self.data.shape:
            local_tensor(live).copy_(self.data)
            return live
        local = self.data.to(self.device, copy=True)
        if self.dtensor is not None:
            # The global shape and stride given: an uneven shard (3 rows over 2 ranks) cannot be inferred.
            kind, mesh, placements, shape, stride = self.dtensor
            return kind.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)
        return local


@dataclass
class Snapshot:
    """A host copy of a model's weights, its optimizer's state and param groups and its schedulers'
    states, taken at optimizer step ``step`` and restored in place.

    Copies from a GPU are asynchronous (pinned buffers): synchronize the device (any host read of a
    device value does) before :meth:`restore` reads them.
    """

    step: int
    weights: dict[str, Tensor] = field(default_factory=dict)
    optimizer_state: dict[int, dict[str, Any]] = field(default_factory=dict)
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    schedulers: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    @torch.no_grad()
    def take(
        cls,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        schedulers: Sequence[Any] = (),
        step: int = 0,
        reuse: Snapshot | None = None,
    ) -> Snapshot:
        """Copy the state now; ``reuse``: an older snapshot whose host buffers are overwritten."""
        snap = cls(step, host_weights(module, reuse.weights if reuse else None, asynchronous=True))
        if optimizer is not None:
            old_state = reuse.optimizer_state if reuse is not None else {}
            for index, param in enumerate(_optimizer_params(optimizer)):
                state = optimizer.state.get(param)
                if state:
                    old = old_state.get(index, {})
                    snap.optimizer_state[index] = {
                        k: HostTensor.of(v, old.get(k)) if isinstance(v, Tensor) else copy.deepcopy(v)
                        for k, v in state.items()
                    }
            snap.retake_learning_rates(optimizer, schedulers)
        return snap

    def retake_learning_rates(self, optimizer: torch.optim.Optimizer, schedulers: Sequence[Any] = ()) -> None:
        """Copy the param groups (all entries but ``params``) and the scheduler states again."""
        self.param_groups = [
            {k: copy.deepcopy(v) for k, v in group.items() if k != "params"} for group in optimizer.param_groups
        ]
        self.schedulers = [copy.deepcopy(s.state_dict()) for s in schedulers]

    @torch.no_grad()
    def restore(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, schedulers: Sequence[Any] = ()
    ) -> None:
        """Put the copied state back in place (the same module, optimizer and schedulers).

        Param groups come back exactly: an entry added after the snapshot is removed, so what
        another component stores there (DynamicBatchLR's ``dynamic_lr_scale``) matches the
        restored learning rates.

        Raises:
            ValueError: the module's parameters and buffers are not those the snapshot was taken of.
        """
        problem = load_weights(module, self.weights)
        if problem:
            raise ValueError(f"this snapshot is of another module: {problem}")
        if optimizer is None:
            return
        for index, param in enumerate(_optimizer_params(optimizer)):
            saved = self.optimizer_state.get(index)
            if saved is None:
                optimizer.state.pop(param, None)
                continue
            live = optimizer.state[param]
            for key in [k for k in live if k not in saved]:
                del live[key]
            for key, value in saved.items():
                live[key] = value.restore_into(live.get(key)) if isinstance(value, HostTensor) else copy.deepcopy(value)
        for group, saved_group in zip(optimizer.param_groups, self.param_groups):
            for key in [k for k in group if k != "params" and k not in saved_group]:
                del group[key]
            for key, value in saved_group.items():
                if isinstance(group.get(key), Tensor) and isinstance(value, Tensor):
                    group[key].copy_(value)
                else:
                    group[key] = copy.deepcopy(value)
        for scheduler, state in zip(schedulers, self.schedulers):
            scheduler.load_state_dict(copy.deepcopy(state))


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]
