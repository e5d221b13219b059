"""Tests for DivergenceGuard: arguments and state, then one real Trainer run per behaviour on a
scripted module. The decisions are tested on the engine, tests/core/test_divergence.py."""

from __future__ import annotations

import copy
import logging
import math
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from helpers import MemoryLogger, quiet_cpu_trainer, same_state
from lit_accel.callbacks.divergence_guard import DivergenceError, DivergenceGuard

GUARD_LOGGER = "lit_accel.callbacks.divergence_guard"
# Small windows so spike detection is live after a few steps of these short runs.
FAST = dict(window=5, warmup=3, snapshot_every=100)


# ---------------------------------------------------------------------- arguments and state
# (the decisions are the engine's: tests/core/test_divergence.py)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rollback_after": 0}, "rollback_after=0"),
        ({"rollback_after": 2.5}, "rollback_after=2.5"),
        ({"max_rollbacks": -1}, "max_rollbacks=-1"),
        ({"lr_backoff": 0.0}, "lr_backoff=0.0"),
        ({"lr_backoff": 1.5}, "lr_backoff=1.5"),
        ({"lr_backoff": True}, "lr_backoff=True"),
        ({"loss_spike_factor": float("inf")}, "loss_spike_factor=inf"),
        ({"spike_zscore": float("nan")}, "spike_zscore=nan"),
        ({"snapshot_every": 0}, "snapshot_every=0"),
        ({"window": 1}, "window=1"),
        ({"warmup": 1}, "warmup=1"),
        ({"window": 10, "warmup": 11}, "warmup=11"),
        ({"loss_spike_factor": 1.0}, "loss_spike_factor=1.0"),
        ({"grad_spike_factor": -3}, "grad_spike_factor=-3"),
        ({"spike_zscore": 0}, "spike_zscore=0"),
        ({"scaler_patience": -1}, "scaler_patience=-1"),
        ({"on_stop": "exit"}, "on_stop='exit'"),
        ({"checkpoint_path": ""}, "checkpoint_path=''"),
        ({"window": True}, "window=True"),
        ({"save_on_stop": "no"}, "save_on_stop='no'"),
        ({"drift_factor": 1.0}, "drift_factor=1.0"),
        ({"early_loss_spike_factor": 0.5}, "early_loss_spike_factor=0.5"),
        ({"drift_factor": float("nan")}, "drift_factor=nan"),
        ({"rewarm_steps": -1}, "rewarm_steps=-1"),
        ({"rewarm_start_factor": 0.0}, "rewarm_start_factor=0.0"),
        ({"rewarm_start_factor": float("inf")}, "rewarm_start_factor=inf"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        DivergenceGuard(**kwargs)


def test_state_dict_round_trip_and_defaults() -> None:
    guard = DivergenceGuard()
    guard.skipped_steps, guard.rollbacks, guard.scaler_skips, guard.lr_factor = 7, 2, 3, 0.25
    other = DivergenceGuard()
    other.load_state_dict(guard.state_dict())
    assert other.state_dict() == {
        "skipped_steps": 7,
        "rollbacks": 2,
        "scaler_skips": 3,
        "lr_factor": 0.25,
        "rewarm_done": 0,
        "rewarm_factor": 1.0,
    }
    other.load_state_dict({"skipped_steps": 1})  # an older checkpoint: missing keys get defaults
    assert other.state_dict() == {
        "skipped_steps": 1,
        "rollbacks": 0,
        "scaler_skips": 0,
        "lr_factor": 1.0,
        "rewarm_done": 0,
        "rewarm_factor": 1.0,
    }
    assert (
        DivergenceGuard(rollback_after=2).state_key == DivergenceGuard(max_rollbacks=9).state_key == "DivergenceGuard"
    )
    assert DivergenceGuard(name="a").state_key != DivergenceGuard(name="b").state_key


# ---------------------------------------------------------------------- Trainer fixtures


def _dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x[:, :3].argmax(dim=1))  # learnable: a linear layer can fit it


class Scripted(pl.LightningModule):
    """Linear classifier whose loss is NaN, scaled or offset at chosen steps (optionally on one rank
    only) and whose LR is multiplied at chosen steps.

    ``lr_multiplier`` is keyed by ``trainer.global_step`` (wall-clock time in steps), so the guard's
    rollbacks and scheduler holds do not move it.
    """

    def __init__(
        self,
        optimizer: str = "sgd",
        nan_at: tuple[int, ...] = (),
        nan_rank: int | None = None,
        nan_batch_idx: tuple[int, ...] = (),
        lr_multiplier: dict[int, float] | None = None,
        loss_multiplier: dict[int, float] | None = None,
        loss_offset: dict[int, float] | None = None,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 3)
        self.optimizer_name = optimizer
        self.nan_at = set(nan_at)
        self.nan_rank = nan_rank
        self.nan_batch_idx = set(nan_batch_idx)
        self.lr_multiplier = lr_multiplier or {}
        self.loss_multiplier = loss_multiplier or {}
        self.loss_offset = loss_offset or {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y) * self.loss_multiplier.get(self.global_step, 1.0)
        on_rank = self.nan_rank is None or self.global_rank == self.nan_rank
        if on_rank and (self.global_step in self.nan_at or batch_idx in self.nan_batch_idx):
            loss = loss * float("nan")
        if on_rank:
            loss = loss + self.loss_offset.get(self.global_step, 0.0)  # a spike with unchanged gradients
        return loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        elif self.optimizer_name == "fused_adam":
            opt = torch.optim.Adam(self.parameters(), lr=0.01, fused=True)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: self.lr_multiplier.get(self.trainer.global_step, 1.0))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_dataset(), batch_size=8)


def _state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "opt": copy.deepcopy(optimizer.state_dict()),
    }


class Recorder(Callback):
    """State before and after every optimizer step, losses, LRs and pre-guard gradient norms.

    Put it after the guard in ``callbacks`` so it sees the state after a rollback; its
    ``on_before_optimizer_step`` then runs after the guard's, so gradient norms come from
    ``on_after_backward``.
    """

    def __init__(self) -> None:
        self.before: dict[int, dict[str, Any]] = {}
        self.after: dict[int, dict[str, Any]] = {}
        self.losses: dict[int, float] = {}
        self.lrs: dict[int, float] = {}
        self.grad_norms: dict[int, float] = {}
        self.sched_epochs: dict[int, int] = {}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.before.setdefault(trainer.global_step, _state(pl_module, trainer.optimizers[0]))
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.grad_norms[trainer.global_step] = float(torch.nn.utils.get_total_norm(grads))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step - 1
        self.after[step] = _state(pl_module, trainer.optimizers[0])
        self.losses[step] = float(outputs["loss"])
        self.sched_epochs[step] = trainer.lr_scheduler_configs[0].scheduler.last_epoch


def _trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    return quiet_cpu_trainer(tmp_path, callbacks, **{"max_steps": 10, "limit_val_batches": 0, **kwargs})


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == GUARD_LOGGER]


# ---------------------------------------------------------------------- behaviour


def test_nan_step_is_skipped_without_touching_state(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=GUARD_LOGGER)
    guard, rec = DivergenceGuard(**FAST), Recorder()
    _trainer(tmp_path, [guard, rec], max_steps=8).fit(Scripted("adam", nan_at=(4,)))

    assert same_state(rec.after[4], rec.before[4])  # parameters and optimizer state (momentum / Adam moments)
    assert not same_state(rec.after[3], rec.before[3]) and not same_state(rec.after[5], rec.before[5])
    assert math.isnan(rec.losses[4]) and all(math.isfinite(rec.losses[s]) for s in (5, 6, 7))
    assert rec.losses[7] < rec.losses[0]
    # The step-interval scheduler is held on the skipped step: 8 steps, 7 scheduler steps.
    assert rec.sched_epochs[3] == 4 and rec.sched_epochs[4] == 4 and rec.sched_epochs[7] == 7
    assert guard.state_dict() == {
        "skipped_steps": 1,
        "rollbacks": 0,
        "scaler_skips": 0,
        "lr_factor": 1.0,
        "rewarm_done": 0,
        "rewarm_factor": 1.0,
    }
    assert _messages(caplog) == [
        "DivergenceGuard: step 4: skipped the update (non-finite loss: nan); 1 bad step(s) in a row"
    ]


def test_nan_in_one_accumulated_micro_batch_skips_the_whole_step(tmp_path: Path) -> None:
    guard, rec = DivergenceGuard(**FAST), Recorder()
    # Steps are pairs of batches; batch 5 is the second micro-batch of step 2.
    _trainer(tmp_path, [guard, rec], max_steps=4, accumulate_grad_batches=2).fit(Scripted("adam", nan_batch_idx=(5,)))
    assert same_state(rec.after[2], rec.after[1])
    assert not same_state(rec.after[3], rec.after[2])
    assert guard.skipped_steps == 1


def test_persistent_explosion_rolls_back_with_lower_lr_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=GUARD_LOGGER)
    guard = DivergenceGuard(rollback_after=2, lr_backoff=0.5, window=5, warmup=3, snapshot_every=4)
    rec = Recorder()
    # LR x 1e6 on step 6: the update blows the weights up; steps 7 and 8 are bad; step 8 rolls back.
    _trainer(tmp_path, [guard, rec], max_steps=24).fit(Scripted("sgd", lr_multiplier={6: 1e6}))

    assert rec.lrs[6] == pytest.approx(0.1 * 1e6)
    assert guard.rollbacks == 1 and guard.skipped_steps == 2 and guard.lr_factor == 0.5
    rollback = [m for m in _messages(caplog) if "rolled back" in m]
    assert len(rollback) == 1 and rollback[0].startswith("DivergenceGuard: step 8: skipped the update and rolled back")
    snap_step = int(re.search(r"snapshot from step (\d+)", rollback[0]).group(1))
    assert snap_step == 3  # 4 good steps (0-3) after the snapshot taken at train start
    # Weights and momentum buffers restored exactly (the param groups differ by the backoff).
    assert same_state(rec.after[8]["params"], rec.before[snap_step]["params"])
    assert same_state(rec.after[8]["opt"]["state"], rec.before[snap_step]["opt"]["state"])
    # The backoff persists through later scheduler steps (it is in the scheduler's base_lrs).
    assert all(rec.lrs[s] == pytest.approx(0.05) for s in range(9, 24))
    assert all(math.isfinite(rec.losses[s]) for s in range(9, 24)) and rec.losses[23] < rec.losses[0]


def test_non_finite_parameters_after_the_last_step_are_restored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=GUARD_LOGGER)
    guard, rec = DivergenceGuard(**FAST), Recorder()
    model = Scripted("sgd", lr_multiplier={5: float("inf")})
    _trainer(tmp_path, [guard, rec], max_steps=6).fit(model)
    assert not all(torch.isfinite(p).all() for p in rec.after[5]["params"].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert _messages(caplog) == [
        "DivergenceGuard: step 5: the last update made the parameters non-finite; restored the snapshot from step 0"
    ]


def test_stops_after_max_rollbacks_with_message_and_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=GUARD_LOGGER)
    guard = DivergenceGuard(rollback_after=2, max_rollbacks=2, on_stop="stop", **FAST)
    rec = Recorder()
    trainer = _trainer(tmp_path, [guard, rec], max_steps=20)
    model = Scripted("sgd", nan_at=tuple(range(3, 20)))
    trainer.fit(model)

    # Steps 3-4 roll back, 5-6 roll back, 7 skips, 8 stops.
    assert trainer.should_stop and trainer.global_step == 9
    assert guard.state_dict() == {
        "skipped_steps": 6,
        "rollbacks": 2,
        "scaler_skips": 0,
        "lr_factor": 0.25,
        "rewarm_done": 0,
        "rewarm_factor": 1.0,
    }
    # The optimizer's own LR follows lr_factor: both rollbacks go to the step-0 snapshot and compound.
    assert [rec.lrs[s] for s in range(3, 9)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.025)
    (stop,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    text = stop.getMessage()
    for part in (
        "stopped training at step 8 (epoch 1, batch 0)",
        "non-finite loss: nan",
        "after 2 rollback(s)",
        "x0.25",
        str(tmp_path / "divergence.ckpt"),
        "last good snapshot (step 0)",
        "What to try",
    ):
        assert part in text
    checkpoint = torch.load(tmp_path / "divergence.ckpt", weights_only=False)
    assert checkpoint["callbacks"][guard.state_key]["rollbacks"] == 2
    assert checkpoint["global_step"] == 9
    # The live model is left at the last good snapshot.
    assert same_state(model.state_dict(), rec.before[0]["params"])


def test_stop_can_raise(tmp_path: Path) -> None:
    guard = DivergenceGuard(rollback_after=1, max_rollbacks=0, on_stop="raise", save_on_stop=False, **FAST)
    with pytest.raises(DivergenceError, match=r"stopped training at step 2 .*non-finite loss"):
        _trainer(tmp_path, [guard]).fit(Scripted("sgd", nan_at=(2,)))
    assert not (tmp_path / "divergence.ckpt").exists()
    assert issubclass(DivergenceError, RuntimeError)  # `except RuntimeError` keeps catching it


def test_logged_metrics(tmp_path: Path) -> None:
    logger, guard, rec = MemoryLogger(), DivergenceGuard(**FAST), Recorder()
    _trainer(tmp_path, [guard, rec], max_steps=6, logger=logger, log_every_n_steps=2).fit(Scripted(nan_at=(3,)))
    rows = [(step, m) for step, m in logger.rows if any(k.startswith("guard/") for k in m)]
    assert [step for step, _ in rows] == [1, 3, 5]  # every 2nd step, and the skip at step 3
    assert [m["guard/skipped_steps"] for _, m in rows] == [0.0, 1.0, 1.0]
    assert set(rows[0][1]) == {
        "guard/skipped_steps",
        "guard/rollbacks",
        "guard/loss_baseline",
        "guard/grad_norm",
        "guard/lr_factor",
    }
    assert rows[0][1]["guard/grad_norm"] == pytest.approx(rec.grad_norms[1], rel=1e-5)
    assert math.isnan(rows[1][1]["guard/grad_norm"])
    assert rows[2][1]["guard/loss_baseline"] == pytest.approx(sorted(rec.losses[s] for s in (0, 1, 2, 4, 5))[2])


def test_bf16_mixed(tmp_path: Path) -> None:
    guard, rec = DivergenceGuard(**FAST), Recorder()
    _trainer(tmp_path, [guard, rec], max_steps=6, precision="bf16-mixed").fit(Scripted("adam", nan_at=(2,)))
    assert same_state(rec.after[2], rec.before[2])
    assert guard.skipped_steps == 1 and math.isfinite(rec.losses[5])


def _fp16_plugin() -> MixedPrecision:
    # A real GradScaler on CPU (Lightning turns "16-mixed" into bf16 on CPU); a small initial scale
    # keeps the scripted finite spikes from overflowing fp16.
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=64.0))


def test_fp16_scaler_skips_are_counted_apart_unless_they_persist(tmp_path: Path) -> None:
    guard, rec = DivergenceGuard(rollback_after=2, scaler_patience=1, **FAST), Recorder()
    trainer = _trainer(tmp_path, [guard, rec], max_steps=8, plugins=[_fp16_plugin()])
    trainer.fit(Scripted("sgd", nan_at=(2, 4, 5, 6)))
    # Step 2: one scaler skip. Steps 4-6: scaler skip, then beyond patience: bad, bad -> rollback.
    assert guard.state_dict() == {
        "skipped_steps": 2,
        "rollbacks": 1,
        "scaler_skips": 2,
        "lr_factor": 0.5,
        "rewarm_done": 0,
        "rewarm_factor": 1.0,
    }
    assert same_state(rec.after[2]["params"], rec.before[2]["params"])


def test_fp16_fused_optimizer_guard_skip(tmp_path: Path) -> None:
    # A fused optimizer unscales inside step(); with no gradients the scaler would assert.
    guard, rec = DivergenceGuard(**FAST), Recorder()
    trainer = _trainer(tmp_path, [guard, rec], max_steps=8, plugins=[_fp16_plugin()])
    trainer.fit(Scripted("fused_adam", loss_multiplier={5: 30.0}))
    assert guard.skipped_steps == 1 and guard.scaler_skips == 0
    assert same_state(rec.after[5], rec.before[5])


def test_works_on_lightning_boring_model(tmp_path: Path) -> None:
    logger, guard = MemoryLogger(), DivergenceGuard()
    trainer = _trainer(tmp_path, [guard], max_steps=5, logger=logger, log_every_n_steps=1)
    trainer.fit(BoringModel(), datamodule=BoringDataModule())
    steps = [step for step, m in logger.rows if "guard/grad_norm" in m]
    assert steps == [0, 1, 2, 3, 4] and guard.skipped_steps == 0


class ManualModule(Scripted):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def test_manual_optimization_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="automatic optimization"):
        _trainer(tmp_path, [DivergenceGuard()]).fit(ManualModule())


def test_checkpoint_resume_keeps_counters_and_backoff(tmp_path: Path) -> None:
    guard = DivergenceGuard(rollback_after=1, **FAST)
    trainer = _trainer(tmp_path, [guard], max_steps=8)  # one epoch, so the resume is at its end
    trainer.fit(Scripted("sgd", nan_at=(2,)))
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    assert guard.state_dict() == {
        "skipped_steps": 1,
        "rollbacks": 1,
        "scaler_skips": 0,
        "lr_factor": 0.5,
        "rewarm_done": 0,
        "rewarm_factor": 1.0,
    }

    resumed, rec = DivergenceGuard(rollback_after=1, **FAST), Recorder()
    _trainer(tmp_path, [resumed, rec], max_steps=10).fit(Scripted("sgd"), ckpt_path=tmp_path / "mid.ckpt")
    assert resumed.state_dict() == {
        "skipped_steps": 1,
        "rollbacks": 1,
        "scaler_skips": 0,
        "lr_factor": 0.5,
        "rewarm_done": 0,
        "rewarm_factor": 1.0,
    }
    assert min(rec.lrs) == 8 and rec.lrs[8] == pytest.approx(0.05)  # from the optimizer state, not applied twice


def test_resumed_in_the_middle_of_the_climb_rolls_back_to_the_rates_of_a_run_without_the_stop(tmp_path: Path) -> None:
    """NaN at steps 2 and 12; the climb after the first rollback runs over steps 3-12. A run stopped
    at step 6 and resumed must end at the LR of the run that was not stopped (0.1 x 0.5 x 0.5)."""

    def guard() -> DivergenceGuard:
        return DivergenceGuard(rollback_after=1, rewarm_steps=10, rewarm_start_factor=0.1, **FAST)

    whole = Recorder()
    _trainer(tmp_path, [guard(), whole], max_steps=24).fit(Scripted("sgd", nan_at=(2, 12)))
    stopped = guard()
    trainer = _trainer(tmp_path, [stopped], max_steps=6)
    trainer.fit(Scripted("sgd", nan_at=(2, 12)))
    assert 0.1 < stopped.rewarm_factor < 1.0  # in the middle of the climb
    trainer.save_checkpoint(tmp_path / "climbing.ckpt")
    resumed, rec = guard(), Recorder()
    _trainer(tmp_path, [resumed, rec], max_steps=24).fit(
        Scripted("sgd", nan_at=(2, 12)), ckpt_path=tmp_path / "climbing.ckpt"
    )
    assert resumed.rollbacks == 2 and resumed.rewarm_factor == 1.0
    assert whole.lrs[23] == pytest.approx(0.025)
    assert rec.lrs[23] == pytest.approx(whole.lrs[23])


def test_a_second_fit_counts_on_but_its_fresh_optimizer_has_no_backoff(tmp_path: Path) -> None:
    guard = DivergenceGuard(rollback_after=1, **FAST)
    _trainer(tmp_path, [guard], max_steps=4).fit(Scripted(nan_at=(1,)))
    assert (guard.rollbacks, guard.lr_factor) == (1, 0.5)
    trainer = _trainer(tmp_path, [guard], max_steps=4)
    trainer.fit(Scripted())
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1)
    assert (guard.rollbacks, guard.lr_factor) == (1, 1.0), "lr_factor says what the optimizer's rates hold"


# ---------------------------------------------------------------------- distributed


class DumpState(Callback):
    """Each rank writes its state around every optimizer step, its final parameters and counters."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows: dict[str, Any] = {"before": {}, "after": {}}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.rows["before"][trainer.global_step] = _state(pl_module, trainer.optimizers[0])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.rows["after"][trainer.global_step - 1] = _state(pl_module, trainer.optimizers[0])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        guard = next(c for c in trainer.callbacks if isinstance(c, DivergenceGuard))
        self.rows["final"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.rows["guard"] = guard.state_dict()
        self.rows["global_step"] = trainer.global_step
        torch.save(self.rows, self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_bad_steps_on_one_rank_skip_roll_back_and_stop_on_both(tmp_path: Path) -> None:
    guard = DivergenceGuard(rollback_after=2, max_rollbacks=1, on_stop="stop", **FAST)
    trainer = _trainer(tmp_path, [guard, DumpState(tmp_path)], strategy="ddp_fork", devices=2, max_steps=20)
    # Rank 1 only: NaN loss at step 2; at step 5 a loss offset of +1000, which leaves the gradients
    # (all-reduced by DDP, so equal on both ranks) unchanged: only rank 1 sees the spike locally.
    # From step 7 on NaN for good: steps 7-8 roll back, 9 skips, 10 stops.
    trainer.fit(Scripted("adam", nan_at=(2, *range(7, 20)), loss_offset={5: 1000.0}, nan_rank=1))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rows in ranks:
        assert rows["guard"] == {
            "skipped_steps": 6,
            "rollbacks": 1,
            "scaler_skips": 0,
            "lr_factor": 0.5,
            "rewarm_done": 0,
            "rewarm_factor": 1.0,
        }
        assert rows["global_step"] == 11  # stopped after step 10, on both ranks
        for step in range(7):
            assert same_state(rows["after"][step], rows["before"][step]) is (step in (2, 5))
        assert same_state(rows["after"][8]["params"], rows["before"][0]["params"])  # the snapshot at train start
        assert same_state(rows["final"], rows["before"][0]["params"])  # the stop puts it back there too
    assert same_state(ranks[0]["final"], ranks[1]["final"])
    assert same_state(ranks[0]["after"], ranks[1]["after"])  # replicas identical at every step
    saved = torch.load(tmp_path / "divergence.ckpt", weights_only=False)
    assert saved["global_step"] == 11 and saved["callbacks"][guard.state_key]["rollbacks"] == 1


# ---------------------------------------------------------------------- recovery: climb back


def test_after_a_rollback_the_lr_climbs_back_to_the_lowered_rate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=GUARD_LOGGER)
    guard = DivergenceGuard(
        rollback_after=2,
        max_rollbacks=None,
        rewarm_steps=4,
        rewarm_start_factor=0.25,
        window=5,
        warmup=3,
        snapshot_every=2,
    )
    rec = Recorder()
    trainer = _trainer(tmp_path, [guard, rec], max_steps=14)
    trainer.fit(Scripted("sgd", nan_at=(3, 4, 10, 11)))
    assert guard.rollbacks == 2 and guard.lr_factor == 0.25
    # Rolled back at step 4 to 0.1 x 0.5; then 0.25, 0.4375, 0.625, 0.8125 of that, then all of it
    # (steps 10 and 11 are the bad ones before the second rollback).
    climb = [0.25, 0.4375, 0.625, 0.8125, 1.0, 1.0, 1.0]
    assert [rec.lrs[s] for s in range(5, 12)] == pytest.approx([0.05 * f for f in climb])
    # The second rollback lowers the climbed-back rate, not a rate caught mid-climb.
    assert [rec.lrs[s] for s in (12, 13)] == pytest.approx([0.025 * 0.25, 0.025 * 0.4375])
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx([0.025 * 0.625])
    # No snapshot during the climb (steps 5-8, where one was due every 2 good steps): the second
    # rollback goes back to the first snapshot after it, step 9.
    rollbacks = [m for m in _messages(caplog) if "rolled back" in m]
    assert [re.search(r"snapshot from step (\d+)", m).group(1) for m in rollbacks] == ["1", "9"]
