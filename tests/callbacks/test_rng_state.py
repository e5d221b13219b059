"""Tests for RNGStateCheckpoint: state round trips, then an exact mid-epoch resume with a real Trainer."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from helpers import quiet_cpu_trainer, through_checkpoint
from lit_accel.callbacks.rng_state import RNGStateCheckpoint

pytestmark = [
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended"),
]


def _draw() -> tuple[list[float], float, list[float], float]:
    """A few numbers from each generator the callback covers (numpy's Gaussian cache included)."""
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist(), float(np.random.standard_normal())


def _scramble() -> None:
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)


@pytest.mark.parametrize("gauss_cached", [False, True])
def test_state_round_trip_through_weights_only_load(tmp_path: Path, gauss_cached: bool) -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    if gauss_cached:
        np.random.standard_normal()  # numpy draws Gaussians in pairs and caches the second
        assert np.random.get_state()[3] == 1
    saved = RNGStateCheckpoint().state_dict()
    expected = _draw()

    _scramble()
    assert _draw() != expected
    callback = RNGStateCheckpoint()
    callback.load_state_dict(through_checkpoint(saved, tmp_path / "state.ckpt"))
    assert _draw() != expected  # nothing is applied before training starts
    callback.on_train_start(None, None)  # type: ignore[arg-type]  # the hook uses neither
    assert _draw() == expected
    callback.on_train_start(None, None)  # type: ignore[arg-type]  # applied once only
    assert _draw() != expected


def test_missing_states_load_the_others(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = {"torch": RNGStateCheckpoint().state_dict()["torch"]}  # e.g. written without numpy
    expected = torch.rand(3)
    _scramble()
    callback = RNGStateCheckpoint()
    callback.load_state_dict(through_checkpoint(saved, tmp_path / "state.ckpt"))
    callback.on_train_start(None, None)  # type: ignore[arg-type]
    assert torch.equal(torch.rand(3), expected)


def test_a_state_loaded_without_training_is_dropped_at_teardown() -> None:
    torch.manual_seed(0)
    callback = RNGStateCheckpoint()
    callback.load_state_dict(callback.state_dict())
    callback.teardown(None, None, "validate")  # type: ignore[arg-type]
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    callback.on_train_start(None, None)  # type: ignore[arg-type]
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------------------ Trainer

BATCHES_PER_EPOCH = 8


class Noisy(pl.LightningModule):
    """Training draws from torch (dropout), Python's ``random`` and NumPy at every step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        jitter = (1.0 + 0.1 * random.random()) * (1.0 + 0.1 * float(np.random.rand()))
        return F.mse_loss(self.net(x + 0.1 * torch.randn_like(x)), y) * jitter

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        # Every batch holds the same samples, so restarting the epoch's DataLoader on resume changes
        # nothing; its own generator keeps it from drawing from the global one at each epoch start.
        x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)).repeat(BATCHES_PER_EPOCH, 1)
        data = TensorDataset(x, x.sum(dim=1, keepdim=True))
        return DataLoader(data, batch_size=4, generator=torch.Generator().manual_seed(0))


def _trainer(tmp_path: Path, callbacks: list[Callback], max_steps: int) -> pl.Trainer:
    return quiet_cpu_trainer(tmp_path, callbacks, max_steps=max_steps)


def _weights(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _resumed_weights(tmp_path: Path, with_callback: bool) -> list[torch.Tensor]:
    _scramble()
    first = Noisy()
    callbacks: list[Callback] = [RNGStateCheckpoint()] if with_callback else []
    trainer = _trainer(tmp_path, callbacks, max_steps=3)  # stops mid-epoch
    trainer.fit(first)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    _scramble()  # a new process would start from other states
    resumed = Noisy()
    callbacks = [RNGStateCheckpoint()] if with_callback else []
    _trainer(tmp_path, callbacks, max_steps=6).fit(resumed, ckpt_path=tmp_path / "mid.ckpt")
    return _weights(resumed)


def test_resumed_run_trains_exactly_like_the_uninterrupted_run(tmp_path: Path) -> None:
    _scramble()
    full = Noisy()
    _trainer(tmp_path, [RNGStateCheckpoint()], max_steps=6).fit(full)
    for got, want in zip(_resumed_weights(tmp_path / "with", True), _weights(full)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Without the callback the resumed steps draw other noise (the test can tell the difference).
    without = _resumed_weights(tmp_path / "without", False)
    assert not all(torch.equal(a, b) for a, b in zip(without, _weights(full)))


def test_works_on_lightning_boring_model(tmp_path: Path) -> None:
    callback = RNGStateCheckpoint()
    trainer = _trainer(tmp_path, [callback], max_steps=2)
    trainer.fit(BoringModel(), datamodule=BoringDataModule())
    trainer.save_checkpoint(tmp_path / "boring.ckpt")
    state = torch.load(tmp_path / "boring.ckpt", weights_only=True)["callbacks"][callback.state_key]
    assert {"python", "torch", "numpy"} <= set(state)
