"""Tests for DynamicBatchLR: pure decision functions, then real Trainers on scripted modules."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from helpers import MemoryLogger, quiet_cpu_trainer
from lit_accel.callbacks.divergence_guard import DivergenceGuard
from lit_accel.callbacks.dynamic_batch_lr import (
    DynamicBatchLR,
    _batch_lr_factor,
    _decay_ratio,
    _grow_samples,
    _plan_action,
    _plateau_step,
    _progress_epochs,
    _samples_cap,
    _split_samples,
    _table_value,
    _warmup_factor,
)
from lit_accel.callbacks.shared import RunSettingsError
from lit_accel.core.lr_scaling import DYNAMIC_LR_SCALE_KEY

NUM_SAMPLES = 32  # training samples; with batch 4 an epoch has 8 batches
BASE_LR = 0.1


# ------------------------------------------------------------------------------- pure functions
def _run_plateau(values, mode="min", patience=2, min_delta=0.0, cooldown=0):
    best, wait, cool, plateaus = None, 0, 0, []
    for epoch, value in enumerate(values):
        best, wait, cool, plateau = _plateau_step(value, best, wait, cool, mode, patience, min_delta, cooldown)
        if plateau:
            plateaus.append(epoch)
    return plateaus, best


def test_plateau_step_patience_and_best():
    plateaus, best = _run_plateau([1.0, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8], patience=2)
    assert plateaus == [3, 6]
    assert best == 0.8


def test_plateau_step_cooldown_skips_epochs_after_an_action():
    values = [1.0] * 9
    assert _run_plateau(values, patience=2, cooldown=0)[0] == [2, 4, 6, 8]
    assert _run_plateau(values, patience=2, cooldown=1)[0] == [2, 5, 8]


def test_plateau_step_mode_max_and_min_delta():
    # +0.05 steps are not improvements with min_delta=0.1
    assert _run_plateau([0.5, 0.55, 0.6, 0.65], mode="max", patience=2, min_delta=0.1)[0] == [2]
    assert _run_plateau([0.5, 0.55, 0.6, 0.65], mode="max", patience=2, min_delta=0.0)[0] == []


def test_plateau_step_nan_never_improves():
    plateaus, best = _run_plateau([float("nan"), float("nan"), 1.0], patience=2)
    assert plateaus == [1]
    assert best == 1.0


@pytest.mark.parametrize(
    ("samples", "factor", "cap", "expected"),
    [(4, 2.0, None, 8), (4, 2.0, 6, 6), (8, 2.0, 8, None), (10, 1.5, None, 15), (1, 1.5, None, None)],
)
def test_grow_samples(samples, factor, cap, expected):
    assert _grow_samples(samples, factor, cap) == expected


@pytest.mark.parametrize(
    ("samples", "max_batch", "fixed", "expected"),
    [
        (8, None, None, (8, 1)),
        (8, 8, None, (8, 1)),
        (16, 8, None, (8, 2)),
        (24, 16, None, (12, 2)),
        (25, 16, None, (13, 2)),
        (16, None, 4, (4, 4)),
        (10, None, 4, (4, 3)),
    ],
)
def test_split_samples(samples, max_batch, fixed, expected):
    assert _split_samples(samples, max_batch, fixed) == expected


def test_samples_cap():
    assert _samples_cap(8, None, None) == 8  # no effective maximum: no accumulation
    assert _samples_cap(8, 32, None) == 32
    assert _samples_cap(None, None, None) is None
    assert _samples_cap(None, None, 4) == 4  # fixed DataLoader batch, no effective maximum: no growth


def test_decay_ratio_floor():
    assert _decay_ratio(0.1, 0.5, 0.0) == pytest.approx(0.5)
    assert _decay_ratio(0.1, 0.5, 0.08) == pytest.approx(0.8)
    assert _decay_ratio(0.08, 0.5, 0.08) is None


def test_plan_action_batch_then_lr():
    assert _plan_action("batch_then_lr", 4, 8, 2.0, 0.1, 0.5, 0.0) == ("batch", 8.0)
    assert _plan_action("batch_then_lr", 8, 8, 2.0, 0.1, 0.5, 0.0) == ("lr", pytest.approx(0.5))
    assert _plan_action("batch", 8, 8, 2.0, 0.1, 0.5, 0.0) is None
    assert _plan_action("lr", 4, 8, 2.0, 0.1, 0.5, 0.0) == ("lr", pytest.approx(0.5))
    assert _plan_action("batch_then_lr", 8, 8, 2.0, 0.1, 0.5, 0.1) is None


def test_small_helpers():
    assert [_warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert _warmup_factor(0, 0) == 1.0
    assert _table_value({0: 1.0, 3: 0.1}, 2, 9.0) == 1.0
    assert _table_value({0: 1.0, 3: 0.1}, 5, 9.0) == 0.1
    assert _table_value({2: 0.5}, 1, 9.0) == 9.0
    assert _batch_lr_factor(4.0, "linear") == 4.0
    assert _batch_lr_factor(4.0, "sqrt") == 2.0
    assert _batch_lr_factor(4.0, "none") == 1.0


# ------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mode": "up"}, "mode"),
        ({"policy": "grow"}, "policy"),
        ({"patience": 0}, "patience"),
        ({"min_delta": -1.0}, "min_delta"),
        ({"cooldown": -1}, "cooldown"),
        ({"lr_factor": 1.0}, "lr_factor"),
        ({"lr_factor": 0.0}, "lr_factor"),
        ({"min_lr": -0.1}, "min_lr"),
        ({"batch_factor": 1.0}, "batch_factor"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_effective_batch_size": -4}, "max_effective_batch_size"),
        ({"lr_scaling": "cubic"}, "lr_scaling"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"monitor": ""}, "monitor"),
        ({"policy": "batch"}, "policy"),  # no maximum
        ({"policy": "batch", "max_batch_size": 8, "batch_size_schedule": {2: 8}}, "batch_size_schedule"),
        ({"batch_size_schedule": {-1: 8}}, "batch_size_schedule"),
        ({"batch_size_schedule": {1: 0}}, "batch_size_schedule"),
        ({"lr_schedule": {1: -0.5}}, "lr_schedule"),
        ({"lr_schedule": {1: float("inf")}}, "lr_schedule"),
        ({"lr_schedule": [0.5]}, "lr_schedule=\\[0.5\\] is not allowed: use a mapping"),
        ({"batch_factor": float("inf")}, "batch_factor=inf"),
        ({"min_delta": "0.1"}, "min_delta='0.1'"),
        ({"lr_factor": True}, "lr_factor=True"),
        ({"batch_size_progress": {1.0: 512}}, r"batch_size_progress=\{1.0: 512\} is not allowed: use fractions"),
        ({"batch_size_progress": {0: 512}}, "batch_size_progress.*fractions of the run in \\(0, 1\\)"),
        ({"batch_size_progress": {0.5: 0}}, "batch_size_progress.*positive integer batch sizes"),
        ({"batch_size_progress": {0.3: 1024, 0.6: 512}}, "batch_size_progress.*batch sizes that grow"),
        ({"batch_size_progress": [512]}, "batch_size_progress=\\[512\\] is not allowed: use a mapping"),
        (
            {"policy": "batch", "max_batch_size": 8, "batch_size_progress": {0.5: 8}},
            "batch_size_progress.*policy='batch'",
        ),
        ({"batch_size_schedule": {2: 8}, "batch_size_progress": {0.5: 8}}, "batch_size_progress.*batch_size_schedule"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DynamicBatchLR(**kwargs)


def test_state_dict_round_trip_and_defaults():
    cb = DynamicBatchLR(policy="batch", max_batch_size=8)
    cb._batch_size, cb._accumulate, cb._base_samples, cb._lr_decay = 8, 2, 4, 0.25
    cb._best, cb._wait, cb._cooldown_left, cb._applied_lr_scale = 0.5, 1, 2, 0.25
    other = DynamicBatchLR(policy="batch", max_batch_size=8)
    other.load_state_dict(cb.state_dict())
    assert other.state_dict() == cb.state_dict()
    old = DynamicBatchLR()
    old.load_state_dict({"batch_size": 16})  # keys added later load with defaults
    assert old.state_dict()["lr_decay"] == 1.0 and old.state_dict()["accumulate_grad_batches"] == 1
    assert DynamicBatchLR(policy="lr").state_key != DynamicBatchLR(monitor="val/acc", mode="max").state_key
    # The policy and its settings are not identity: a resume with another policy keeps the state.
    assert (
        DynamicBatchLR(policy="lr").state_key
        == DynamicBatchLR(policy="batch", patience=5, max_batch_size=512).state_key
    )


def test_tables_from_yaml_have_int_keys():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(DynamicBatchLR, "cb")
    cfg = parser.parse_string("cb:\n  batch_size_schedule: {0: 64, 5: 128}\n  lr_schedule: {10: 0.1}\n")
    cb = DynamicBatchLR(**cfg.cb.as_dict())
    assert cb.batch_size_schedule == {0: 64, 5: 128}
    assert cb.lr_schedule == {10: 0.1}
    cfg = parser.parse_string("cb:\n  batch_size_progress: {0.4: 512, 0.7: 1024}\n")
    assert DynamicBatchLR(**cfg.cb.as_dict()).batch_size_progress == {0.4: 512, 0.7: 1024}


def test_progress_table_in_epochs_follows_the_run_length():
    assert _progress_epochs({0.4: 512}, 5) == {2: 512}
    assert _progress_epochs({0.4: 512}, 10) == {4: 512}
    assert _progress_epochs({0.4: 512}, 3) == {2: 512}  # epoch 1 starts at 1/3 < 0.4 of the run
    assert _progress_epochs({0.2: 512, 0.6: 1024}, 5) == {1: 512, 3: 1024}
    assert _progress_epochs({0.3: 512, 0.7: 1024}, 20) == {6: 512, 14: 1024}


@pytest.mark.parametrize(
    ("table", "max_epochs", "message"),
    [
        ({0.5: 512}, None, r"needs the run's length in epochs, but trainer.max_epochs=None"),
        ({0.5: 512}, -1, r"trainer.max_epochs=-1"),
        (
            {0.9: 512},
            5,
            r"0.9 of a 5-epoch run starts at epoch 5, after the last epoch \(4\): use fractions at most 0.8",
        ),
        ({0.5: 512}, 1, r"0.5 of a 1-epoch run starts at epoch 1"),
        ({0.3: 512, 0.35: 1024}, 5, r"two fractions fall on epoch 2 of a 5-epoch run"),
    ],
)
def test_progress_table_that_cannot_be_met_is_one_error(table, max_epochs, message):
    with pytest.raises(RunSettingsError, match=message):
        _progress_epochs(table, max_epochs)
    assert issubclass(RunSettingsError, ValueError) and issubclass(RunSettingsError, MisconfigurationException)


# ----------------------------------------------------------------------------- Trainer fixtures
class BatchSizeListener(Callback):
    """Stands in for a throughput meter: records the documented protocol calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def on_batch_size_changed(self, trainer: Trainer, pl_module: LightningModule, batch_size: int) -> None:
        self.calls.append((trainer.current_epoch, batch_size))


def _dataset(n: int = NUM_SAMPLES) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g))


class ScriptedModule(LightningModule):
    """A linear regressor whose ``val/loss`` follows ``script[epoch]`` (per rank under DDP).

    ``holder``: "module" exposes ``self.batch_size`` read by its own ``train_dataloader``; "none"
    returns a plain DataLoader with no attribute anywhere; "datamodule" leaves loaders to a
    data module. Records, per epoch, the batch sizes seen, the LR at each step and the accumulation.
    """

    def __init__(self, script, holder="module", batch_size=4, scheduler=None, out_dir=None):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.script = script
        self.holder = holder
        if holder == "module":
            self.batch_size = batch_size
        self._fixed_batch = batch_size
        self.scheduler = scheduler
        self.out_dir = out_dir
        self.seen: dict[int, list[int]] = {}
        self.lrs: dict[int, list[float]] = {}
        self.accumulate: dict[int, int] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        epoch = self.current_epoch
        self.seen.setdefault(epoch, []).append(len(x))
        self.lrs.setdefault(epoch, []).append(float(self.trainer.optimizers[0].param_groups[0]["lr"]))
        self.accumulate[epoch] = self.trainer.accumulate_grad_batches
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            table = self.script[self.global_rank] if isinstance(self.script[0], list) else self.script
            self.log("val/loss", float(table[self.current_epoch]))

    def on_train_end(self):
        if self.out_dir is not None:
            record = {"seen": self.seen, "lrs": self.lrs, "accumulate": self.accumulate}
            Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps(record))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=BASE_LR)
        if self.scheduler is None:
            return optimizer
        name, interval, kwargs = self.scheduler
        scheduler = getattr(torch.optim.lr_scheduler, name)(optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def train_dataloader(self):
        batch = self.batch_size if self.holder == "module" else self._fixed_batch
        return DataLoader(_dataset(), batch_size=batch, shuffle=True)

    def val_dataloader(self):
        return DataLoader(_dataset(8), batch_size=8)


class ScriptedDataModule(LightningDataModule):
    """A minimal data module (not lit_accel's) with a public ``batch_size``."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train_loader_builds = 0

    def train_dataloader(self):
        self.train_loader_builds += 1
        return DataLoader(_dataset(), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(_dataset(8), batch_size=8)


def _trainer(tmp_path, callbacks, max_epochs, **kwargs) -> Trainer:
    defaults = {"max_epochs": max_epochs, "num_sanity_val_steps": 0, "log_every_n_steps": 1}
    return quiet_cpu_trainer(tmp_path, callbacks, **{**defaults, **kwargs})


def _first_lr(model) -> list[float]:
    return [model.lrs[e][0] for e in sorted(model.lrs)]


def _batch_sizes(model) -> list[int]:
    return [model.seen[e][0] for e in sorted(model.seen)]


# ------------------------------------------------------------------------------ Trainer tests
def test_lr_policy_decays_at_the_expected_epoch_with_cooldown(tmp_path, caplog):
    script = [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    cb = DynamicBatchLR(policy="lr", patience=2, cooldown=1, lr_factor=0.5)
    model = ScriptedModule(script)
    with caplog.at_level(logging.INFO, logger="lit_accel.callbacks.dynamic_batch_lr"):
        _trainer(tmp_path, [cb], max_epochs=8).fit(model)
    # best 0.9 at epoch 1; 2nd epoch without improvement = epoch 3 -> lower LR from epoch 4;
    # cooldown 1 ignores epoch 4; then epochs 5 and 6 -> lower LR from epoch 7.
    assert _first_lr(model) == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025])
    assert _batch_sizes(model) == [4] * 8
    changes = [r.getMessage() for r in caplog.records if "plateaued" in r.getMessage()]
    assert len(changes) == 2 and "epoch 3" in changes[0] and "lr scale 1 → 0.5" in changes[0]


def test_lr_policy_respects_min_lr(tmp_path):
    cb = DynamicBatchLR(policy="lr", patience=1, lr_factor=0.5, min_lr=0.03)
    model = ScriptedModule([1.0] * 5)
    _trainer(tmp_path, [cb], max_epochs=5).fit(model)
    # plateaus at epochs 1, 2, 3: 0.1 -> 0.05 -> 0.03 (floor) -> no change
    assert _first_lr(model) == pytest.approx([0.1, 0.1, 0.05, 0.03, 0.03])


def test_batch_growth_with_datamodule_accumulates_past_max_and_scales_lr(tmp_path):
    logger = MemoryLogger()
    listener = BatchSizeListener()
    cb = DynamicBatchLR(
        policy="batch", patience=1, batch_factor=2.0, max_batch_size=8, max_effective_batch_size=32, lr_scaling="linear"
    )
    model = ScriptedModule([1.0] * 6, holder="datamodule")
    dm = ScriptedDataModule(batch_size=4)
    trainer = _trainer(tmp_path, [cb, listener], max_epochs=6, logger=logger)
    trainer.fit(model, datamodule=dm)
    # plateau at the end of epochs 1, 2, 3, 4: samples/step 4 -> 8 -> 16 -> 32 -> capped
    assert _batch_sizes(model) == [4, 4, 8, 8, 8, 8]
    assert [model.accumulate[e] for e in range(6)] == [1, 1, 1, 2, 4, 4]
    assert [len(model.seen[e]) for e in range(6)] == [8, 8, 4, 4, 4, 4]
    assert _first_lr(model) == pytest.approx([0.1, 0.1, 0.2, 0.4, 0.8, 0.8])
    # 8 + 8 + 4 optimizer steps, then 4 batches / 2, then 4 / 4 twice
    assert trainer.global_step == 8 + 8 + 4 + 2 + 1 + 1
    assert dm.batch_size == 8
    assert dm.train_loader_builds == 2  # the first build and one rebuild for 4 -> 8
    assert listener.calls == [(2, 8)]
    per_epoch = [m for _, m in logger.rows if "dynamic/batch_size" in m]
    assert [step for step, m in logger.rows if "dynamic/batch_size" in m] == [0, 8, 16, 20, 22, 23]
    assert [m["dynamic/effective_batch_size"] for m in per_epoch] == [4, 4, 8, 16, 32, 32]
    assert [m["dynamic/batch_size"] for m in per_epoch] == [4, 4, 8, 8, 8, 8]
    assert per_epoch[-1]["dynamic/lr_scale"] == pytest.approx(8.0)


def test_logged_on_the_step_axis_of_lightnings_own_lr_curve(tmp_path):
    """A change shows at the same step in ``dynamic/lr_scale`` and in LearningRateMonitor's curve,
    the index of the first optimizer step it applies to (issue #13, item 6)."""
    logger = MemoryLogger()
    cb = DynamicBatchLR(policy="lr", patience=1, lr_factor=0.5)
    monitor = LearningRateMonitor(logging_interval="step")
    _trainer(tmp_path, [cb, monitor], max_epochs=4, logger=logger).fit(ScriptedModule([1.0] * 4))
    lr_key = "lr-SGD"
    monitor_lr = {step: row[lr_key] for step, row in logger.rows if lr_key in row}
    scales = [(step, row["dynamic/lr_scale"]) for step, row in logger.rows if "dynamic/lr_scale" in row]
    assert [scale for _, scale in scales] == pytest.approx([1.0, 1.0, 0.5, 0.25])  # plateaus after epochs 1, 2
    for step, scale in scales:
        assert monitor_lr[step] == pytest.approx(0.1 * scale), f"step {step}"
        assert step == 0 or monitor_lr[step - 1] == pytest.approx(0.1 * scales[scales.index((step, scale)) - 1][1])


def test_batch_then_lr_on_a_module_attribute(tmp_path):
    cb = DynamicBatchLR(policy="batch_then_lr", patience=1, max_batch_size=8, lr_factor=0.5)
    model = ScriptedModule([1.0] * 5, holder="module")
    _trainer(tmp_path, [cb], max_epochs=5).fit(model)
    # epoch 1: batch 4 -> 8 (lr_scaling none keeps LR); epoch 2: at max -> LR halves; epoch 3: again
    assert _batch_sizes(model) == [4, 4, 8, 8, 8]
    assert _first_lr(model) == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.025])
    assert model.batch_size == 8


def test_plain_dataloader_without_attribute_grows_by_accumulation(tmp_path):
    cb = DynamicBatchLR(policy="batch", patience=1, max_effective_batch_size=16)
    model = ScriptedModule([1.0] * 5, holder="none")
    with pytest.warns(UserWarning, match="no integer `batch_size` attribute"):
        _trainer(tmp_path, [cb], max_epochs=5).fit(model)
    assert _batch_sizes(model) == [4] * 5
    assert [model.accumulate[e] for e in range(5)] == [1, 1, 2, 4, 4]


def test_schedule_mode_tables(tmp_path):
    cb = DynamicBatchLR(
        policy="none",
        batch_size_schedule={0: 2, 2: 8, 3: 16},
        lr_schedule={1: 0.5, 3: 0.1},
        max_batch_size=8,
        lr_scaling="sqrt",
    )
    model = ScriptedModule([1.0] * 4, holder="module", batch_size=4)
    _trainer(tmp_path, [cb], max_epochs=4).fit(model)
    assert _batch_sizes(model) == [2, 2, 8, 8]
    assert [model.accumulate[e] for e in range(4)] == [1, 1, 1, 2]
    # base = 4 samples/step; sqrt rule × table factor
    expected = [math.sqrt(2 / 4), math.sqrt(2 / 4) * 0.5, math.sqrt(8 / 4) * 0.5, math.sqrt(16 / 4) * 0.1]
    assert _first_lr(model) == pytest.approx([BASE_LR * f for f in expected])


def test_multiplier_on_top_of_cosine_schedule(tmp_path):
    t_max, eta_min = 6, 0.01
    cb = DynamicBatchLR(policy="lr", patience=2, lr_factor=0.5)
    cosine_args = {"T_max": t_max, "eta_min": eta_min}
    model = ScriptedModule([1.0, 0.9, 0.9, 0.9, 0.9, 0.9], scheduler=("CosineAnnealingLR", "epoch", cosine_args))
    _trainer(tmp_path, [cb], max_epochs=6).fit(model)
    scale = [1, 1, 1, 1, 0.5, 0.5]  # plateau at the end of epoch 3
    cosine = [eta_min + (BASE_LR - eta_min) * (1 + math.cos(math.pi * e / t_max)) / 2 for e in range(6)]
    assert _first_lr(model) == pytest.approx([s * c for s, c in zip(scale, cosine)], rel=1e-9)


def test_warmup_on_top_of_onecycle(tmp_path):
    warmup = 4
    kwargs = {"max_lr": BASE_LR, "total_steps": 16}
    cb = DynamicBatchLR(policy="none", warmup_steps=warmup)
    model = ScriptedModule([1.0] * 2, scheduler=("OneCycleLR", "step", kwargs))
    _trainer(tmp_path, [cb], max_epochs=2).fit(model)
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    onecycle = torch.optim.lr_scheduler.OneCycleLR(reference, **kwargs)
    expected = []
    for step in range(16):
        expected.append(reference.param_groups[0]["lr"] * _warmup_factor(step, warmup))
        reference.step()
        onecycle.step()
    seen = model.lrs[0] + model.lrs[1]
    assert seen == pytest.approx(expected, rel=1e-9)


def test_works_with_lit_accel_preload_datamodule(tmp_path):
    from lit_accel.data import CIFAR10DataModule

    class TinyImageModule(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
            self.seen: dict[int, set[int]] = {}

        def training_step(self, batch, batch_idx):
            images, labels = batch
            self.seen.setdefault(self.current_epoch, set()).add(len(images))
            return torch.nn.functional.cross_entropy(self.net(images), labels)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = CIFAR10DataModule(synthetic=True, synthetic_size=128, synthetic_test_size=16, val_size=0, batch_size=16)
    cb = DynamicBatchLR(policy="none", batch_size_schedule={1: 32})
    model = TinyImageModule()
    _trainer(tmp_path, [cb], max_epochs=2, limit_val_batches=0).fit(model, datamodule=dm)
    assert model.seen == {0: {16}, 1: {32}}


class LateRestoreStrategy(SingleDeviceStrategy):
    """Restores callbacks after ``on_fit_start``, as FSDP/ModelParallel/DeepSpeed do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


@pytest.mark.parametrize("late_restore", [False, True])
def test_resume_restores_batch_lr_and_counters(tmp_path, late_restore):
    def make():
        return DynamicBatchLR(policy="batch_then_lr", patience=1, max_batch_size=8, max_effective_batch_size=16)

    script = [1.0] * 6
    full = ScriptedModule(script)
    _trainer(tmp_path / "full", [make()], max_epochs=6).fit(full)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = ScriptedModule(script)
    cb_first = make()
    _trainer(tmp_path / "a", [cb_first, ckpt], max_epochs=3, enable_checkpointing=True).fit(first)

    resumed = ScriptedModule(script)
    cb_resumed = make()
    strategy = LateRestoreStrategy(device=torch.device("cpu")) if late_restore else "auto"
    trainer = _trainer(tmp_path / "b", [cb_resumed], max_epochs=6, strategy=strategy)
    trainer.fit(resumed, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    # epochs 3..5 of the resumed run repeat the uninterrupted run
    for epoch in (3, 4, 5):
        assert resumed.seen[epoch][0] == full.seen[epoch][0]
        assert resumed.accumulate[epoch] == full.accumulate[epoch]
        assert resumed.lrs[epoch][0] == pytest.approx(full.lrs[epoch][0])
    assert _batch_sizes(full) == [4, 4, 8, 8, 8, 8]
    assert [full.accumulate[e] for e in range(6)] == [1, 1, 1, 2, 2, 2]
    assert _first_lr(full) == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.025])
    assert resumed.batch_size == 8


def test_second_fit_continues_with_fresh_optimizers(tmp_path):
    cb = DynamicBatchLR(policy="lr", patience=1, lr_factor=0.5)
    model = ScriptedModule([1.0] * 4)
    _trainer(tmp_path, [cb], max_epochs=2).fit(model)  # decays once, at the end of epoch 1
    model.lrs.clear()
    _trainer(tmp_path, [cb], max_epochs=4).fit(model)  # new Trainer: configure_optimizers starts at 0.1 again
    # the state continues (decay 0.5, best 1.0): every epoch of the second fit is a plateau
    assert _first_lr(model) == pytest.approx([0.05, 0.025, 0.0125, 0.00625])


class AddGroupAtEpoch(Callback):
    """What Lightning's BackboneFinetuning does when it unfreezes: a param group added mid-fit."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.lrs: dict[int, list[float]] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            extra = torch.nn.Parameter(torch.zeros(1))
            trainer.optimizers[0].add_param_group({"params": [extra], "lr": BASE_LR})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.setdefault(trainer.current_epoch, [g["lr"] for g in trainer.optimizers[0].param_groups])


@pytest.mark.parametrize("added_first", [True, False])
def test_a_param_group_added_during_fit_gets_the_same_multiplier(tmp_path, added_first):
    cb, adder = DynamicBatchLR(policy="none", lr_schedule={0: 1.0, 1: 0.1}), AddGroupAtEpoch(epoch=2)
    _trainer(tmp_path, [adder, cb] if added_first else [cb, adder], max_epochs=4).fit(ScriptedModule([1.0] * 4))
    assert adder.lrs[1] == pytest.approx([BASE_LR * 0.1])
    assert adder.lrs[3] == pytest.approx([BASE_LR * 0.1, BASE_LR * 0.1]), "the added group runs at the schedule"


def _ddp_fit(tmp_path: Path, cb: DynamicBatchLR, script: list[list[float]], max_epochs: int) -> None:
    """Two ddp_fork ranks, rank ``r`` validating ``script[r]``; each writes what it saw to ``tmp_path``."""
    model = ScriptedModule(script, holder="datamodule", out_dir=str(tmp_path))
    trainer = _trainer(tmp_path, [cb], max_epochs=max_epochs, strategy="ddp_fork", devices=2)
    trainer.fit(model, datamodule=ScriptedDataModule(batch_size=4))


@pytest.mark.slow
def test_ddp_two_processes_decide_together(tmp_path):
    torch.set_num_threads(1)
    # rank 0 alone would see a plateau at epoch 1, rank 1 alone never; their mean plateaus at epoch 3
    script = [[1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 0.5, 0.2, 0.05, 0.05]]
    _ddp_fit(tmp_path, DynamicBatchLR(policy="batch_then_lr", patience=1, min_delta=0.1, max_batch_size=8), script, 5)
    records = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in (0, 1)]
    for record in records:
        # 32 samples split over 2 ranks: 16 per rank, 4 batches of 4 then 2 batches of 8
        assert [record["seen"][str(e)] for e in range(5)] == [[4] * 4] * 4 + [[8, 8]]
        assert [record["lrs"][str(e)][0] for e in range(5)] == pytest.approx([BASE_LR] * 5)
    assert records[0] == records[1]


def test_progress_mode_grows_the_batch_at_its_fraction_of_the_run_and_couples_the_lr(tmp_path, caplog):
    cb = DynamicBatchLR(policy="none", batch_size_progress={0.4: 8, 0.8: 16}, lr_scaling="sqrt")
    model = ScriptedModule([1.0] * 5, holder="datamodule")
    with caplog.at_level(logging.INFO, logger="lit_accel.callbacks.dynamic_batch_lr"):
        _trainer(tmp_path, [cb], max_epochs=5).fit(model, datamodule=ScriptedDataModule(batch_size=4))
    # A flat val/loss and policy none: only the table acts, at epochs 2 and 4 of 5.
    assert _batch_sizes(model) == [4, 4, 8, 8, 16]
    assert _first_lr(model) == pytest.approx([0.1, 0.1, 0.1 * 2**0.5, 0.1 * 2**0.5, 0.2])
    changes = [r.getMessage() for r in caplog.records if "batch_size_progress" in r.getMessage()]
    assert len(changes) == 2 and changes[0].startswith("DynamicBatchLR: epoch 2: batch_size_progress; batch 4×1 → 8×1")


@pytest.mark.parametrize(
    ("max_epochs", "batch_size", "message"),
    [
        (1, 4, "0.4 of a 1-epoch run starts at epoch 1, after the last epoch"),
        (5, 8, "cannot grow the batch: the run starts at 8 samples per optimizer step on each device"),
    ],
)
def test_progress_mode_that_cannot_be_met_stops_before_training(tmp_path, max_epochs, batch_size, message):
    cb = DynamicBatchLR(policy="none", batch_size_progress={0.4: 8})
    model = ScriptedModule([1.0] * 5, holder="datamodule")
    with pytest.raises(RunSettingsError, match=message):
        _trainer(tmp_path, [cb], max_epochs=max_epochs).fit(model, datamodule=ScriptedDataModule(batch_size=batch_size))
    assert model.seen == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 4}, r"max_batch_size=4 \(per device\) is below the 8 samples per optimizer step"),
        ({"max_batch_size": 4, "max_effective_batch_size": 6}, r"max_effective_batch_size=6 \(over 1 device\(s\)\)"),
    ],
)
def test_a_batch_policy_whose_maximum_is_below_the_start_stops_before_training(tmp_path, kwargs, message):
    cb = DynamicBatchLR(policy="batch", patience=1, **kwargs)
    model = ScriptedModule([1.0] * 3, holder="datamodule")
    with pytest.raises(RunSettingsError, match=message):
        _trainer(tmp_path, [cb], max_epochs=3).fit(model, datamodule=ScriptedDataModule(batch_size=8))
    assert model.seen == {}
    # A per-device maximum below the start is fine when accumulation can take the batch further.
    ok = DynamicBatchLR(policy="batch", patience=1, max_batch_size=4, max_effective_batch_size=16)
    _trainer(tmp_path, [ok], max_epochs=3).fit(
        ScriptedModule([1.0] * 3, holder="datamodule"), datamodule=ScriptedDataModule(batch_size=8)
    )


def test_progress_mode_resumes_where_it_was(tmp_path):
    def make():
        return DynamicBatchLR(policy="none", batch_size_progress={0.4: 8, 0.8: 16}, lr_scaling="sqrt")

    full = ScriptedModule([1.0] * 5, holder="datamodule")
    _trainer(tmp_path / "full", [make()], max_epochs=5).fit(full, datamodule=ScriptedDataModule(batch_size=4))
    # The data module has no validation data: save at each training epoch's end.
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1, save_on_train_epoch_end=True)
    first = ScriptedModule([1.0] * 5, holder="datamodule")
    crash = CrashAtEpochStart(3)
    with pytest.raises(RuntimeError, match="crash at the start of epoch 3"):
        _trainer(tmp_path / "a", [make(), ckpt, crash], max_epochs=5, enable_checkpointing=True).fit(
            first, datamodule=ScriptedDataModule(batch_size=4)
        )
    resumed = ScriptedModule([1.0] * 5, holder="datamodule")
    dm = ScriptedDataModule(batch_size=4)  # the configured batch: the checkpoint's grown one replaces it
    _trainer(tmp_path / "b", [make()], max_epochs=5).fit(
        resumed, datamodule=dm, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert sorted(resumed.seen) == [3, 4]
    for epoch in (3, 4):
        assert resumed.seen[epoch] == full.seen[epoch]
        assert resumed.lrs[epoch] == pytest.approx(full.lrs[epoch])
    assert dm.batch_size == 16


class CrashAtEpochStart(Callback):
    """Raise when the given epoch starts: the previous epoch's checkpoint is written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"crash at the start of epoch {self.epoch}")


@pytest.mark.slow
def test_ddp_progress_mode_grows_on_both_ranks_at_the_same_step(tmp_path):
    torch.set_num_threads(1)
    cb = DynamicBatchLR(policy="none", batch_size_progress={0.5: 8}, lr_scaling="linear")
    _ddp_fit(tmp_path, cb, [[1.0] * 4, [0.5] * 4], 4)
    records = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in (0, 1)]
    for record in records:
        # 16 samples per rank: 4 batches of 4, from epoch 2 (half of 4 epochs) 2 batches of 8
        assert [record["seen"][str(e)] for e in range(4)] == [[4] * 4] * 2 + [[8, 8]] * 2
        assert [record["lrs"][str(e)][0] for e in range(4)] == pytest.approx([BASE_LR] * 2 + [2 * BASE_LR] * 2)
    assert records[0] == records[1]


def test_manual_optimization_rejects_a_schedule_that_needs_accumulation(tmp_path):
    """Manual optimization cannot accumulate: a schedule that needs it fails with a clear error."""

    class Manual(ScriptedModule):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    cb = DynamicBatchLR(policy="none", batch_size_schedule={0: 16}, max_batch_size=8)
    with pytest.raises(ValueError, match="accumulate_grad_batches=2") as error:
        _trainer(tmp_path, [cb], max_epochs=1).fit(Manual([1.0]))
    message = str(error.value)
    assert "manual optimization" in message and "batch 8 × 2 = 16 samples" in message
    assert "Raise max_batch_size to at least 16" in message  # what to do


class NaNAt(ScriptedModule):
    """ScriptedModule whose loss is NaN at the given optimizer steps (for DivergenceGuard)."""

    def __init__(self, nan_at: tuple[int, ...], **kwargs: Any) -> None:
        super().__init__([1.0] * 4, **kwargs)
        self.nan_at = set(nan_at)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step in self.nan_at else loss


@pytest.mark.parametrize("guard_first", [True, False])
@pytest.mark.parametrize(
    ("warmup", "nan_at", "expected"),
    [
        # Rollback inside the warm-up: step 4 is 0.1 × warm-up 5/10 × backoff 0.5.
        (10, 3, [0.01, 0.02, 0.03, 0.04, 0.025, 0.03, 0.035, 0.04, 0.045] + [0.05] * 7),
        # Rollback after the warm-up to the snapshot taken at step 0 (inside it).
        (4, 6, [0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1] + [0.05] * 9),
    ],
)
def test_divergence_guard_rollback_keeps_the_multiplier(tmp_path, guard_first, warmup, nan_at, expected):
    """A rollback restores param groups from before warm-up steps: the multiplier must still be right."""
    no_spikes = {"loss_spike_factor": None, "grad_spike_factor": None, "spike_zscore": None}
    guard = DivergenceGuard(rollback_after=1, **no_spikes)  # only the scripted NaN is bad
    dynamic = DynamicBatchLR(policy="none", warmup_steps=warmup)
    model = NaNAt((nan_at,))
    callbacks = [guard, dynamic] if guard_first else [dynamic, guard]
    trainer = _trainer(tmp_path, callbacks, max_epochs=2, limit_val_batches=0)
    trainer.fit(model)
    assert guard.rollbacks == 1 and guard.skipped_steps == 1
    assert model.lrs[0] + model.lrs[1] == pytest.approx(expected, rel=1e-12)
    assert trainer.optimizers[0].param_groups[0][DYNAMIC_LR_SCALE_KEY] == 1.0


@pytest.mark.parametrize("old_checkpoint", [False, True])
def test_resume_reads_the_multiplier_from_the_optimizer_or_an_old_checkpoint(tmp_path, old_checkpoint):
    def make():
        return DynamicBatchLR(policy="none", lr_schedule={0: 0.5, 2: 0.25})

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    _trainer(tmp_path / "a", [make(), ckpt], max_epochs=1, enable_checkpointing=True).fit(ScriptedModule([1.0] * 3))
    path = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert groups[0][DYNAMIC_LR_SCALE_KEY] == 0.5 and groups[0]["lr"] == pytest.approx(0.05)
    if old_checkpoint:  # written before the scale lived in the param groups
        for group in groups:
            del group[DYNAMIC_LR_SCALE_KEY]
        torch.save(checkpoint, path)
    resumed = ScriptedModule([1.0] * 3)
    _trainer(tmp_path / "b", [make()], max_epochs=3).fit(resumed, ckpt_path=str(path))
    assert _first_lr(resumed) == pytest.approx([0.05, 0.025])
