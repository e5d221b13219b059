"""Tests for ThroughputMeter: scripted clock, real Trainers, FLOPs, DDP, checkpoints."""

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
from helpers import MemoryLogger
from lit_accel.callbacks.throughput_meter import ThroughputMeter
from lit_accel.models import SeedCNN

# --------------------------------------------------------------------------- helpers


class FakeClock:
    """A clock that moves only when the test says so (seconds)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


CLOCK = FakeClock()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    CLOCK.t = 0.0
    monkeypatch.setattr(tm, "_clock", CLOCK)
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


# ------------------------------------------------------------------ scripted clock


def test_exact_rates_data_wait_and_mfu_from_scripted_timings(tmp_path, clock):
    """6 batches of 4; warm-up 2; logging every 2 batches; validation (100 s a batch, also the
    sanity check) after batch 2 and at the end must not count."""
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
    assert meter.state_dict() == {
        "samples": 16,
        "batches": 4,
        "wait": 3.0,
        "compute": 7.0,
        "flops": 16000.0,
        "flops_missing": 0,
        "unsized": 0,
    }


def test_partial_last_batch_is_counted(tmp_path, clock):
    """10 samples in batches of 4, 4, 2, for two epochs: each log covers exactly 10 samples in 3 s."""
    model = ScriptedModule(waits=[0.0] * 6, computes=[1.0] * 6)
    meter = ThroughputMeter(log_every_n_steps=3, warmup_steps=0, measure_flops=False)
    logger = MemoryLogger(prefix="throughput/")
    _trainer(tmp_path, meter, logger, max_epochs=2).fit(model, DataLoader(_xy(10), batch_size=4))

    for step in (2, 5):
        assert logger.at(step, "throughput/samples_per_sec") == pytest.approx(10 / 3)
        assert logger.at(step, "throughput/epoch_samples_per_sec") == pytest.approx(10 / 3)
        assert logger.at(step, "throughput/batches_per_sec") == pytest.approx(1.0)
    logged = logger.keys()  # MemoryLogger.keys(): every metric name logged so far
    assert "throughput/flops_per_sec" not in logged  # measure_flops=False and no module FLOPs
    assert "throughput/mfu" not in logged
    assert meter.state_dict()["samples"] == 20


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
    assert meter._flops_cache == {3: 192.0}  # forgotten at the change, then counted for size 3
    assert meter.state_dict()["samples"] == 10


def test_validation_and_sanity_check_time_are_excluded_on_host_timer(clock):
    timer = tm._HostTimer()
    clock.advance(5.0)  # e.g. validation before the epoch started
    timer.anchor()
    clock.advance(0.5)
    timer.start()
    clock.advance(2.0)
    assert timer.stop()
    clock.advance(100.0)  # validation after the batch
    timer.anchor()
    clock.advance(0.25)
    timer.start()
    clock.advance(1.0)
    assert timer.stop()
    clock.advance(3.0)
    assert not timer.stop()  # not started (warm-up batch): only re-anchors
    assert timer.drain() == (0.75, 3.0)
    assert timer.drain() == (0.0, 0.0)


class FakeEvent:
    """Stands in for torch.cuda.Event: the device 'reaches' it at the scripted clock's time."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.t: float | None = None

    def record(self, stream=None) -> None:
        self.t = CLOCK()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.t - self.t) * 1000.0  # milliseconds, like CUDA


def test_cuda_timer_bookkeeping_with_fake_events(clock, monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    timer = tm._CudaTimer(torch.device("cuda", 0))
    clock.advance(7.0)
    timer.anchor()  # e.g. end of validation: the 7 s before do not count
    clock.advance(0.5)
    timer.start()
    clock.advance(2.0)
    assert timer.stop()
    clock.advance(0.25)
    timer.start()
    clock.advance(1.0)
    assert timer.stop()
    assert timer.drain() == pytest.approx((0.75, 3.0))
    clock.advance(1.0)
    assert not timer.stop()  # a warm-up batch: re-anchors only
    clock.advance(0.5)
    timer.start()
    clock.advance(1.0)
    timer.stop()
    assert timer.drain() == pytest.approx((0.5, 1.0))


# ------------------------------------------------------------------------- FLOPs


def seedcnn_flops_per_sample() -> int:
    """FLOPs of one SeedCNN training sample as FlopCounterMode counts them.

    2 FLOPs per multiply-add; bias adds, ReLU, pooling, dropout and the loss are not counted.
    Backward: for each layer the weight gradient costs as much as the forward, and so does the
    input gradient, except for the first conv, whose input (the images) does not require grad:
    autograd asks convolution_backward for no grad_input there (output_mask[0] False), so that layer
    counts forward + weight gradient only (2x), the others 3x.
    """
    conv1 = 2 * (32 * 30 * 30) * (3 * 3 * 3)  # 32 maps of 30x30, each output a 3x3x3 dot product
    conv2 = 2 * (64 * 13 * 13) * (32 * 3 * 3)  # after pooling 30 -> 15; 15 - 2 = 13
    fc1 = 2 * (64 * 6 * 6) * 128  # after pooling 13 -> 6: 2,304 features
    fc2 = 2 * 128 * 10
    return 2 * conv1 + 3 * (conv2 + fc1 + fc2)


class CNNModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = SeedCNN()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _cifar_like(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_flops_auto_measured_for_seedcnn_equal_the_analytic_count(tmp_path):
    assert seedcnn_flops_per_sample() == 23_577_600
    meter = ThroughputMeter(log_every_n_steps=2, warmup_steps=0, peak_flops_per_sec=1e12)
    logger = MemoryLogger(prefix="throughput/")
    # 6 samples in batches of 4 and 2; epoch 0 counts both sizes, epoch 1 is timed
    _trainer(tmp_path, meter, logger, max_epochs=2).fit(CNNModule(), DataLoader(_cifar_like(6), batch_size=4))

    per_sample = seedcnn_flops_per_sample()
    assert meter._flops_cache == {4: 4.0 * per_sample, 2: 2.0 * per_sample}
    assert logger.at(3, "throughput/flops_per_sample") == per_sample
    assert logger.at(3, "throughput/epoch_flops_per_sample") == per_sample
    assert logger.at(3, "throughput/mfu") == pytest.approx(logger.at(3, "throughput/flops_per_sec") / 1e12)
    assert [s for s, _ in logger.rows] == [3, 3]  # epoch 0 has no timed batch: nothing logged


def test_counting_flops_during_the_real_step_does_not_change_training(tmp_path):
    def train(meter: ThroughputMeter | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        module = CNNModule()
        callbacks = [] if meter is None else [meter]
        trainer = _trainer(tmp_path, meter, False, max_steps=3, callbacks=callbacks)
        trainer.fit(module, DataLoader(_cifar_like(12), batch_size=4))
        return [p.detach().clone() for p in module.parameters()]

    with_meter = train(ThroughputMeter(warmup_steps=0, peak_flops_per_sec=1e12))
    without = train(None)
    assert all(torch.equal(a, b) for a, b in zip(with_meter, without))


def test_module_flops_per_batch_is_used_instead_of_counting(tmp_path, clock):
    model = ScriptedModule(waits=[0.0] * 4, computes=[2.0] * 4, flops_per_sample=50.0)
    meter = ThroughputMeter(log_every_n_steps=4, warmup_steps=1, peak_flops_per_sec=1e3)
    logger = MemoryLogger(prefix="throughput/")
    _trainer(tmp_path, meter, logger).fit(model, DataLoader(_xy(16), batch_size=4))
    assert meter._flops_cache == {}
    # batches 1-3 timed: 12 samples * 50 FLOPs in 6 s
    assert logger.at(3, "throughput/flops_per_sec") == pytest.approx(100.0)
    assert logger.at(3, "throughput/mfu") == pytest.approx(0.1)


# --------------------------------------------------------------------- peak FLOP/s


@pytest.mark.parametrize(
    ("name", "key", "expected"),
    [
        ("NVIDIA H200", "bf16", 989.4e12),
        ("NVIDIA H200 NVL", "bf16", 835.5e12),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.7e12),
        ("NVIDIA H100 PCIe", "fp16", 756e12),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156e12),
        ("NVIDIA A100 80GB PCIe", "bf16", 312e12),
        ("NVIDIA L4", "bf16", 121e12),
        ("NVIDIA L40S", "bf16", 362.05e12),
        ("NVIDIA L40", "fp32", 90.5e12),
        ("Tesla T4", "fp16", 65e12),
        ("Tesla T4", "bf16", None),  # no bf16 on Turing
        ("Tesla V100-SXM2-16GB", "fp32", 15.7e12),
        ("NVIDIA GeForce GTX 1080", "fp32", None),
    ],
)
def test_gpu_peak_table(name, key, expected):
    assert tm._gpu_peak_flops(name, key) == expected


def test_a_gpu_missing_from_the_table_falls_back_to_lightnings(monkeypatch):
    calls = []

    def lightning_table(device, dtype):
        calls.append((device, dtype))
        return 91.1e12 if dtype == torch.bfloat16 else None

    monkeypatch.setattr(tm, "get_available_flops", lightning_table)
    gpu = torch.device("cuda", 0)
    assert tm._gpu_peak_flops("NVIDIA RTX 6000 Ada Generation", "bf16", gpu) == 91.1e12
    assert tm._gpu_peak_flops("NVIDIA RTX 6000 Ada Generation", "tf32", gpu) is None  # Lightning knows nothing
    assert calls == [(gpu, torch.bfloat16), (gpu, "tf32")]
    # A GPU in lit_accel's table never asks Lightning (whose H200 row counts sparsity).
    assert tm._gpu_peak_flops("NVIDIA H200", "bf16", gpu) == 989.4e12 and len(calls) == 2


@pytest.mark.parametrize(
    ("precision", "key"),
    [
        ("32-true", "fp32"),
        ("bf16-mixed", "bf16"),
        ("bf16-true", "bf16"),
        ("16-mixed", "fp16"),
        ("64-true", "fp64"),
        ("transformer-engine", None),
    ],
)
def test_precision_to_dtype_key(precision, key):
    assert tm._precision_dtype_key(precision) == key


def test_unknown_gpu_without_override_warns_once_and_has_no_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery Accelerator 9000")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    meter = ThroughputMeter()
    meter._device = torch.device("cuda", 0)
    trainer = SimpleNamespace(precision="bf16-mixed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert meter._resolve_peak(trainer, nn.Linear(1, 1))[0] is None
        assert meter._resolve_peak(trainer, nn.Linear(1, 1))[0] is None
    messages = [str(w.message) for w in caught if "peak FLOP/s" in str(w.message)]
    assert len(messages) == 1 and "peak_flops_per_sec" in messages[0]

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert meter._resolve_peak(trainer, nn.Linear(1, 1))[0] == 989.4e12
    assert ThroughputMeter(peak_flops_per_sec=5e12)._resolve_peak(trainer, nn.Linear(1, 1))[0] == 5e12


def test_cpu_matmul_peak_is_measured_in_the_run_dtype(monkeypatch):
    seen = []
    monkeypatch.setattr(tm, "_measure_matmul_peak", lambda dtype: seen.append(dtype) or 1e10)
    monkeypatch.setattr(tm, "_CPU_PEAK_CACHE", {})
    meter = ThroughputMeter()
    assert meter._resolve_peak(SimpleNamespace(precision="bf16-mixed"), nn.Linear(1, 1))[0] == 1e10
    assert meter._resolve_peak(SimpleNamespace(precision="32-true"), nn.Linear(1, 1))[0] == 1e10
    assert meter._resolve_peak(SimpleNamespace(precision="32-true"), nn.Linear(1, 1))[0] == 1e10
    assert seen == [torch.bfloat16, torch.float32]  # measured once per dtype in a process
    no_flops = ThroughputMeter(measure_flops=False)
    assert no_flops._resolve_peak(SimpleNamespace(precision="32-true"), nn.Linear(1, 1)) == (None, "no FLOPs")


def test_real_cpu_matmul_benchmark_agrees_with_an_independent_timing():
    """The benchmark's FLOP/s is within 1.5x of the same 128x128 matmul timed here (2·n³ FLOPs over
    the fastest of 100 runs): a wrong FLOP count (2x off) or a mean instead of the best run fails.
    On one thread, so that a busy machine cannot stall a thread pool mid-run (with 2 threads and 2
    busy cores one measurement in 30 came out 460x low); best of 3 tries for the same reason."""
    import time

    size = 128
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    out = torch.mm(a, b)

    def timed_here() -> float:
        best = float("inf")
        for _ in range(100):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
        return 2 * size**3 / best

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ratios: list[float] = []
        for _ in range(3):
            peak = tm._measure_matmul_peak(torch.float32, size=size, min_seconds=0.01)
            ratios.append(peak / timed_here())
            if 1 / 1.5 < ratios[-1] < 1.5:
                break
    finally:
        torch.set_num_threads(threads)
    assert 1 / 1.5 < ratios[-1] < 1.5, ratios
    assert peak > 1e8, peak  # any CPU torch runs on: over 0.1 GFLOP/s


# ---------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    ("must_count", "window_step", "warmup", "role"),
    [
        (True, 5, 3, "count"),
        (True, 0, 3, "count"),
        (False, 2, 3, "warmup"),
        (False, 3, 3, "time"),
        (False, 0, 0, "time"),
    ],
)
def test_batch_role(must_count, window_step, warmup, role):
    assert tm._batch_role(must_count, window_step, warmup) == role


def test_metrics_sum_rates_and_take_the_slowest_step_over_ranks():
    ranks = [
        tm._Tally(samples=8, batches=2, wait=1.0, compute=3.0, flops=800.0),  # 2 samples/s
        tm._Tally(samples=8, batches=2, wait=0.0, compute=8.0, flops=800.0),  # 1 sample/s, slow
    ]
    contributions = [tm._rank_contribution(t, 1000.0, mem) for t, mem in zip(ranks, (10.0, 30.0))]
    summed = [sum(v) for v in zip(*(c[0] for c in contributions))]
    maxed = [max(v) for v in zip(*(c[1] for c in contributions))]
    m = tm._throughput_metrics(ranks[0], 1000.0, 10.0, summed, maxed, world_size=2)
    assert m["samples_per_sec"] == 2.0
    assert m["global_samples_per_sec"] == 3.0
    assert m["global_batches_per_sec"] == 0.75
    assert m["step_time"] == 2.0
    assert m["step_time_max"] == 4.0
    assert m["data_wait_fraction"] == 0.25
    assert m["data_wait_fraction_max"] == 0.25
    assert m["global_flops_per_sec"] == 300.0
    assert m["mfu"] == 300.0 / 2000.0
    assert m["peak_memory_mb"] == 10.0 and m["peak_memory_mb_max"] == 30.0


def test_metrics_extrapolate_when_a_rank_timed_nothing_and_skip_unknowns():
    timed = tm._Tally(samples=4, batches=1, wait=0.0, compute=2.0, flops_missing=1)
    idle = tm._Tally()
    (s0, m0), (s1, m1) = tm._rank_contribution(timed, None, 1.0), tm._rank_contribution(idle, None, 1.0)
    summed = [a + b for a, b in zip(s0, s1)]
    maxed = [max(a, b) for a, b in zip(m0, m1)]
    m = tm._throughput_metrics(idle, None, 1.0, summed, maxed, world_size=2)
    assert "samples_per_sec" not in m  # rank 0 (idle) has nothing of its own
    assert m["global_samples_per_sec"] == 4.0  # 2 samples/s from the one timed rank, times 2 ranks
    assert "flops_per_sec" not in m and "global_flops_per_sec" not in m and "mfu" not in m
    nothing = tm._throughput_metrics(idle, None, 1.0, s1, m1, world_size=1)
    assert set(nothing) == {"peak_memory_mb", "peak_memory_mb_max"}


def test_summary_table_lists_rates_mfu_wait_memory_and_time():
    text = tm._format_summary(
        {
            "global_samples_per_sec": 12345.6,
            "samples_per_sec": 6172.8,
            "mfu": 0.123,
            "data_wait_fraction": 0.041,
            "data_wait_fraction_max": 0.05,
            "peak_memory_mb_max": 812.0,
        },
        world_size=2,
        batches=1234,
        timed_seconds=123.4,
        wall_seconds=130.2,
        peak_note="given",
    )
    for part in ("12,345.6", "6,172.8", "12.3%", "4.1%", "5.0%", "812 MiB", "123.4 s", "130.2 s", "2 rank(s)"):
        assert part in text
    assert "n/a" in tm._format_summary({}, 1, 0, 0.0, 0.0, "no peak")


# ------------------------------------------------------------ any module/datamodule


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
    summaries: list[str] = []
    monkeypatch.setattr(tm, "rank_zero_info", summaries.append)
    monkeypatch.setattr(tm, "_measure_matmul_peak", lambda dtype: 1e9)
    monkeypatch.setattr(tm, "_CPU_PEAK_CACHE", {})
    meter = ThroughputMeter(log_every_n_steps=4, warmup_steps=0)
    logger = MemoryLogger(prefix="throughput/")
    _trainer(tmp_path, meter, logger, max_epochs=2).fit(PlainModule(), datamodule=PlainDataModule())

    # 10 samples in batches of 3, 3, 3, 1; epoch 0 counts sizes 3 and 1, so batches 1, 2 are timed
    assert meter._flops_cache.keys() == {3, 1}
    assert meter.state_dict()["samples"] == 3 + 3 + 10
    assert {"throughput/samples_per_sec", "throughput/mfu", "throughput/epoch_global_samples_per_sec"} <= logger.keys()
    assert any("ThroughputMeter summary" in s for s in summaries)
    # the printed summary's figures, kept for scripts to read
    assert meter.summary["mfu"] > 0 and meter.summary["peak_memory_mb_max"] > 0
    assert meter.summary["global_samples_per_sec"] == pytest.approx(meter.summary["samples_per_sec"])


def test_without_logger_and_with_validation_only_run(tmp_path, clock):
    model = ScriptedModule(waits=[0.0] * 4, computes=[1.0] * 4)
    meter = ThroughputMeter(log_every_n_steps=1, warmup_steps=0, measure_flops=False, print_summary=False)
    trainer = _trainer(tmp_path, meter, False, limit_val_batches=1)
    trainer.fit(model, DataLoader(_xy(8), batch_size=4))
    trainer.validate(model, DataLoader(_xy(4), batch_size=4))
    assert meter.state_dict()["batches"] == 2
    pickle.loads(pickle.dumps(meter))  # nothing unpicklable left behind after fit


# -------------------------------------------------------------- state and checkpoints


def test_state_dict_round_trip_and_missing_keys_load_as_zero():
    meter = ThroughputMeter(warmup_steps=1)
    meter._total = tm._Tally(samples=40, batches=10, wait=1.5, compute=8.5, flops=4e6, flops_missing=0, unsized=0)
    other = ThroughputMeter(warmup_steps=1)
    other.load_state_dict(meter.state_dict())
    assert other.state_dict() == meter.state_dict()
    other.load_state_dict({"samples": 7})  # an older checkpoint with fewer keys
    assert other.state_dict()["samples"] == 7 and other.state_dict()["compute"] == 0.0
    # Keyed on identity: other settings keep the state on resume; a name tells two meters apart.
    assert ThroughputMeter(warmup_steps=1).state_key == ThroughputMeter(warmup_steps=2).state_key == "ThroughputMeter"
    assert ThroughputMeter(name="a").state_key != ThroughputMeter(name="b").state_key


def test_checkpoint_resume_restores_totals(tmp_path, clock):
    def fit(max_epochs: int, ckpt_path: str | None) -> ThroughputMeter:
        meter = ThroughputMeter(log_every_n_steps=10, warmup_steps=0, measure_flops=False, print_summary=False)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer = _trainer(
            tmp_path, meter, False, max_epochs=max_epochs, enable_checkpointing=True, callbacks=[meter, checkpoint]
        )
        model = ScriptedModule(waits=[0.5] * 4, computes=[1.0] * 4)
        trainer.fit(model, DataLoader(_xy(8), batch_size=4), ckpt_path=ckpt_path)
        return meter

    first = fit(1, None)
    assert first.state_dict()["samples"] == 8
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][first.state_key]
    assert saved["samples"] == 8 and saved["wait"] == 1.0 and saved["compute"] == 2.0
    resumed = fit(2, str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.state_dict() == {
        "samples": 16,
        "batches": 4,
        "wait": 2.0,
        "compute": 4.0,
        "flops": 0.0,
        "flops_missing": 4,
        "unsized": 0,
    }


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


# --------------------------------------------------------------------------- DDP


class RankScriptedModule(ScriptedModule):
    """Rank r takes (r + 1) s of compute per batch; installs the scripted clock in its process."""

    def setup(self, stage: str) -> None:
        tm._clock = self.clock
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


class LoggingModule(ScriptedModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss_step", loss)
        return loss


def test_logged_at_the_steps_lightning_logs_its_own_metrics_at(tmp_path, clock):
    """One step's curves line up: the meter's rows share the step axis of Lightning's `self.log`."""
    model = LoggingModule(waits=[0.0] * 6, computes=[0.01] * 6)
    meter = ThroughputMeter(warmup_steps=0, measure_flops=False)
    logger = MemoryLogger()
    _trainer(tmp_path, meter, logger, log_every_n_steps=2).fit(model, DataLoader(_xy(24), batch_size=4))
    lightning_steps = {step for step, row in logger.rows if "train/loss_step" in row}
    meter_steps = {step for step, row in logger.rows if "throughput/samples_per_sec" in row}
    assert lightning_steps == {1, 3, 5} and meter_steps == lightning_steps
