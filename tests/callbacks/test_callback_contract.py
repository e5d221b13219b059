"""Contract tests over every callback in ``lit_accel.callbacks.__all__``.

Each one must be constructible from YAML the way LightningCLI builds ``trainer.callbacks``
(``class_path`` alone, and its own docstring ``Example::``), pickle (``ddp_spawn`` pickles the
trainer's callbacks), round-trip its state through a checkpoint loaded with
``torch.load(weights_only=True)``, and survive two ``fit`` calls with the same instance, the second
resuming from the first's checkpoint. A new callback added to ``__all__`` is picked up here.
"""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lit_accel.callbacks
from helpers import quiet_cpu_trainer, same_state, through_checkpoint

# Every Callback the package exports (it may also export helpers such as an exception class).
NAMES = sorted(
    name
    for name in lit_accel.callbacks.__all__
    if isinstance(getattr(lit_accel.callbacks, name), type) and issubclass(getattr(lit_accel.callbacks, name), Callback)
)

pytestmark = [
    # Warnings the callbacks give about this deliberately tiny setup (few batches, no val/loss yet...).
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def _cls(name: str) -> type[Callback]:
    return getattr(lit_accel.callbacks, name)


def _parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback], default=[])
    return parser


def _from_yaml(callbacks_yaml: list[dict[str, Any]]) -> list[Callback]:
    parser = _parser()
    config = parser.parse_object({"callbacks": callbacks_yaml})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    return instantiate(config).callbacks


def _docstring_example(cls: type) -> dict[str, Any]:
    doc = cls.__doc__ or ""
    assert "Example::" in doc, f"{cls.__name__} has no Example:: YAML snippet"
    block = doc.split("Example::", 1)[1].split("\n\n", 2)[1]
    return yaml.safe_load(textwrap.dedent(block))


def test_the_package_exports_callbacks() -> None:
    assert len(NAMES) >= 8, NAMES


# ------------------------------------------------------------------------------------ construction


@pytest.mark.parametrize("name", NAMES)
def test_constructible_from_class_path(name: str) -> None:
    (callback,) = _from_yaml([{"class_path": f"lit_accel.callbacks.{name}"}])
    assert type(callback) is _cls(name)


@pytest.mark.parametrize("name", NAMES)
def test_docstring_example_is_valid_yaml_config(name: str) -> None:
    example = _docstring_example(_cls(name))
    entries = [e for e in example["trainer"]["callbacks"] if e["class_path"].endswith(f".{name}")]
    assert len(entries) == 1
    (callback,) = _from_yaml(entries)
    assert type(callback) is _cls(name)
    for key, value in (entries[0].get("init_args") or {}).items():
        if hasattr(callback, key):  # the argument is kept under its own name
            assert getattr(callback, key) == value, key


# ------------------------------------------------------------------------------------ pickle, state


@pytest.mark.parametrize("name", NAMES)
def test_picklable(name: str) -> None:
    callback = _cls(name)()
    clone = pickle.loads(pickle.dumps(callback))
    assert type(clone) is type(callback) and clone.state_key == callback.state_key


# The callbacks that keep nothing in a checkpoint: what they need comes from their arguments. Every
# other callback must have state (a callback whose state_dict() is empty by mistake loses its
# progress on every resume, and {} == {} would pass any round trip). A new callback is stateful
# unless it is added here.
STATELESS = {"HParamsSummary", "PredictionCSVWriter", "PreemptionCheckpoint", "ValidationFigures"}
STATEFUL = [name for name in NAMES if name not in STATELESS]


def test_the_stateless_callbacks_are_exactly_the_listed_ones() -> None:
    assert set(NAMES) >= STATELESS, STATELESS - set(NAMES)
    empty = {name for name in NAMES if _cls(name)().state_dict() == {}}
    assert empty == STATELESS


@pytest.mark.parametrize("name", sorted(STATELESS))
def test_a_stateless_callback_keeps_nothing_and_accepts_an_empty_state(name: str) -> None:
    callback = _cls(name)()
    callback.load_state_dict({})
    assert callback.state_dict() == {}


@pytest.mark.parametrize("name", STATEFUL)
def test_state_round_trip_and_missing_keys(tmp_path: Path, name: str) -> None:
    callback = _cls(name)()
    state = callback.state_dict()
    assert state, f"{name} is stateful: its state_dict() must not be empty"
    other = _cls(name)()
    other.load_state_dict(through_checkpoint(state, tmp_path / "state.ckpt"))
    assert same_state(other.state_dict(), state)
    _cls(name)().load_state_dict({})  # an older checkpoint without any of the keys


def _perturbed(state: Any) -> Any:
    """``state`` with every int and float changed, so a load that restores nothing is caught."""
    if isinstance(state, bool) or state is None or isinstance(state, (str, torch.Tensor)):
        return state
    if isinstance(state, (int, float)):
        return state + 1
    if isinstance(state, dict):
        return {key: _perturbed(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_perturbed(value) for value in state)
    return state


# RNGStateCheckpoint's state_dict() reports the live generators, not stored progress
# (tests/callbacks/test_rng_state.py covers its restore).
PROGRESS_STATES = [name for name in STATEFUL if name != "RNGStateCheckpoint"]


@pytest.mark.parametrize("name", PROGRESS_STATES)
def test_a_fresh_instance_restores_saved_progress(tmp_path: Path, name: str) -> None:
    default = _cls(name)().state_dict()
    saved = _perturbed(default)
    assert not same_state(saved, default), "the perturbed state must differ, or the check proves nothing"
    fresh = _cls(name)()
    fresh.load_state_dict(through_checkpoint(saved, tmp_path / "state.ckpt"))
    assert same_state(fresh.state_dict(), saved)


# ------------------------------------------------------------------------------------ two fits

NUM_CLASSES = 3


class TinyClassifier(pl.LightningModule):
    """(images, labels) batches, logits from validation_step, ``val/loss`` logged: what the
    callbacks expect from an image classifier, at a few hundred parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        return logits

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TinyData(pl.LightningDataModule):
    """A data module with a public ``batch_size`` that its loaders read."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 3, 4, 4, generator=g)
        self.y = torch.randint(0, NUM_CLASSES, (16,), generator=g)

    def _loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


def _trainer(tmp_path: Path, callback: Callback, max_epochs: int) -> pl.Trainer:
    return quiet_cpu_trainer(
        tmp_path,
        [callback],
        max_epochs=max_epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False),
    )


@pytest.mark.parametrize("name", NAMES)
def test_survives_two_fits_and_a_resume(tmp_path: Path, name: str) -> None:
    callback = _cls(name)()
    first = _trainer(tmp_path, callback, max_epochs=1)
    first.fit(TinyClassifier(), datamodule=TinyData())
    first.save_checkpoint(tmp_path / "first.ckpt")
    checkpoint = torch.load(tmp_path / "first.ckpt", weights_only=True)
    if name in STATELESS:
        assert callback.state_key not in checkpoint["callbacks"]  # Lightning stores no empty state
    else:
        saved = checkpoint["callbacks"][callback.state_key]
        assert saved and same_state(saved, callback.state_dict())
        if name in PROGRESS_STATES:  # a fresh instance restores the state after a real fit exactly
            fresh = _cls(name)()
            fresh.load_state_dict(saved)
            assert same_state(fresh.state_dict(), saved)

    # The same instance again, resuming the first fit's checkpoint through Lightning's own loading.
    second = _trainer(tmp_path, callback, max_epochs=2)
    second.fit(TinyClassifier(), datamodule=TinyData(), ckpt_path=tmp_path / "first.ckpt")
    assert second.global_step == 4
    pickle.loads(pickle.dumps(callback))  # still picklable after use
