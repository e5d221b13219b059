"""Tests for GeneralizationMonitor: pure decisions, then real Trainer runs on a module whose
validation and training metrics are scripted per epoch while SGD moves its weights."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from helpers import (
    CONFIGS,
    MemoryLogger,
    quiet_cpu_trainer,
    same_state,
    through_checkpoint,
)
from lit_accel.callbacks import GeneralizationMonitor
from lit_accel.callbacks.generalization_monitor import (
    epoch_gaps,
    gap_streak,
    improved,
    stop_decision,
    training_ends_after_epoch,
)

pytestmark = [
    # Lightning's advice for this deliberately tiny setup (few batches, workers, sync_dist on one rank...).
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]

# ---------------------------------------------------------------------- pure decisions


@pytest.mark.parametrize(
    ("score", "best", "mode", "min_delta", "expected"),
    [
        (0.5, None, "max", 0.0, True),  # the first validation is the best so far
        (0.6, 0.5, "max", 0.0, True),
        (0.5, 0.5, "max", 0.0, False),  # a tie is no improvement
        (0.6, 0.5, "max", 0.1, False),  # 0.6 - 0.1 is not above 0.5
        (0.7, 0.5, "max", 0.1, True),
        (0.4, 0.5, "min", 0.0, True),
        (0.5, 0.5, "min", 0.0, False),
        (0.45, 0.5, "min", 0.1, False),
        (float("nan"), None, "max", 0.0, False),  # NaN never improves, not even the first time
        (float("nan"), 0.5, "min", 0.0, False),
    ],
)
def test_improved(score: float, best: float | None, mode: str, min_delta: float, expected: bool) -> None:
    assert improved(score, best, mode, min_delta) is expected


def test_gaps_and_streak() -> None:
    keys = ("tl", "vl", "ta", "va")
    assert epoch_gaps({"tl": 0.25, "vl": 1.0, "ta": 0.75, "va": 0.5}, *keys) == {"gap/loss": 0.75, "gap/acc": 0.25}
    assert epoch_gaps({"tl": 0.25, "vl": 1.0, "ta": 0.75}, *keys) == {"gap/loss": 0.75}  # no val acc: no gap/acc
    assert epoch_gaps({"vl": 1.0, "va": 0.5}, *keys) == {}
    assert gap_streak(0.6, 0.5, 1) == 2
    assert gap_streak(0.5, 0.5, 3) == 0  # at the limit is not above it
    assert gap_streak(None, 0.5, 3) == 0  # an epoch without the gap ends a streak


def test_stop_decision() -> None:
    common = {"monitor": "val/acc", "best_score": 0.9, "best_epoch": 1, "gap": 0.7, "max_gap": 0.5, "gap_patience": 2}
    assert stop_decision(wait_count=1, patience=2, gap_count=1, **common) == (False, "")
    stop, reason = stop_decision(wait_count=2, patience=2, gap_count=0, **common)
    assert stop and reason.startswith("val/acc did not improve at the last 2 validations") and "epoch 1" in reason
    stop, reason = stop_decision(wait_count=0, patience=2, gap_count=2, **common)
    assert stop and reason.startswith("gap/loss=0.7 was above max_gap=0.5 at the last 2 validated epochs")
    assert stop_decision(wait_count=99, patience=None, gap_count=0, **common) == (False, "")
    assert stop_decision(wait_count=0, patience=None, gap_count=99, **{**common, "max_gap": None}) == (False, "")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"epoch": 2, "global_step": 30, "should_stop": False}, False),
        ({"epoch": 3, "global_step": 40, "should_stop": False}, True),  # max_epochs=4
        ({"epoch": 1, "global_step": 20, "should_stop": True}, True),
        ({"epoch": 1, "global_step": 20, "should_stop": True, "min_epochs": 3}, False),  # Lightning trains on
        ({"epoch": 2, "global_step": 30, "should_stop": True, "min_epochs": 3}, True),
        ({"epoch": 1, "global_step": 20, "should_stop": True, "min_steps": 25}, False),
        ({"epoch": 1, "global_step": 25, "should_stop": False, "max_steps": 25}, True),
        ({"epoch": 5, "global_step": 60, "should_stop": False, "max_epochs": -1}, False),  # -1: no limit
        ({"epoch": 5, "global_step": 60, "should_stop": False, "max_epochs": None}, False),
    ],
)
def test_training_ends_after_epoch(kwargs: dict[str, Any], expected: bool) -> None:
    limits = {"max_epochs": 4, "max_steps": -1, "min_epochs": None, "min_steps": None}
    assert training_ends_after_epoch(**{**limits, **kwargs}) is expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patience": 0}, "patience=0"),
        ({"patience": 1.5}, "patience=1.5"),
        ({"patience": True}, "patience=True"),
        ({"min_delta": -0.1}, "min_delta=-0.1"),
        ({"min_delta": float("nan")}, "min_delta=nan"),
        ({"min_delta": float("inf")}, "min_delta=inf"),
        ({"min_delta": False}, "min_delta=False"),
        ({"min_delta": "0.1"}, "min_delta='0.1'"),
        ({"max_gap": 0.0}, "max_gap=0.0"),
        ({"max_gap": -1}, "max_gap=-1"),
        ({"max_gap": float("inf")}, "max_gap=inf"),
        ({"max_gap": float("nan")}, "max_gap=nan"),
        ({"max_gap": True}, "max_gap=True"),
        ({"gap_patience": 0}, "gap_patience=0"),
        ({"gap_patience": None}, "gap_patience=None"),
        ({"mode": "maximize"}, "mode='maximize'"),
        ({"mode": None}, "mode=None"),
        ({"monitor": ""}, "monitor=''"),
        ({"monitor": None}, "monitor=None"),
        ({"restore_best_weights": "yes"}, "restore_best_weights='yes'"),
        ({"restore_best_weights": 1}, "restore_best_weights=1"),
        ({"strict": None}, "strict=None"),
        ({"train_loss_key": ""}, "train_loss_key=''"),
        ({"val_acc_key": 3}, "val_acc_key=3"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match) + ".* is not allowed: use "):
        GeneralizationMonitor(**kwargs)


def test_state_round_trip_defaults_and_key(tmp_path: Path) -> None:
    saved = {
        "best_score": 0.75,
        "best_epoch": 2,
        "best_step": 30,
        "wait_count": 1,
        "gap_count": 2,
        "stopped_epoch": 5,
        "best_weights": {"net.weight": torch.arange(6.0).reshape(2, 3), "net.bias": torch.ones(2)},
    }
    monitor = GeneralizationMonitor()
    monitor.load_state_dict(saved)
    state = monitor.state_dict()
    assert same_state(state, saved)
    other = GeneralizationMonitor()
    other.load_state_dict(through_checkpoint(state, tmp_path / "state.ckpt"))  # torch.load(weights_only=True)
    assert same_state(other.state_dict(), state)
    assert same_state(other.best_weights, state["best_weights"])
    other.load_state_dict({})  # an older checkpoint without any of the keys
    assert other.state_dict() == {
        "best_score": None,
        "best_epoch": None,
        "best_step": None,
        "wait_count": 0,
        "gap_count": 0,
        "stopped_epoch": 0,
    }
    # Identity is monitor and mode; tuning settings keep the state.
    assert GeneralizationMonitor(patience=2).state_key == GeneralizationMonitor(max_gap=0.3, min_delta=0.1).state_key
    assert GeneralizationMonitor().state_key != GeneralizationMonitor(monitor="val/loss", mode="min").state_key
    assert GeneralizationMonitor().state_key != GeneralizationMonitor(mode="min").state_key


def test_every_early_stopping_hook_is_overridden() -> None:
    """The subclass is for Lightning's hook order only: none of EarlyStopping's logic may run."""
    for name, member in vars(EarlyStopping).items():
        if (callable(member) and not name.startswith("_")) or isinstance(member, property):
            if name in ("monitor_op",):  # a helper property of EarlyStopping's own logic
                continue
            assert name in vars(GeneralizationMonitor), name


# ---------------------------------------------------------------------- Trainer fixtures


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return TensorDataset(x, x[:, :3].argmax(dim=1))


class Scripted(pl.LightningModule):
    """A linear classifier trained by SGD (so its weights change every epoch) that logs scripted
    metrics, indexed by epoch: validation metrics in ``validation_step``, training metrics in
    ``on_train_epoch_end`` as ``ImageClassifier`` does. ``val`` maps a metric to its values, or to
    one list per rank (logged without sync, so the ranks disagree). The sanity check logs 1.0 for
    every validation metric, better than any scripted accuracy: it must not count."""

    def __init__(self, val: dict[str, Any], train: dict[str, list[float]] | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 3)
        self.val_metrics = val
        self.train_metrics = train or {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        for name, values in self.val_metrics.items():
            if isinstance(values, dict):  # per rank
                values = values[self.global_rank]
            self.log(name, 1.0 if self.trainer.sanity_checking else values[self.current_epoch])

    def on_train_epoch_end(self) -> None:
        for name, values in self.train_metrics.items():
            self.log(name, values[self.current_epoch])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_data(), batch_size=8)  # 4 steps per epoch

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_data(), batch_size=16)


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's state (this rank's shards under FSDP2)."""
    return {k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone() for k, v in module.state_dict().items()}


class Recorder(Callback):
    """The module's weights at every validation of the fit, keyed by epoch (what that validation saw)."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.at[trainer.current_epoch] = _weights(pl_module)


def _trainer(root: Path, callbacks: list[Callback], **overrides: Any) -> pl.Trainer:
    settings: dict[str, Any] = {"max_epochs": 4, "num_sanity_val_steps": 1, "log_every_n_steps": 1}
    return quiet_cpu_trainer(root, callbacks, **{**settings, **overrides})


def _checkpointing(root: Path) -> ModelCheckpoint:
    """A checkpoint every epoch (and last.ckpt), saved at the end of the training epoch."""
    return ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=-1, filename="{epoch}")


def _checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.fixture
def info(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Captures Lightning's rank-zero messages (rank_zero_info logs at INFO)."""
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    return caplog


def _monitor_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("GeneralizationMonitor")]


# ---------------------------------------------------------------------- restore best weights


def test_restores_the_best_weights_in_memory_and_in_last_ckpt(tmp_path: Path, info: pytest.LogCaptureFixture) -> None:
    monitor, rec = GeneralizationMonitor(), Recorder()
    model = Scripted({"val/acc": [0.5, 0.9, 0.7, 0.6]})
    trainer = _trainer(tmp_path, [monitor, rec, _checkpointing(tmp_path)], enable_checkpointing=True)
    trainer.fit(model)

    assert (monitor.best_epoch, monitor.best_step, monitor.best_score) == (1, 8, pytest.approx(0.9))
    assert not same_state(rec.at[1], rec.at[3]), "training moved the weights after the best epoch"
    assert same_state(_weights(model), rec.at[1])
    assert same_state(_checkpoint_weights(tmp_path / "ckpt" / "last.ckpt"), rec.at[1])
    # The checkpoint of epoch 1 (written when epoch 1 was the latest) is untouched.
    assert same_state(_checkpoint_weights(tmp_path / "ckpt" / "epoch=1.ckpt"), rec.at[1])
    assert same_state(_checkpoint_weights(tmp_path / "ckpt" / "epoch=2.ckpt"), rec.at[2])
    (message,) = _monitor_messages(info)
    assert message == (
        "GeneralizationMonitor: restored the weights of epoch 1 (step 8, val/acc=0.9), the best of this run; "
        "the last validation had val/acc=0.6"
    )


def test_restore_off_keeps_the_final_weights(tmp_path: Path) -> None:
    monitor, rec = GeneralizationMonitor(restore_best_weights=False), Recorder()
    model = Scripted({"val/acc": [0.5, 0.9, 0.7, 0.6]})
    _trainer(tmp_path, [monitor, rec]).fit(model)
    assert same_state(_weights(model), rec.at[3]) and not same_state(rec.at[1], rec.at[3])
    assert monitor.best_epoch == 1 and monitor.best_weights is None and "best_weights" not in monitor.state_dict()


def test_another_callbacks_stop_restores_before_last_ckpt(tmp_path: Path) -> None:
    """A stop requested before this callback's epoch end (here by a plain callback, as DivergenceGuard
    or Timer do) is the final epoch: last.ckpt gets the best weights."""

    class StopAfterEpoch2(Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trainer.should_stop = trainer.current_epoch == 2

    rec = Recorder()
    model = Scripted({"val/acc": [0.5, 0.9, 0.7, 0.6, 0.5, 0.4]})
    trainer = _trainer(
        tmp_path,
        [StopAfterEpoch2(), GeneralizationMonitor(), rec, _checkpointing(tmp_path)],
        enable_checkpointing=True,
        max_epochs=6,
    )
    trainer.fit(model)
    assert trainer.current_epoch == 3 and sorted(rec.at) == [0, 1, 2]
    assert same_state(_weights(model), rec.at[1]) and not same_state(rec.at[1], rec.at[2])
    assert same_state(_checkpoint_weights(tmp_path / "ckpt" / "last.ckpt"), rec.at[1])


def test_min_epochs_keeps_training_on_the_live_weights(tmp_path: Path) -> None:
    """A stop request before min_epochs does not end training, so nothing may be restored yet."""

    class AlwaysStop(Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trainer.should_stop = True

    class WeightsAtEpochStart(Callback):
        def __init__(self) -> None:
            self.at: dict[int, dict[str, torch.Tensor]] = {}

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.at[trainer.current_epoch] = _weights(pl_module)

    rec, starts = Recorder(), WeightsAtEpochStart()
    model = Scripted({"val/acc": [0.9, 0.5, 0.6, 0.7]})
    _trainer(tmp_path, [AlwaysStop(), GeneralizationMonitor(), rec, starts], min_epochs=3, max_epochs=6).fit(model)
    assert sorted(rec.at) == [0, 1, 2]
    assert same_state(starts.at[1], rec.at[0]) and same_state(starts.at[2], rec.at[1])  # trained on, no restore
    assert same_state(_weights(model), rec.at[0])


def test_early_stopping_after_it_is_caught_at_train_end(tmp_path: Path) -> None:
    """Lightning's EarlyStopping listed after this callback decides after its epoch end: the model in
    memory still gets the best weights (on_train_end)."""
    rec = Recorder()
    model = Scripted({"val/acc": [0.5, 0.9, 0.8, 0.7, 0.6, 0.5]})
    stopper = EarlyStopping(monitor="val/acc", mode="max", patience=2)
    trainer = _trainer(tmp_path, [GeneralizationMonitor(), stopper, rec], max_epochs=6)
    trainer.fit(model)
    assert sorted(rec.at) == [0, 1, 2, 3]
    assert same_state(_weights(model), rec.at[1]) and not same_state(rec.at[1], rec.at[3])


# ---------------------------------------------------------------------- stopping


def test_patience_stops_at_the_right_epoch(tmp_path: Path, info: pytest.LogCaptureFixture) -> None:
    monitor, rec = GeneralizationMonitor(patience=2, min_delta=0.05), Recorder()
    # Improvements at epochs 0, 1 (0.6 - 0.05 > 0.5) and 3; 2 and 4 are within min_delta; 5 is no better.
    model = Scripted({"val/acc": [0.5, 0.6, 0.62, 0.7, 0.74, 0.7, 0.99, 0.99]})
    trainer = _trainer(tmp_path, [monitor, rec], max_epochs=8)
    trainer.fit(model)
    assert sorted(rec.at) == [0, 1, 2, 3, 4, 5] and trainer.should_stop
    assert (monitor.stopped_epoch, monitor.best_epoch, monitor.wait_count) == (5, 3, 2)
    assert same_state(_weights(model), rec.at[3])
    stop, restore = _monitor_messages(info)
    assert stop == (
        "GeneralizationMonitor: stopping after epoch 5: val/acc did not improve at the last 2 validations "
        "(patience=2; best 0.7 at epoch 3)"
    )
    assert restore.startswith("GeneralizationMonitor: restored the weights of epoch 3 ")


def test_gap_stops_after_gap_patience_epochs_in_a_row(tmp_path: Path, info: pytest.LogCaptureFixture) -> None:
    monitor = GeneralizationMonitor(monitor="val/loss", mode="min", max_gap=0.3, gap_patience=2)
    # gap/loss = val/loss - 0.5: 0.0, 0.5 (1st above), 0.25 (streak ends), 0.5, 0.75 (2nd in a row): stop.
    model = Scripted({"val/loss": [0.5, 1.0, 0.75, 1.0, 1.25, 1.5, 1.5]}, train={"train/loss": [0.5] * 7})
    rec = Recorder()
    trainer = _trainer(tmp_path, [monitor, rec], max_epochs=7)
    trainer.fit(model)
    assert sorted(rec.at) == [0, 1, 2, 3, 4] and monitor.stopped_epoch == 4 and monitor.gap_count == 2
    assert same_state(_weights(model), rec.at[0])
    assert _monitor_messages(info)[0] == (
        "GeneralizationMonitor: stopping after epoch 4: gap/loss=0.75 was above max_gap=0.3 at the last 2 "
        "validated epochs (gap_patience=2)"
    )


def test_acts_on_the_agreed_decision(tmp_path: Path, info: pytest.LogCaptureFixture) -> None:
    """The stop follows trainer.strategy.reduce_boolean_decision (here: another rank wants to stop
    after epoch 1), not this rank's own verdict."""

    class OtherRankStopsAtEpoch1(Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            epoch = trainer.current_epoch

            def reduce(decision: bool, **kwargs: Any) -> bool:
                return decision or epoch == 1

            trainer.strategy.reduce_boolean_decision = reduce  # type: ignore[method-assign]

    monitor, rec = GeneralizationMonitor(patience=3), Recorder()
    trainer = _trainer(tmp_path, [OtherRankStopsAtEpoch1(), monitor, rec], max_epochs=4)
    trainer.fit(Scripted({"val/acc": [0.5, 0.9, 0.7, 0.6]}))
    assert sorted(rec.at) == [0, 1] and monitor.stopped_epoch == 1
    assert _monitor_messages(info)[0] == "GeneralizationMonitor: stopping after epoch 1: another rank decided to stop"


# ---------------------------------------------------------------------- logged gap


def test_gap_keys_logged_with_values_at_the_epoch_step(tmp_path: Path) -> None:
    logger = MemoryLogger()
    model = Scripted(
        {"val/loss": [1.0, 1.5, 2.0], "val/acc": [0.5, 0.75, 0.25]},
        train={"train/loss": [0.75, 0.5, 0.25], "train/acc": [0.5, 0.875, 1.0]},
    )
    trainer = _trainer(tmp_path, [GeneralizationMonitor()], max_epochs=3, logger=logger)
    trainer.fit(model)
    rows = [(step, row) for step, row in logger.rows if "gap/loss" in row]
    assert [step for step, _ in rows] == [3, 7, 11]  # each epoch's last optimizer step, with val/*, train/*
    assert [row["gap/loss"] for _, row in rows] == [0.25, 1.0, 1.75]
    assert [row["gap/acc"] for _, row in rows] == [0.0, 0.125, 0.75]
    assert [row["gap/best_epoch"] for _, row in rows] == [0.0, 1.0, 1.0]
    assert [row["train/loss"] for _, row in rows] == [0.75, 0.5, 0.25]  # logged in the same row
    assert {step for step, row in logger.rows if "val/acc" in row} == {3, 7, 11}
    assert trainer.callback_metrics["gap/loss"] == 1.75


def test_gap_of_the_image_classifier(tmp_path: Path) -> None:
    """ImageClassifier logs train/loss and train/acc in its own on_train_epoch_end; the gap pairs
    those of the same epoch with that epoch's validation."""
    from lit_accel import ImageClassifier

    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(64, 3, 4, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    model = ImageClassifier(net=nn.Sequential(nn.Flatten(), nn.Linear(48, 3)), num_classes=3)
    logger = MemoryLogger()
    _trainer(tmp_path, [GeneralizationMonitor(strict=True)], max_epochs=3, logger=logger).fit(model, loader, loader)
    by_step: dict[int | None, dict[str, float]] = {}
    for step, row in logger.rows:
        by_step.setdefault(step, {}).update(row)
    epochs = [m for m in by_step.values() if "gap/loss" in m]
    assert len(epochs) == 3 and len({m["train/loss"] for m in epochs}) == 3  # each epoch's own values
    for m in epochs:
        assert m["gap/loss"] == pytest.approx(m["val/loss"] - m["train/loss"], abs=1e-6)
        assert m["gap/acc"] == pytest.approx(m["train/acc"] - m["val/acc"], abs=1e-6)


def test_missing_metrics_and_skipped_validations(tmp_path: Path) -> None:
    logger = MemoryLogger(prefix="gap/")
    # No accuracies: only gap/loss. Validation every 2nd epoch: logged on epochs 1 and 3 only.
    model = Scripted(
        {"val/loss": [9.0, 1.0, 9.0, 2.0], "val/acc": [0.0, 0.5, 0.0, 0.25]}, train={"train/loss": [0.5] * 4}
    )
    monitor, rec = GeneralizationMonitor(patience=1), Recorder()
    trainer = _trainer(tmp_path, [monitor, rec], check_val_every_n_epoch=2, logger=logger)
    trainer.fit(model)
    assert logger.rows == [
        (7, {"gap/loss": 0.5, "gap/best_epoch": 1.0}),
        (15, {"gap/loss": 1.5, "gap/best_epoch": 1.0}),
    ]
    assert sorted(rec.at) == [1, 3] and monitor.stopped_epoch == 3 and monitor.wait_count == 1
    assert same_state(_weights(model), rec.at[1])

    # No validation at all: nothing logged, nothing to restore, no error.
    logger, monitor = MemoryLogger(prefix="gap/"), GeneralizationMonitor(patience=1, strict=True)
    model = Scripted({"val/acc": [0.5] * 2}, train={"train/loss": [0.5] * 2})
    _trainer(tmp_path, [monitor], limit_val_batches=0, max_epochs=2, logger=logger).fit(model)
    assert logger.rows == [] and monitor.best_epoch is None and monitor.stopped_epoch == 0


def test_missing_monitor(tmp_path: Path) -> None:
    model = Scripted({"val/loss": [1.0] * 3})
    with pytest.raises(RuntimeError, match=r"monitor needs the metric\(s\) \['val/acc'\] .*\['val/loss'\]"):
        _trainer(tmp_path, [GeneralizationMonitor(strict=True)], max_epochs=3).fit(model)

    monitor, rec = GeneralizationMonitor(patience=1), Recorder()
    with pytest.warns(UserWarning, match=r"\['val/acc'\].*strict=true makes this an error") as warned:
        _trainer(tmp_path, [monitor, rec], max_epochs=3).fit(Scripted({"val/loss": [1.0] * 3}))
    assert len([w for w in warned if "GeneralizationMonitor" in str(w.message)]) == 1  # once per fit
    assert monitor.best_epoch is None and monitor.stopped_epoch == 0

    with pytest.raises(RuntimeError, match=r"max_gap needs the metric\(s\) \['train/loss'\]"):
        _trainer(tmp_path, [GeneralizationMonitor(max_gap=0.1, strict=True)], max_epochs=3).fit(
            Scripted({"val/acc": [1.0] * 3, "val/loss": [1.0] * 3})
        )


# ---------------------------------------------------------------------- resume


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_resume_restores_a_best_epoch_from_before_the_interruption(tmp_path: Path) -> None:
    val = {"val/acc": [0.5, 0.9, 0.7, 0.8]}
    first_rec = Recorder()
    first = _trainer(
        tmp_path,
        [GeneralizationMonitor(), first_rec, _checkpointing(tmp_path)],
        enable_checkpointing=True,
        max_epochs=2,
    )
    first.fit(Scripted(val))
    checkpoint = tmp_path / "ckpt" / "epoch=1.ckpt"
    assert same_state(_checkpoint_weights(checkpoint), first_rec.at[1])  # the best is the last so far

    # Lightning loads the checkpoint with torch.load(weights_only=True): the best weights come back.
    monitor, rec = GeneralizationMonitor(), Recorder()
    model = Scripted(val)
    second = _trainer(tmp_path, [monitor, rec, _checkpointing(tmp_path)], enable_checkpointing=True)
    second.fit(model, ckpt_path=checkpoint)
    assert sorted(rec.at) == [2, 3] and not same_state(rec.at[3], first_rec.at[1])
    assert monitor.best_epoch == 1
    assert same_state(_weights(model), first_rec.at[1])
    assert same_state(_checkpoint_weights(tmp_path / "ckpt" / "last.ckpt"), first_rec.at[1])


def test_a_new_fit_starts_from_scratch(tmp_path: Path) -> None:
    monitor = GeneralizationMonitor()
    _trainer(tmp_path, [monitor], max_epochs=2).fit(Scripted({"val/acc": [0.5, 0.9]}))
    rec, model = Recorder(), Scripted({"val/acc": [0.1, 0.2]})
    _trainer(tmp_path, [monitor, rec], max_epochs=2).fit(model)
    assert monitor.best_epoch == 1 and monitor.best_score == pytest.approx(0.2)  # not the first fit's 0.9
    assert same_state(_weights(model), rec.at[1])


# ---------------------------------------------------------------------- distributed


class DumpRank(Callback):
    """Each rank writes its weights at every validation, its final weights and the monitor's progress."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rec = Recorder()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rec.on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after the monitor's on_train_end (it comes first in the list).
        monitor = next(c for c in trainer.callbacks if isinstance(c, GeneralizationMonitor))
        torch.save(
            {
                "at": self.rec.at,
                "final": _weights(pl_module),
                "best_epoch": monitor.best_epoch,
                "stopped": monitor.stopped_epoch,
                "state_keys": sorted(monitor.state_dict()),
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_ranks_agree_on_the_best_epoch_and_the_stop(tmp_path: Path) -> None:
    # val/acc logged without sync: rank 0 alone would pick epoch 1 and stop at epoch 2, rank 1 alone
    # would stop at epoch 1 (no improvement). Their mean, 0.1 0.5 0.6 0.2, peaks at epoch 2, and with
    # patience 1 stops at epoch 3.
    val = {"val/acc": {0: [0.1, 0.9, 0.6, 0.2, 0.9, 0.9], 1: [0.1, 0.1, 0.6, 0.2, 0.9, 0.9]}}
    trainer = _trainer(
        tmp_path,
        [GeneralizationMonitor(patience=1), DumpRank(tmp_path)],
        strategy="ddp_fork",
        devices=2,
        max_epochs=6,
        num_sanity_val_steps=0,
    )
    trainer.fit(Scripted(val))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank in ranks:
        assert (rank["best_epoch"], rank["stopped"], sorted(rank["at"])) == (2, 3, [0, 1, 2, 3])
        assert same_state(rank["final"], rank["at"][2]) and not same_state(rank["at"][2], rank["at"][3])
    assert same_state(ranks[0]["final"], ranks[1]["final"])
    assert same_state(ranks[0]["at"], ranks[1]["at"])  # DDP replicas: one set of weights per epoch


@pytest.mark.parametrize("sharded", [False, True])
def test_sharded_strategies_leave_the_best_weights_out_of_checkpoints(sharded: bool) -> None:
    """Lightning saves callback state from rank zero only: under FSDP/FSDP2 another rank would get
    rank zero's shards on resume. (Each rank's own shards are copied and restored:
    tests/core/test_snapshot.py.)"""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy, SingleDeviceStrategy

    strategy = ModelParallelStrategy() if sharded else SingleDeviceStrategy("cpu")
    monitor = GeneralizationMonitor()
    monitor.setup(SimpleNamespace(strategy=strategy), nn.Linear(4, 3), "fit")  # type: ignore[arg-type]
    monitor.load_state_dict({"best_epoch": 1, "best_weights": {"net.weight": torch.ones(3, 4)}})
    assert ("best_weights" in monitor.state_dict()) is not sharded


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resume_without_the_best_weights_keeps_the_final_ones(tmp_path: Path) -> None:
    """A checkpoint from a sharded run has no best weights: a resumed run says so and keeps its own."""
    val = {"val/acc": [0.5, 0.9, 0.7, 0.8]}
    monitor = GeneralizationMonitor()
    _trainer(tmp_path, [monitor, _checkpointing(tmp_path)], enable_checkpointing=True, max_epochs=2).fit(Scripted(val))
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=1.ckpt", weights_only=True)
    del checkpoint["callbacks"][monitor.state_key]["best_weights"]
    torch.save(checkpoint, tmp_path / "sharded.ckpt")

    rec, model = Recorder(), Scripted(val)
    with pytest.warns(UserWarning, match=r"the best weights, from epoch 1 \(step 8, val/acc=0.9\), predate"):
        _trainer(tmp_path, [GeneralizationMonitor(), rec], max_epochs=4).fit(model, ckpt_path=tmp_path / "sharded.ckpt")
    assert same_state(_weights(model), rec.at[3])


def test_recipe_config_enables_it() -> None:
    """configs/cifar10.yaml ships the callback (tests/test_configs.py runs that file through the CLI)."""
    callbacks = yaml.safe_load((CONFIGS / "cifar10.yaml").read_text())["trainer"]["callbacks"]
    (entry,) = [c for c in callbacks if c["class_path"] == "lit_accel.callbacks.GeneralizationMonitor"]
    monitor = GeneralizationMonitor(**entry["init_args"])
    settings = (monitor.monitor, monitor.mode, monitor.restore_best_weights, monitor.strict)
    assert settings == ("val/acc", "max", True, True)
