"""Snapshots and host copies of weights: taken, overwritten in place, restored exactly (no Trainer)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import same_state
from lit_accel.core.snapshot import Snapshot, host_weights, load_weights


def _setup() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return model, optimizer, scheduler


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    model(torch.randn(8, 4)).square().mean().backward()  # a training forward: BatchNorm's buffers move too
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    return copy.deepcopy({"model": model.state_dict(), "opt": optimizer.state_dict(), "sched": scheduler.state_dict()})


def test_restore_puts_weights_buffers_optimizer_and_scheduler_state_back_exactly() -> None:
    model, optimizer, scheduler = _setup()
    _step(model, optimizer, scheduler)
    saved = _state(model, optimizer, scheduler)
    snapshot = Snapshot.take(model, optimizer, [scheduler], step=1)
    for _ in range(2):
        _step(model, optimizer, scheduler)
    optimizer.param_groups[0]["added_later"] = 1.0  # e.g. another callback's entry
    assert not same_state(_state(model, optimizer, scheduler), saved)
    snapshot.restore(model, optimizer, [scheduler])
    assert same_state(_state(model, optimizer, scheduler), saved)
    assert "added_later" not in optimizer.param_groups[0], "param groups come back exactly"


def test_optimizer_state_that_was_absent_or_is_gone_comes_back_as_it_was() -> None:
    model, optimizer, scheduler = _setup()
    fresh = Snapshot.take(model, optimizer, [scheduler])  # no optimizer state yet
    _step(model, optimizer, scheduler)
    snapshot = Snapshot.take(model, optimizer, [scheduler], step=1)
    saved = _state(model, optimizer, scheduler)
    optimizer.state.clear()  # e.g. a reset optimizer: the tensors are rebuilt from the host copies
    snapshot.restore(model, optimizer, [scheduler])
    assert same_state(_state(model, optimizer, scheduler), saved)
    fresh.restore(model, optimizer, [scheduler])
    assert not optimizer.state


def test_reuse_overwrites_the_older_snapshots_buffers() -> None:
    model, optimizer, scheduler = _setup()
    _step(model, optimizer, scheduler)
    first = Snapshot.take(model, optimizer, [scheduler])
    buffers = [t.data_ptr() for t in first.weights.values()]
    moments = [v.data.data_ptr() for s in first.optimizer_state.values() for v in s.values() if hasattr(v, "data")]
    _step(model, optimizer, scheduler)
    second = Snapshot.take(model, optimizer, [scheduler], step=2, reuse=first)
    assert [t.data_ptr() for t in second.weights.values()] == buffers
    assert [v.data.data_ptr() for s in second.optimizer_state.values() for v in s.values() if hasattr(v, "data")] == (
        moments
    )
    assert same_state(second.weights, {k: v.detach() for k, v in model.state_dict().items() if k in second.weights})


def test_host_weights_are_fresh_copies_and_load_weights_refuses_what_does_not_fit() -> None:
    model, optimizer, scheduler = _setup()
    copy_ = host_weights(model)
    assert set(copy_) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                          "1.num_batches_tracked"}  # fmt: skip
    before = copy.deepcopy(copy_)
    _step(model, optimizer, scheduler)
    assert same_state(copy_, before), "a copy does not follow the module"
    assert host_weights(model)["0.weight"] is not copy_["0.weight"]
    assert load_weights(model, copy_) == "" and same_state(host_weights(model), before)
    other = nn.Linear(4, 2)
    assert load_weights(other, {**host_weights(other), "extra": torch.zeros(1)}).startswith("names differ")
    wrong = {**host_weights(other), "weight": torch.zeros(3, 4)}
    kept = host_weights(other)
    assert load_weights(other, wrong).startswith("shapes differ for ['weight']")
    assert same_state(host_weights(other), kept), "nothing is copied when something does not fit"
    with pytest.raises(ValueError, match="another module"):
        Snapshot.take(other).restore(model)


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    """A one-process gloo group, for DTensors without launching processes."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_sharded_parameter_is_copied_and_restored_as_this_ranks_shard(one_rank_group: None) -> None:
    """Each rank keeps its own shards (FSDP2): a DTensor whose global shape is 4x3 and whose local
    shard (this rank's) is 2x3 is copied as the 2x3 shard, and restored into it in place."""
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    model = nn.Linear(3, 4)
    local = torch.arange(6.0).reshape(2, 3)
    sharded = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=(4, 3), stride=(3, 1))
    model.weight = nn.Parameter(sharded)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.state[model.weight]["momentum_buffer"] = DTensor.from_local(
        torch.ones(2, 3), mesh, [Shard(0)], run_check=False, shape=(4, 3), stride=(3, 1)
    )
    snapshot = Snapshot.take(model, optimizer)
    assert snapshot.weights["weight"].shape == (2, 3) and snapshot.weights["weight"].device.type == "cpu"
    with torch.no_grad():
        model.weight.to_local().fill_(7.0)
    optimizer.state.clear()
    snapshot.restore(model, optimizer)
    assert torch.equal(model.weight.to_local(), torch.arange(6.0).reshape(2, 3))
    momentum = optimizer.state[model.weight]["momentum_buffer"]
    assert (
        isinstance(momentum, DTensor)
        and momentum.shape == (4, 3)
        and torch.equal(momentum.to_local(), torch.ones(2, 3))
    )
    assert same_state(host_weights(model)["weight"], local)
