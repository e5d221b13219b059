"""DynamicBatchLR through real Trainers: one path per behaviour of the adapter.

What the plan decides (plateau counting, growth, limits, tables, progress, resume state) is tested
on the engine with numbers in tests/core/test_batch_plan.py, the LR multiplier in
tests/core/test_lr_scaling.py. Here: the batch reaches the DataLoader, accumulation and LRs reach
the optimizer, keys reach the logger, listeners are told, ranks agree, a checkpoint resumes.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.utils.data import DataLoader, TensorDataset

from helpers import MemoryLogger, quiet_cpu_trainer
from lit_accel.callbacks.divergence_guard import DivergenceGuard
from lit_accel.callbacks.dynamic_batch_lr import DynamicBatchLR
from lit_accel.callbacks.shared import RunSettingsError
from lit_accel.core.lr_scaling import DYNAMIC_LR_SCALE_KEY

NUM_SAMPLES = 32  # training samples; with batch 4 an epoch has 8 batches
BASE_LR = 0.1
LOGGER_NAME = "lit_accel.callbacks.dynamic_batch_lr"


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

    def __init__(self, script, holder="module", batch_size=4, out_dir=None):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.script = script
        self.holder = holder
        if holder == "module":
            self.batch_size = batch_size
        self.fixed_batch = batch_size
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
        return torch.optim.SGD(self.parameters(), lr=BASE_LR)

    def train_dataloader(self):
        batch = self.batch_size if self.holder == "module" else self.fixed_batch
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


# ------------------------------------------------------------------------------ construction
def test_arguments_reach_the_plan_and_yaml_tables_get_int_keys():
    from jsonargparse import ArgumentParser

    with pytest.raises(ValueError, match="monitor='' is not allowed"):
        DynamicBatchLR(monitor="")
    with pytest.raises(ValueError, match="patience=0 is not allowed"):
        DynamicBatchLR(patience=0)
    parser = ArgumentParser()
    parser.add_class_arguments(DynamicBatchLR, "cb")
    cfg = parser.parse_string("cb:\n  policy: none\n  batch_size_schedule: {0: 64, 5: 128}\n")
    assert DynamicBatchLR(**cfg.cb.as_dict()).plan.batch_size_schedule == {0: 64, 5: 128}
    cfg = parser.parse_string("cb:\n  batch_size_progress: {0.4: 512, 0.7: 1024}\n")
    assert DynamicBatchLR(**cfg.cb.as_dict()).plan.batch_size_progress == {0.4: 512, 0.7: 1024}


def test_state_key_and_checkpoint_format():
    """The state key is identity only, and the state holds the keys checkpoints have always held."""
    assert DynamicBatchLR(policy="lr").state_key == "DynamicBatchLR{'monitor': 'val/loss', 'mode': 'min'}"
    assert DynamicBatchLR(policy="lr").state_key == DynamicBatchLR(policy="batch", max_batch_size=512).state_key
    assert DynamicBatchLR().state_key != DynamicBatchLR(monitor="val/acc", mode="max").state_key
    saved = {
        "batch_size": 8,
        "accumulate_grad_batches": 2,
        "base_samples": 4,
        "lr_decay": 0.5,
        "best": 0.9,
        "wait": 1,
        "cooldown_left": 0,
        "applied_lr_scale": 0.5,
    }
    cb = DynamicBatchLR(policy="batch_then_lr", max_batch_size=8)
    cb.load_state_dict(saved)
    assert cb.state_dict() == saved


# ------------------------------------------------------------------------------ Trainer tests
def test_a_plateau_grows_the_batch_past_the_maximum_by_accumulation_and_scales_the_lr(tmp_path, caplog):
    logger = MemoryLogger()
    listener = BatchSizeListener()
    cb = DynamicBatchLR(
        policy="batch", patience=1, batch_factor=2.0, max_batch_size=8, max_effective_batch_size=32, lr_scaling="linear"
    )
    model = ScriptedModule([1.0] * 6, holder="datamodule")
    dm = ScriptedDataModule(batch_size=4)
    trainer = _trainer(tmp_path, [cb, listener], max_epochs=6, logger=logger)
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
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
    # logged at the first optimizer step each value applies to
    per_epoch = [(step, m) for step, m in logger.rows if "dynamic/batch_size" in m]
    assert [step for step, _ in per_epoch] == [0, 8, 16, 20, 22, 23]
    assert [m["dynamic/effective_batch_size"] for _, m in per_epoch] == [4, 4, 8, 16, 32, 32]
    assert [m["dynamic/batch_size"] for _, m in per_epoch] == [4, 4, 8, 8, 8, 8]
    assert [m["dynamic/lr_scale"] for _, m in per_epoch] == pytest.approx([1, 1, 2, 4, 8, 8])
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME]
    assert messages[0] == (
        "DynamicBatchLR: epoch 1: val/loss plateaued (val/loss=1, best 1, 1 epoch(s) without improvement);"
        " batch 4×1 → 8×1 per device (batch × accumulation), effective 4 → 8 from the next epoch; lr scale 1 → 2"
    )
    assert messages[-1].endswith("nothing left to change (batch and LR at their limits)")


def test_a_schedule_table_on_a_module_attribute(tmp_path):
    cb = DynamicBatchLR(policy="none", batch_size_schedule={0: 2, 2: 8, 3: 16}, max_batch_size=8, lr_scaling="sqrt")
    model = ScriptedModule([1.0] * 4, holder="module", batch_size=4)
    _trainer(tmp_path, [cb], max_epochs=4).fit(model)
    assert _batch_sizes(model) == [2, 2, 8, 8]
    assert [model.accumulate[e] for e in range(4)] == [1, 1, 1, 2]
    assert _first_lr(model) == pytest.approx([BASE_LR * math.sqrt(s / 4) for s in (2, 2, 8, 16)])  # from 4
    assert model.batch_size == 8


def test_progress_mode_grows_the_batch_at_its_fraction_of_the_run_and_couples_the_lr(tmp_path, caplog):
    cb = DynamicBatchLR(policy="none", batch_size_progress={0.4: 8, 0.8: 16}, lr_scaling="sqrt")
    model = ScriptedModule([1.0] * 5, holder="datamodule")
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        _trainer(tmp_path, [cb], max_epochs=5).fit(model, datamodule=ScriptedDataModule(batch_size=4))
    # A flat val/loss and policy none: only the table acts, at epochs 2 and 4 of 5.
    assert _batch_sizes(model) == [4, 4, 8, 8, 16]
    assert _first_lr(model) == pytest.approx([0.1, 0.1, 0.1 * 2**0.5, 0.1 * 2**0.5, 0.2])
    changes = [r.getMessage() for r in caplog.records if "batch_size_progress" in r.getMessage()]
    assert len(changes) == 2 and changes[0].startswith("DynamicBatchLR: epoch 2: batch_size_progress; batch 4×1 → 8×1")


def test_a_progress_table_the_run_cannot_meet_stops_before_training(tmp_path):
    cb = DynamicBatchLR(policy="none", batch_size_progress={0.4: 8})
    model = ScriptedModule([1.0], holder="datamodule")
    with pytest.raises(RunSettingsError, match="DynamicBatchLR: .*0.4 of a 1-epoch run starts at epoch 1"):
        _trainer(tmp_path, [cb], max_epochs=1).fit(model, datamodule=ScriptedDataModule(batch_size=4))
    assert model.seen == {}


def test_a_plain_dataloader_without_attribute_grows_by_accumulation(tmp_path):
    cb = DynamicBatchLR(policy="batch", patience=1, max_effective_batch_size=16)
    model = ScriptedModule([1.0] * 3, holder="none")
    with pytest.warns(UserWarning, match="no integer `batch_size` attribute"):
        _trainer(tmp_path, [cb], max_epochs=3).fit(model)
    assert _batch_sizes(model) == [4] * 3
    assert [model.accumulate[e] for e in range(3)] == [1, 1, 2]


def test_manual_optimization_rejects_a_schedule_that_needs_accumulation(tmp_path):
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
    with pytest.raises(RunSettingsError, match="accumulate_grad_batches=2") as error:
        _trainer(tmp_path, [cb], max_epochs=1).fit(Manual([1.0]))
    message = str(error.value)
    assert "manual optimization" in message and "batch 8 × 2 = 16 samples" in message
    assert "Raise max_batch_size to at least 16" in message  # what to do


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


def test_a_param_group_added_during_fit_gets_the_same_multiplier(tmp_path):
    # The group comes after DynamicBatchLR's epoch start: its first batch must already have it.
    cb = DynamicBatchLR(policy="none", batch_size_schedule={1: 8}, lr_scaling="linear")
    adder = AddGroupAtEpoch(epoch=2)
    _trainer(tmp_path, [cb, adder], max_epochs=3).fit(ScriptedModule([1.0] * 3))
    assert adder.lrs[0] == pytest.approx([BASE_LR])
    assert adder.lrs[1] == pytest.approx([2 * BASE_LR])
    assert adder.lrs[2] == pytest.approx([2 * BASE_LR, 2 * BASE_LR]), "the added group runs at the multiplier"


class NaNAt(ScriptedModule):
    """ScriptedModule whose loss is NaN at the given optimizer step (for DivergenceGuard)."""

    def __init__(self, nan_at: int, **kwargs: Any) -> None:
        super().__init__([1.0] * 3, **kwargs)
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.nan_at else loss


@pytest.mark.parametrize("guard_first", [True, False])
def test_a_divergence_guard_rollback_keeps_the_multiplier(tmp_path, guard_first):
    """The rollback restores the param groups of the step-0 snapshot (taken before or after the
    multiplier 2 was applied, by callback order) and halves them; the next batch needs 4 × 0.5."""
    no_spikes = {"loss_spike_factor": None, "grad_spike_factor": None, "spike_zscore": None}
    guard = DivergenceGuard(rollback_after=1, **no_spikes)  # only the scripted NaN is bad
    dynamic = DynamicBatchLR(policy="none", batch_size_schedule={0: 8, 1: 16}, lr_scaling="linear")
    model = NaNAt(4)  # the 1st step of epoch 1 (4 steps of 8, then 2 of 16)
    trainer = _trainer(tmp_path, [guard, dynamic] if guard_first else [dynamic, guard], max_epochs=3)
    trainer.fit(model)
    assert guard.rollbacks == 1 and guard.skipped_steps == 1
    assert [model.lrs[e] for e in range(3)] == [[0.2] * 4, [0.4, 0.2], [0.2, 0.2]]
    assert trainer.optimizers[0].param_groups[0][DYNAMIC_LR_SCALE_KEY] == 4.0


class LateRestoreStrategy(SingleDeviceStrategy):
    """Restores callbacks after ``on_fit_start``, as FSDP/ModelParallel/DeepSpeed do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


@pytest.mark.parametrize("late_restore", [False, True])
def test_resume_restores_batch_lr_and_counters(tmp_path, late_restore):
    def make():
        return DynamicBatchLR(
            policy="batch_then_lr", patience=1, max_batch_size=8, max_effective_batch_size=16, lr_scaling="linear"
        )

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = ScriptedModule([1.0] * 6)
    _trainer(tmp_path / "a", [make(), ckpt], max_epochs=3, enable_checkpointing=True).fit(first)
    resumed = ScriptedModule([1.0] * 6)
    strategy = LateRestoreStrategy(device=torch.device("cpu")) if late_restore else "auto"
    trainer = _trainer(tmp_path / "b", [make()], max_epochs=6, strategy=strategy)
    trainer.fit(resumed, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    # Uninterrupted: plateaus at the end of epochs 1..5 grow 4 -> 8 -> 8×2 (the LR follows), then
    # halve the LR twice. The checkpoint (end of epoch 2) holds an optimizer at 2× and a plan at 4×.
    assert _batch_sizes(first) + _batch_sizes(resumed) == [4, 4, 8, 8, 8, 8]
    assert [first.accumulate[e] for e in range(3)] + [resumed.accumulate[e] for e in range(3, 6)] == [1, 1, 1, 2, 2, 2]
    assert _first_lr(first) + _first_lr(resumed) == pytest.approx([0.1, 0.1, 0.2, 0.4, 0.2, 0.1])
    assert resumed.batch_size == 8


def test_a_second_fit_continues_with_fresh_optimizers(tmp_path):
    cb = DynamicBatchLR(policy="lr", patience=1, lr_factor=0.5)
    model = ScriptedModule([1.0] * 2)
    _trainer(tmp_path, [cb], max_epochs=2).fit(model)  # decays once, at the end of epoch 1
    model.lrs.clear()
    _trainer(tmp_path, [cb], max_epochs=2).fit(model)  # new Trainer: configure_optimizers starts at 0.1 again
    # the state continues (decay 0.5, best 1.0): every epoch of the second fit is a plateau
    assert _first_lr(model) == pytest.approx([0.05, 0.025])


@pytest.mark.slow
def test_ddp_two_processes_decide_together(tmp_path):
    torch.set_num_threads(1)
    # rank 0 alone would see a plateau at epoch 1, rank 1 alone never; their mean plateaus at epoch 3
    script = [[1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 0.5, 0.2, 0.05, 0.05]]
    cb = DynamicBatchLR(policy="batch_then_lr", patience=1, min_delta=0.1, max_batch_size=8)
    model = ScriptedModule(script, holder="datamodule", out_dir=str(tmp_path))
    trainer = _trainer(tmp_path, [cb], max_epochs=5, strategy="ddp_fork", devices=2)
    trainer.fit(model, datamodule=ScriptedDataModule(batch_size=4))
    records = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in (0, 1)]
    for record in records:
        # 32 samples split over 2 ranks: 16 per rank, 4 batches of 4 then 2 batches of 8
        assert [record["seen"][str(e)] for e in range(5)] == [[4] * 4] * 4 + [[8, 8]]
        assert [record["lrs"][str(e)][0] for e in range(5)] == pytest.approx([BASE_LR] * 5)
    assert records[0] == records[1]
