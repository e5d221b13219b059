"""ThroughputMeter, the adapter: one real-Trainer path per behaviour (the numbers are tested on the
engine in tests/core/test_throughput.py)."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lit_accel.callbacks.throughput_meter as tm
import lit_accel.core.throughput as tp
from helpers import FakeClock, MemoryLogger
from lit_accel.callbacks.throughput_meter import ThroughputMeter

# --------------------------------------------------------------------------- helpers


CLOCK = FakeClock()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    CLOCK.t = 0.0
    monkeypatch.setattr(ThroughputMeter, "clock", CLOCK)
    return CLOCK


def _xy(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 2, (n,), generator=g))


class ScriptedModule(L.LightningModule):
    """Tiny linear model; the clock advances by ``waits[i]`` before training batch i reaches the
    model (data wait) and by ``computes[i]`` inside its training step; validation costs 100 s."""

    def __init__(
        self,
        waits: list[float] | None = None,
        computes: list[float] | None = None,
        flops_per_sample: float | None = None,
        clock: FakeClock = CLOCK,
    ) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 2)
        self.waits = waits
        self.computes = computes
        self.flops_per_sample = flops_per_sample
        self.clock = clock
        self.i = 0
        self.last_size = 0

    @property
    def flops_per_batch(self) -> float | None:
        return None if self.flops_per_sample is None else self.flops_per_sample * self.last_size

    def on_before_batch_transfer(self, batch, dataloader_idx):
        if self.trainer.training:
            self.last_size = len(batch[0])
            if self.waits is not None:
                self.clock.advance(self.waits[self.i])
        return batch

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.computes is not None:
            self.clock.advance(self.computes[self.i])
        self.i += 1
        return nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        self.clock.advance(100.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path: Path, meter: ThroughputMeter, logger: Logger | bool, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=logger,
        callbacks=[meter],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,  # only silences Lightning's "fewer batches than the logging interval" warning
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


# ------------------------------------------------------------------------------ through a Trainer
def test_exact_rates_data_wait_and_mfu_from_scripted_timings(tmp_path, clock):
    """6 batches of 4; warm-up 2; logging every 2 batches; validation (100 s a batch, also the
    sanity check) after batch 2 and at the end must not count. The module's ``flops_per_batch``
    (1000 per sample) is used, not counted; rows sit at the steps Lightning logs ``self.log`` at."""
    waits = [0.5, 0.5, 0.25, 0.75, 0.5, 1.5]
    computes = [1.0, 1.0, 1.75, 1.25, 1.5, 2.5]
    model = ScriptedModule(waits, computes, flops_per_sample=1000.0)
    meter = ThroughputMeter(log_every_n_steps=2, warmup_steps=2, peak_flops_per_sec=1e6)
    logger = MemoryLogger(prefix="throughput/")
    trainer = _trainer(tmp_path, meter, logger, num_sanity_val_steps=1, val_check_interval=3, limit_val_batches=1)
    trainer.fit(model, DataLoader(_xy(24), batch_size=4), DataLoader(_xy(4), batch_size=4))

    assert [s for s, _ in logger.rows] == [3, 5, 5]  # batches 0-1 are warm-up: nothing at step 1
    # batches 2-3: 8 samples in 0.25 + 1.75 + 0.75 + 1.25 = 4 s, of which 1 s data wait
    assert logger.at(3, "throughput/samples_per_sec") == pytest.approx(2.0)
    assert logger.at(3, "throughput/global_samples_per_sec") == pytest.approx(2.0)
    assert logger.at(3, "throughput/batches_per_sec") == pytest.approx(0.5)
    assert logger.at(3, "throughput/step_time") == pytest.approx(2.0)
    assert logger.at(3, "throughput/step_time_max") == pytest.approx(2.0)
    assert logger.at(3, "throughput/data_wait_fraction") == pytest.approx(0.25)
    assert logger.at(3, "throughput/flops_per_sample") == pytest.approx(1000.0)
    assert logger.at(3, "throughput/flops_per_sec") == pytest.approx(2000.0)
    assert logger.at(3, "throughput/mfu") == pytest.approx(2000.0 / 1e6)
    assert logger.at(3, "throughput/peak_memory_mb") > 0
    # batches 4-5: 8 samples in 0.5 + 1.5 + 1.5 + 2.5 = 6 s, 2 s waiting
    assert logger.at(5, "throughput/samples_per_sec") == pytest.approx(8 / 6)
    assert logger.at(5, "throughput/data_wait_fraction") == pytest.approx(2 / 6)
    # the epoch: batches 2-5, 16 samples in 10 s
    assert logger.at(5, "throughput/epoch_samples_per_sec") == pytest.approx(1.6)
    assert logger.at(5, "throughput/epoch_global_samples_per_sec") == pytest.approx(1.6)
    assert logger.at(5, "throughput/epoch_data_wait_fraction") == pytest.approx(0.3)
    assert logger.at(5, "throughput/epoch_step_time_max") == pytest.approx(2.5)
    assert logger.at(5, "throughput/epoch_mfu") == pytest.approx(1600.0 / 1e6)
    logged = logger.keys()  # MemoryLogger.keys(): every metric name logged so far
    assert "throughput/epoch_peak_memory_mb" not in logged
    assert meter.flops.counted == {}
    assert meter.state_dict() == {
        "samples": 16,
        "batches": 4,
        "wait": 3.0,
        "compute": 7.0,
        "flops": 16000.0,
        "flops_missing": 0,
        "unsized": 0,
    }


class SizeDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_xy(12), batch_size=self.batch_size)


class BatchSizeSwitcher(Callback):
    """Plays the dynamic batch-size callback: at the end of epoch 0 it switches to ``new_size`` and
    tells every callback that speaks the protocol (no import of the meter)."""

    def __init__(self, new_size: int) -> None:
        self.new_size = new_size

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            trainer.datamodule.batch_size = self.new_size
            for cb in trainer.callbacks:
                if callable(getattr(cb, "on_batch_size_changed", None)):
                    cb.on_batch_size_changed(trainer, pl_module, self.new_size)


def test_mid_fit_batch_size_change_recounts_flops_and_warms_up_again(tmp_path, clock):
    """12 samples: epoch 0 in batches of 4 (3 batches), epoch 1 in batches of 3 (4 batches).
    Warm-up 2 in each window; the first batch of each size is FLOP-counted, never timed."""
    model = ScriptedModule(waits=[0.0] * 7, computes=[1.0] * 7)
    meter = ThroughputMeter(log_every_n_steps=100, warmup_steps=2, peak_flops_per_sec=1e9)
    logger = MemoryLogger(prefix="throughput/")
    trainer = _trainer(
        tmp_path,
        meter,
        logger,
        max_epochs=2,
        reload_dataloaders_every_n_epochs=1,
        callbacks=[meter, BatchSizeSwitcher(3)],
    )
    trainer.fit(model, datamodule=SizeDataModule(4))

    # epoch 0: batch 2 timed (4 samples, 1 s); epoch 1: batches 2-3 timed (6 samples, 2 s)
    assert logger.at(2, "throughput/epoch_samples_per_sec") == pytest.approx(4.0)
    assert logger.at(6, "throughput/epoch_samples_per_sec") == pytest.approx(3.0)
    assert logger.at(6, "throughput/epoch_batches_per_sec") == pytest.approx(1.0)
    # nn.Linear(8, 2) per sample: forward addmm 2*8*2 = 32, weight gradient mm 32 (the input needs no grad)
    assert logger.at(2, "throughput/epoch_flops_per_sample") == pytest.approx(64.0)
    assert logger.at(6, "throughput/epoch_flops_per_sample") == pytest.approx(64.0)
    assert meter.flops.counted == {3: 192.0}  # forgotten at the change, then counted for size 3
    assert meter.state_dict()["samples"] == 10


class DictDataset(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": torch.full((5,), float(i)), "target": torch.tensor(float(i % 2))}


class PlainDataModule(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(DictDataset(), batch_size=3)


class PlainModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1))

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.head(batch["features"]).squeeze(1), batch["target"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters())


def test_works_on_a_minimal_module_and_datamodule_with_dict_batches(tmp_path, monkeypatch):
    """Any module and data module: dict batches, partial last batch, FLOPs counted, CPU MFU, summary."""
    summaries: list[str] = []
    monkeypatch.setattr(tm, "rank_zero_info", summaries.append)
    monkeypatch.setattr(tp, "CPU_PEAK_CACHE", {(torch.float32, torch.get_num_threads()): 1e9})  # no benchmark
    meter = ThroughputMeter(log_every_n_steps=4, warmup_steps=0)
    logger = MemoryLogger(prefix="throughput/")
    _trainer(tmp_path, meter, logger, max_epochs=2).fit(PlainModule(), datamodule=PlainDataModule())

    # 10 samples in batches of 3, 3, 3, 1; epoch 0 counts sizes 3 and 1, so batches 1, 2 are timed
    assert meter.flops.counted.keys() == {3, 1}
    assert meter.state_dict()["samples"] == 3 + 3 + 10
    assert {"throughput/samples_per_sec", "throughput/mfu", "throughput/epoch_global_samples_per_sec"} <= logger.keys()
    assert any("ThroughputMeter summary" in s for s in summaries)
    assert any("1.0 GFLOP/s" in s for s in summaries)  # MFU against the CPU's matmul peak
    # the printed summary's figures, kept for scripts to read
    assert meter.summary["mfu"] > 0 and meter.summary["peak_memory_mb_max"] > 0
    assert meter.summary["global_samples_per_sec"] == pytest.approx(meter.summary["samples_per_sec"])


def test_checkpoint_resume_restores_totals_and_validate_and_pickle_after_fit(tmp_path, clock):
    """No logger, no FLOPs: the totals survive a resume; validate after fit and pickling still work."""

    def fit(max_epochs: int, ckpt_path: str | None) -> tuple[ThroughputMeter, L.Trainer, ScriptedModule]:
        meter = ThroughputMeter(log_every_n_steps=10, warmup_steps=0, measure_flops=False, print_summary=False)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer = _trainer(
            tmp_path, meter, False, max_epochs=max_epochs, enable_checkpointing=True, callbacks=[meter, checkpoint]
        )
        model = ScriptedModule(waits=[0.5] * 4, computes=[1.0] * 4)
        trainer.fit(model, DataLoader(_xy(8), batch_size=4), ckpt_path=ckpt_path)
        return meter, trainer, model

    first, _, _ = fit(1, None)
    assert first.state_dict()["samples"] == 8
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"][first.state_key]
    assert saved == {
        "samples": 8,
        "batches": 2,
        "wait": 1.0,
        "compute": 2.0,
        "flops": 0.0,
        "flops_missing": 2,
        "unsized": 0,
    }
    resumed, trainer, model = fit(2, str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.state_dict() == {
        "samples": 16,
        "batches": 4,
        "wait": 2.0,
        "compute": 4.0,
        "flops": 0.0,
        "flops_missing": 4,
        "unsized": 0,
    }
    assert "mfu" not in resumed.summary and "flops_per_sec" not in resumed.summary  # measure_flops=False
    trainer.validate(model, DataLoader(_xy(4), batch_size=4))
    assert resumed.state_dict()["batches"] == 4
    pickle.loads(pickle.dumps(resumed))  # nothing unpicklable left behind after fit


# ------------------------------------------------------------------------------ the adapter alone
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"log_every_n_steps": 2.5}, "log_every_n_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": True}, "warmup_steps"),
        ({"peak_flops_per_sec": 0.0}, "peak_flops_per_sec"),
        ({"peak_flops_per_sec": float("inf")}, "peak_flops_per_sec"),
        ({"peak_flops_per_sec": "fast"}, "peak_flops_per_sec"),
        ({"batch_size_fn": 3}, "batch_size_fn"),
        ({"measure_flops": "yes"}, "measure_flops"),
        ({"print_summary": "no"}, "print_summary"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ThroughputMeter(**kwargs)


def test_bad_announced_batch_size_raises():
    with pytest.raises(ValueError, match="batch_size"):
        ThroughputMeter().on_batch_size_changed(None, None, 0)


def test_state_is_keyed_on_identity_and_loads_older_checkpoints():
    # Keyed on identity: other settings keep the state on resume; a name tells two meters apart.
    assert ThroughputMeter(warmup_steps=1).state_key == ThroughputMeter(warmup_steps=2).state_key == "ThroughputMeter"
    assert ThroughputMeter(name="a").state_key != ThroughputMeter(name="b").state_key
    meter = ThroughputMeter()
    meter.load_state_dict({"samples": 7})  # keys missing from an older checkpoint load as zero
    assert meter.state_dict() == {**tp.Tally().state_dict(), "samples": 7}


def _setup(meter: ThroughputMeter, device: torch.device, precision: str) -> None:
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=device), log_every_n_steps=50, precision=precision)
    meter.setup(trainer, nn.Linear(1, 1), "fit")


def test_peak_for_mfu_given_from_a_table_or_none_with_one_warning(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery Accelerator 9000")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(tm, "get_available_flops", lambda device, dtype: None)  # Lightning knows nothing either
    gpu = torch.device("cuda", 0)
    meter = ThroughputMeter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _setup(meter, gpu, "bf16-mixed")
        assert meter.device_peak.flops is None
        _setup(meter, gpu, "bf16-mixed")
    messages = [str(w.message) for w in caught if "peak FLOP/s" in str(w.message)]
    assert len(messages) == 1 and "peak_flops_per_sec" in messages[0] and "Mystery" in messages[0]

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    _setup(meter, gpu, "bf16-mixed")
    assert meter.device_peak.flops == 989.4e12
    given = ThroughputMeter(peak_flops_per_sec=5e12)
    _setup(given, gpu, "bf16-mixed")
    assert given.device_peak.flops == 5e12
    no_flops = ThroughputMeter(measure_flops=False)  # and no CPU benchmark
    _setup(no_flops, torch.device("cpu"), "32-true")
    assert no_flops.device_peak.flops is None and no_flops.device_peak.note == "no FLOPs"


def test_a_gpu_missing_from_the_table_asks_lightnings_table_in_its_dtype_terms(monkeypatch):
    calls = []

    def lightning_table(device, dtype):
        calls.append(dtype)
        return 91.1e12 if dtype == torch.bfloat16 else None

    monkeypatch.setattr(tm, "get_available_flops", lightning_table)
    gpu = torch.device("cuda", 0)
    assert tm.lightning_peak_flops(gpu, "bf16") == 91.1e12
    assert tm.lightning_peak_flops(gpu, "tf32") is None
    assert calls == [torch.bfloat16, "tf32"]


# ------------------------------------------------------------------------------------------ DDP
class RankScriptedModule(ScriptedModule):
    """Rank r takes (r + 1) s of compute per batch; installs the scripted clock in its process."""

    def setup(self, stage: str) -> None:
        ThroughputMeter.clock = self.clock  # type: ignore[method-assign]  # in the rank's own process
        self.computes = [float(self.global_rank + 1)] * 8
        self.waits = [0.0] * 8


class WriteTotals(Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        meter = next(cb for cb in trainer.callbacks if isinstance(cb, ThroughputMeter))
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(meter.state_dict()))


@pytest.mark.slow
def test_ddp_two_processes_global_rate_is_the_sum_and_slowest_step_is_reported(tmp_path):
    # 16 samples, 8 per rank in batches of 4, 2 epochs: 4 batches per rank; batch 0 is FLOP-counted
    meter = ThroughputMeter(log_every_n_steps=2, warmup_steps=0, peak_flops_per_sec=1e6, print_summary=False)
    logger = MemoryLogger(prefix="throughput/", path=str(tmp_path / "rank0_log.jsonl"))
    trainer = _trainer(
        tmp_path,
        meter,
        logger,
        strategy="ddp_fork",
        devices=2,
        max_epochs=2,
        callbacks=[meter, WriteTotals(str(tmp_path))],
    )
    trainer.fit(RankScriptedModule(), DataLoader(_xy(16), batch_size=4))

    rows = [json.loads(line) for line in (tmp_path / "rank0_log.jsonl").read_text().splitlines()]
    logged = {(step, k): v for step, row in rows for k, v in row.items()}
    totals = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    rank_rates = [t["samples"] / t["compute"] for t in totals]
    assert rank_rates == [4.0, 2.0]  # 4 samples per batch in 1 s and in 2 s
    for step in (1, 3):
        assert logged[(step, "throughput/samples_per_sec")] == pytest.approx(4.0)  # rank 0's own
        assert logged[(step, "throughput/global_samples_per_sec")] == pytest.approx(sum(rank_rates))
        assert logged[(step, "throughput/step_time_max")] == pytest.approx(2.0)  # rank 1, the straggler
        assert logged[(step, "throughput/step_time")] == pytest.approx(1.0)
    # the real FLOPs of nn.Linear(8, 2) were counted under DDP too (64 per sample, see above)
    assert logged[(3, "throughput/flops_per_sample")] == pytest.approx(64.0)
    assert logged[(3, "throughput/global_flops_per_sec")] == pytest.approx(64.0 * 6)
    assert logged[(3, "throughput/mfu")] == pytest.approx(64.0 * 6 / 2e6)
    assert logged[(3, "throughput/epoch_global_samples_per_sec")] == pytest.approx(6.0)
