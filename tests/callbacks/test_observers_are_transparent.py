"""Observer callbacks leave training bit-identical on a CPU (issue #17, item 1).

A callback that only measures or writes (throughput, figures, hyperparameters, predictions,
checkpoints, RNG states) must not change what is trained. Each case fits the same seeded run as a
reference fit without callbacks, with only that callback added, and compares every tensor of the
final ``state_dict`` exactly. The run is built so that any side effect shows: augmentation (random
crop and flip, drawn on the device from torch's global generator), dropout and AdamW make one
extra draw from a global generator change the weights, and BatchNorm's running statistics change
if a callback runs the model in training mode outside the real steps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

import lit_accel.core.throughput as core_throughput
from helpers import CONFIGS, quiet_cpu_trainer
from lit_accel import CIFAR10DataModule, ImageClassifier, LiteCNN
from lit_accel.callbacks import (
    DivergenceGuard,
    HParamsSummary,
    PredictionCSVWriter,
    RNGStateCheckpoint,
    ThroughputMeter,
    ValidationFigures,
)
from lit_accel.checkpoints import LastAfterEveryValidation

pytestmark = [
    # Warnings about this deliberately tiny run (few batches, a small validation set...).
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

SEED = 7
# 500 training images in 16 batches of 32 (the last one 20) per epoch, 2 epochs: 32 optimizer steps.
TRAIN_SETTINGS: dict[str, Any] = dict(
    max_epochs=2,
    val_check_interval=0.5,  # 4 validations during fit, plus the sanity check
    log_every_n_steps=5,  # loggers write (and ThroughputMeter logs) several times per epoch
)

# (tmp folder) -> (callbacks to add, Trainer settings they need)
Case = Callable[[Path], tuple[list[Callback], dict[str, Any]]]


def _fit(root: Path, callbacks: list[Callback], **overrides: Any) -> dict[str, torch.Tensor]:
    """Final ``state_dict`` of a seeded 2-epoch fit of a small CNN on synthetic CIFAR-10.

    Every fit writes TensorBoard logs, so the logger itself is part of the reference, not of the
    callback under test.
    """
    L.seed_everything(SEED, workers=True)
    model = ImageClassifier(LiteCNN(width=4))  # dropout 0.2 before the last layer: active in training
    data = CIFAR10DataModule(
        synthetic=True,
        synthetic_size=600,
        val_size=100,
        batch_size=32,
        augment=True,  # random crop and flip, drawn from the global generator (preload pipeline)
        random_crop=True,
        horizontal_flip=True,
    )
    logger = TensorBoardLogger(root, name="runs", default_hp_metric=False)
    settings = {**TRAIN_SETTINGS, "logger": logger, **overrides}
    quiet_cpu_trainer(root, callbacks, **settings).fit(model, datamodule=data)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return _fit(tmp_path_factory.mktemp("reference"), [])


@pytest.fixture(autouse=True)
def cold_cpu_peak_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """ThroughputMeter benchmarks the CPU matmul peak once per process; an earlier test may have
    filled that cache. Empty, the benchmark runs inside the fit, as in a user's first run."""
    monkeypatch.setattr(core_throughput, "CPU_PEAK_CACHE", {})


def _nothing(root: Path) -> tuple[list[Callback], dict[str, Any]]:
    return [], {}


def _throughput_meter(root: Path) -> tuple[list[Callback], dict[str, Any]]:
    # default arguments: FLOPs counted on the first real batch, CPU peak measured, MFU logged
    return [ThroughputMeter(warmup_steps=1)], {}


def _divergence_guard(root: Path) -> tuple[list[Callback], dict[str, Any]]:
    # Not an observer, but on a healthy run it must take no action: the recipe's settings, a
    # snapshot every 5 steps (the run has 38), drift and early-spike detection on.
    recipe = yaml.safe_load((CONFIGS / "cifar10.yaml").read_text())["trainer"]["callbacks"]
    (entry,) = [c for c in recipe if c["class_path"].endswith("DivergenceGuard")]
    return [DivergenceGuard(**{**entry["init_args"], "snapshot_every": 5})], {}


def _validation_figures(root: Path) -> tuple[list[Callback], dict[str, Any]]:
    return [ValidationFigures(every_n_epochs=1, confusion_matrix=True, misclassified=8)], {}


def _hparams_summary(root: Path) -> tuple[list[Callback], dict[str, Any]]:
    return [HParamsSummary()], {}


def _prediction_writer(root: Path) -> tuple[list[Callback], dict[str, Any]]:
    # writes only in `predict`; during fit it must at least not disturb anything
    return [PredictionCSVWriter(output_path=str(root / "predictions.csv"))], {}


def _checkpoint(root: Path) -> tuple[list[Callback], dict[str, Any]]:
    # as lit_accel.cli configures `checkpoint`
    callback = LastAfterEveryValidation(
        dirpath=root / "checkpoints",
        monitor="val/acc",
        mode="max",
        save_top_k=1,
        save_last=True,
        filename="best-epoch{epoch:03d}-acc{val/acc:.4f}",
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    return [callback], {"enable_checkpointing": True}


def _step_checkpoint(root: Path) -> tuple[list[Callback], dict[str, Any]]:
    # as lit_accel.cli configures `step_checkpoint`, writing every 5 of the run's 32 steps
    callback = ModelCheckpoint(
        dirpath=root / "checkpoints",
        every_n_train_steps=5,
        save_top_k=0,
        save_last=True,
        monitor=None,
        enable_version_counter=False,
    )
    return [callback], {"enable_checkpointing": True}


def _rng_state(root: Path) -> tuple[list[Callback], dict[str, Any]]:
    return [RNGStateCheckpoint()], {}


def _rng_state_in_step_checkpoints(root: Path) -> tuple[list[Callback], dict[str, Any]]:
    # RNGStateCheckpoint reads the generators only when a checkpoint is written
    (step_checkpoint,), settings = _step_checkpoint(root)
    return [RNGStateCheckpoint(), step_checkpoint], settings


CASES = [
    pytest.param(_nothing, id="no-callback-control"),
    pytest.param(_throughput_meter, id="ThroughputMeter"),
    pytest.param(_divergence_guard, id="DivergenceGuard-on-a-healthy-run"),
    pytest.param(_validation_figures, id="ValidationFigures"),
    pytest.param(_hparams_summary, id="HParamsSummary"),
    pytest.param(_prediction_writer, id="PredictionCSVWriter"),
    pytest.param(_checkpoint, id="LastAfterEveryValidation"),
    pytest.param(_step_checkpoint, id="ModelCheckpoint-every-n-train-steps"),
    pytest.param(_rng_state, id="RNGStateCheckpoint"),
    pytest.param(_rng_state_in_step_checkpoints, id="RNGStateCheckpoint+step-checkpoint"),
]


@pytest.mark.parametrize("case", CASES)
def test_observer_leaves_training_bit_identical(tmp_path: Path, reference: dict[str, torch.Tensor], case: Case) -> None:
    callbacks, settings = case(tmp_path)
    state = _fit(tmp_path, callbacks, **settings)
    assert state.keys() == reference.keys()
    changed = [name for name in reference if not torch.equal(state[name], reference[name])]
    assert not changed, f"{len(changed)} of {len(reference)} tensors differ from the fit without callbacks: {changed}"
