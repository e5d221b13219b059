"""Tests for lit_accel.core.throughput: numbers in, numbers out, a fake clock, no Trainer."""

from __future__ import annotations

import pytest
import torch

from helpers import FakeClock
from lit_accel.core import throughput as tp
from lit_accel.core.throughput import StepTimer, TimedSteps
from lit_accel.models import SeedCNN


class FakeEvent:
    """Stands in for torch.cuda.Event: the device 'reaches' it at the fake clock's time."""

    clock: FakeClock
    synchronized = 0

    def __init__(self, enable_timing: bool = False) -> None:
        self.t: float | None = None

    def record(self, stream: object = None) -> None:
        self.t = self.clock()

    def synchronize(self) -> None:
        FakeEvent.synchronized += 1

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.t is not None and end.t is not None
        return (end.t - self.t) * 1000.0  # milliseconds, like CUDA


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    clock = FakeClock()
    FakeEvent.clock = clock
    FakeEvent.synchronized = 0
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    return clock


# ------------------------------------------------------------------------------------ StepTimer
def _script(timer: StepTimer, clock: FakeClock) -> None:
    """Validation before, a timed step, validation after, a timed step, an untimed (warm-up) step."""
    clock.advance(5.0)  # e.g. validation before the epoch started: not counted
    timer.anchor()
    clock.advance(0.5)  # wait
    timer.start()
    clock.advance(2.0)  # compute
    assert timer.stop()
    clock.advance(100.0)  # validation after the step: dropped by the anchor
    timer.anchor()
    clock.advance(0.25)
    timer.start()
    clock.advance(1.0)
    assert timer.stop()
    clock.advance(3.0)
    assert not timer.stop()  # never started (warm-up step): only marks the loop ready


def test_host_timer_splits_wait_and_compute_and_leaves_out_what_an_anchor_drops():
    clock = FakeClock()
    timer = StepTimer(clock=clock)
    _script(timer, clock)
    assert timer.read() == TimedSteps(2, 0.75, 3.0)
    assert timer.read() == TimedSteps(0, 0.0, 0.0)  # read forgets
    clock.advance(0.5)  # wait after the untimed step's stop counts for the next step
    timer.start()
    clock.advance(1.0)
    timer.stop()
    assert timer.read().seconds == 1.5


def test_cuda_timer_reads_events_and_synchronizes_only_when_read(fake_cuda):
    timer = StepTimer("cuda:0")
    _script(timer, fake_cuda)
    assert FakeEvent.synchronized == 0
    steps, wait, compute = timer.read()
    assert (steps, wait, compute) == (2, pytest.approx(0.75), pytest.approx(3.0))
    assert FakeEvent.synchronized == 1
    assert timer.read() == TimedSteps(0, 0.0, 0.0)
    assert FakeEvent.synchronized == 1  # nothing to wait for: no synchronization


def test_a_started_step_is_dropped_by_an_anchor():
    clock = FakeClock()
    timer = StepTimer(clock=clock)
    timer.start()
    clock.advance(9.0)
    timer.anchor()  # e.g. the step raised or was abandoned
    assert not timer.stop()
    assert timer.read() == TimedSteps(0, 0.0, 0.0)


# ------------------------------------------------------------------------------------ peak memory
def test_peak_rss_reset_starts_a_new_window():
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    high = tp.peak_rss_mb()
    del big
    if not tp.reset_peak_rss():
        pytest.skip("this system cannot reset the peak RSS (/proc/self/clear_refs)")
    assert tp.peak_rss_mb() < high - 32
    assert tp.peak_memory_mb("cpu") == pytest.approx(tp.peak_rss_mb(), abs=8)


def test_releasing_free_host_memory_trims_the_c_allocator(monkeypatch):
    """glibc's malloc_trim(0) hands back what the allocator keeps free (the heap layout decides how
    much, so the effect is measured in BENCHMARKS.md, not here); without it, nothing is done."""
    calls = []

    class Libc:
        class malloc_trim:  # noqa: N801  # the C function's name
            def __new__(cls, pad):
                calls.append(pad)
                return 1

    monkeypatch.setattr(tp.ctypes, "CDLL", lambda name: Libc)
    assert tp.release_free_host_memory() and calls == [0]
    monkeypatch.setattr(tp.ctypes, "CDLL", lambda name: object())  # a C library without malloc_trim
    assert not tp.release_free_host_memory() and calls == [0]


def test_cuda_peak_memory_reads_and_resets_the_device_figures(monkeypatch):
    calls: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: calls.append(("max", d)) or 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", d)))
    monkeypatch.setattr(tp, "reset_peak_rss", lambda: True)
    assert tp.peak_memory_mb("cuda:1") == 3.0
    assert tp.reset_peak_memory(torch.device("cuda", 1))
    assert calls == [("max", torch.device("cuda", 1)), ("reset", torch.device("cuda", 1))]


# ------------------------------------------------------------------------------------ Tally
def test_tally_counts_steps_and_round_trips_through_a_state_dict():
    tally = tp.Tally()
    tally.count(4, 400.0)
    tally.count(None, None)  # size and FLOPs unknown
    tally.add(tp.Tally(wait=0.5, compute=2.5))
    assert tally == tp.Tally(samples=4, batches=2, wait=0.5, compute=2.5, flops=400.0, flops_missing=1, unsized=1)
    assert tally.seconds == 3.0
    # the checkpoint format: the field names, plain numbers
    state = tally.state_dict()
    assert state == {
        "samples": 4,
        "batches": 2,
        "wait": 0.5,
        "compute": 2.5,
        "flops": 400.0,
        "flops_missing": 1,
        "unsized": 1,
    }
    assert tp.Tally.from_state_dict(state) == tally
    older = tp.Tally.from_state_dict({"samples": 7})  # an older checkpoint with fewer keys
    assert older == tp.Tally(samples=7) and isinstance(older.compute, float)


# ------------------------------------------------------------------------------------ Throughput
def _steps(meter: tp.Throughput, clock: FakeClock, waits: list[float], computes: list[float], size: int = 4) -> None:
    for wait, compute in zip(waits, computes):
        clock.advance(wait)
        meter.start(size, 100.0 * size)
        clock.advance(compute)
        meter.stop()


def test_throughput_leaves_out_warmup_and_keeps_interval_epoch_and_run_tallies():
    clock = FakeClock()
    meter = tp.Throughput(warmup_steps=2, clock=clock, total=tp.Tally(samples=100, batches=10))
    meter.start_epoch()
    _steps(meter, clock, [0.5, 0.5, 0.25, 0.75], [1.0, 1.0, 1.75, 1.25])  # steps 0-1: warm-up
    interval = meter.take_interval()
    assert (interval.batches, interval.samples, interval.wait, interval.compute) == (2, 8, 1.0, 3.0)
    assert interval.flops == 800.0 and meter.interval == tp.Tally()
    clock.advance(100.0)  # validation
    meter.anchor()
    _steps(meter, clock, [0.5, 1.5], [1.5, 2.5])
    meter.flush()
    assert (meter.epoch.batches, meter.epoch.seconds, meter.epoch.wait) == (4, 10.0, 3.0)
    assert (meter.total.samples, meter.total.batches) == (116, 14)  # a resumed run's total goes on
    assert meter.steps == 6
    meter.start_epoch()
    assert meter.epoch == tp.Tally()


def test_restarting_the_window_drops_the_interval_and_warms_up_again():
    clock = FakeClock()
    meter = tp.Throughput(warmup_steps=1, clock=clock)
    _steps(meter, clock, [0.0] * 3, [1.0] * 3)  # 2 timed
    meter.restart_window()  # e.g. the batch size changed
    assert meter.interval == tp.Tally() and meter.epoch.batches == 2
    _steps(meter, clock, [0.0] * 3, [2.0] * 3, size=3)  # first one warm-up again: 2 timed
    interval = meter.take_interval()
    assert (interval.batches, interval.samples, interval.compute) == (2, 6, 4.0)
    assert (meter.total.batches, meter.total.samples) == (4, 14)


def test_a_step_stopped_without_start_is_counted_as_a_step_not_timed():
    clock = FakeClock()
    meter = tp.Throughput(clock=clock)
    clock.advance(1.0)
    assert not meter.stop()  # e.g. the step whose FLOPs were counted
    clock.advance(0.25)
    assert meter.start(4, 400.0)
    clock.advance(1.0)
    assert meter.stop()
    assert meter.take_interval() == tp.Tally(samples=4, batches=1, wait=0.25, compute=1.0, flops=400.0)
    assert meter.window_step == 2


# ------------------------------------------------------------------------------------ metrics
def _two_ranks(other: tp.Tally, other_peak: float | None, other_memory: float, calls: list[str]) -> tp.Reduce:
    """A reduce over this rank and one ``other`` rank, as ``trainer.strategy.reduce`` would do it."""
    other_sums, other_maxes = tp.rank_contribution(other, other_peak, other_memory)

    def reduce(values: list[float], op: str) -> list[float]:
        calls.append(op)
        if op == "sum":
            return [a + b for a, b in zip(values, other_sums)]
        return [max(a, b) for a, b in zip(values, other_maxes)]

    return reduce


def test_metrics_sum_rates_and_take_the_slowest_step_over_ranks_in_two_reductions():
    mine = tp.Tally(samples=8, batches=2, wait=1.0, compute=3.0, flops=800.0)  # 2 samples/s
    slow = tp.Tally(samples=8, batches=2, wait=0.0, compute=8.0, flops=800.0)  # 1 sample/s
    calls: list[str] = []
    m = tp.throughput_metrics(mine, 1000.0, 10.0, world_size=2, reduce=_two_ranks(slow, 1000.0, 30.0, calls))
    assert calls == ["sum", "max"]
    assert m == {
        "batches_per_sec": 0.5,
        "step_time": 2.0,
        "data_wait_fraction": 0.25,
        "samples_per_sec": 2.0,
        "flops_per_sec": 200.0,
        "flops_per_sample": 100.0,
        "global_batches_per_sec": 0.75,
        "step_time_max": 4.0,
        "data_wait_fraction_max": 0.25,
        "global_samples_per_sec": 3.0,
        "global_flops_per_sec": 300.0,
        "mfu": 300.0 / 2000.0,
        "peak_memory_mb": 10.0,
        "peak_memory_mb_max": 30.0,
    }
    assert tp.throughput_metrics(mine, 1000.0, 10.0) == {
        k: v for k, v in m.items() if k not in {"mfu", "global_samples_per_sec", "global_batches_per_sec"}
    } | {
        "mfu": 0.2,
        "global_samples_per_sec": 2.0,
        "global_batches_per_sec": 0.5,
        "global_flops_per_sec": 200.0,
        "step_time_max": 2.0,
        "peak_memory_mb_max": 10.0,
    }


def test_metrics_extrapolate_when_a_rank_timed_nothing_and_leave_out_unknowns():
    timed = tp.Tally(samples=4, batches=1, wait=0.0, compute=2.0, flops_missing=1)
    idle = tp.Tally()
    m = tp.throughput_metrics(idle, None, 1.0, world_size=2, reduce=_two_ranks(timed, None, 1.0, []))
    assert "samples_per_sec" not in m  # rank 0 (idle) has nothing of its own
    assert m["global_samples_per_sec"] == 4.0  # 2 samples/s from the one timed rank, times 2 ranks
    assert "flops_per_sec" not in m and "global_flops_per_sec" not in m and "mfu" not in m
    assert set(tp.throughput_metrics(idle, None, 1.0)) == {"peak_memory_mb", "peak_memory_mb_max"}
    # MFU needs a peak on every timed rank
    with_flops = tp.Tally(samples=4, batches=1, compute=2.0, flops=40.0)
    assert "mfu" not in tp.throughput_metrics(with_flops, 1e3, 1.0, 2, _two_ranks(with_flops, None, 1.0, []))
    unsized = tp.Tally(batches=1, compute=2.0, unsized=1)
    assert "samples_per_sec" not in tp.throughput_metrics(unsized)


def test_summary_lists_rates_mfu_wait_memory_and_time():
    text = tp.format_summary(
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
        title="Meter",
    )
    for part in (
        "Meter (",
        "12,345.6",
        "6,172.8",
        "12.3%",
        "4.1%",
        "5.0%",
        "812 MiB",
        "123.4 s",
        "130.2 s",
        "2 rank(s)",
    ):
        assert part in text
    assert "n/a" in tp.format_summary({}, 1, 0, 0.0, 0.0, "no peak")


# ------------------------------------------------------------------------------------ FLOPs
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


def test_flops_of_a_seedcnn_training_step_equal_the_analytic_count():
    assert seedcnn_flops_per_sample() == 23_577_600
    net = SeedCNN()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])

    def step() -> None:
        torch.nn.functional.cross_entropy(net(x), y).backward()

    assert tp.measure_flops(step) == 2 * seedcnn_flops_per_sample()


def test_batch_flops_counts_a_real_step_per_batch_size_and_forgets_on_a_model_change():
    linear = torch.nn.Linear(8, 2)
    flops = tp.BatchFlops()
    assert flops.watch(linear)  # the first model seen

    def step(n: int) -> None:
        linear(torch.randn(n, 8)).sum().backward()

    flops.start(4)
    assert flops.counting
    step(4)
    # nn.Linear(8, 2) per sample: forward addmm 2*8*2 = 32, weight gradient mm 32 (the input needs no grad)
    assert flops.stop() == 256.0 and not flops.counting
    flops.start(3)
    step(3)
    assert flops.stop(skipped=True) is None  # no backward ran (training_step returned None): not kept
    flops.start(None)
    assert flops.stop() == 0.0  # FlopCounterMode saw nothing (torch.compile): kept as unknown
    assert flops.counted == {4: 256.0, None: None}
    assert not flops.watch(linear)
    linear.weight.requires_grad_(False)  # fewer trainable parameters: backward differs
    assert flops.watch(linear) and flops.counted == {}
    flops.start(4)
    flops.abandon()  # an exception mid-step: the mode is left, nothing kept
    assert not flops.counting and flops.counted == {}


# ------------------------------------------------------------------------------------ peak FLOP/s
@pytest.mark.parametrize(
    ("name", "key", "expected"),
    [
        ("NVIDIA H200", "bf16", 989.4e12),
        ("NVIDIA H200 NVL", "bf16", 835.5e12),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.7e12),
        ("NVIDIA H100 NVL", "bf16", 835.5e12),
        ("NVIDIA H100 PCIe", "fp16", 756e12),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156e12),
        ("NVIDIA A100 80GB PCIe", "bf16", 312e12),
        ("NVIDIA L4", "bf16", 121e12),
        ("NVIDIA L40S", "bf16", 362.05e12),
        ("NVIDIA L40", "fp32", 90.5e12),
        ("Tesla T4", "fp16", 65e12),
        ("Tesla T4", "bf16", None),  # no bf16 on Turing
        ("Tesla V100-SXM2-16GB", "fp32", 15.7e12),
        ("Tesla V100-PCIE-32GB", "fp16", 112e12),
        ("NVIDIA GeForce GTX 1080", "fp32", None),
    ],
)
def test_gpu_peak_table(name, key, expected):
    assert tp.gpu_peak_flops(name, key) == expected


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
    assert tp.precision_dtype_key(precision) == key


def _gpu(monkeypatch: pytest.MonkeyPatch, name: str, capability: tuple[int, int] = (9, 0)) -> torch.device:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    return torch.device("cuda", 0)


def test_gpu_peak_uses_the_table_then_the_fallback(monkeypatch):
    asked: list[str] = []

    def fallback(device: torch.device, key: str) -> float | None:
        asked.append(key)
        return 91.1e12 if key == "bf16" else None

    gpu = _gpu(monkeypatch, "NVIDIA H200")
    assert tp.device_peak_flops(gpu, "bf16-mixed", fallback).flops == 989.4e12 and asked == []  # table first
    # fp32 on Ampere+ may run on TF32 tensor cores (cuDNN's default for convolutions): TF32's peak
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert tp.device_peak_flops(gpu, "32-true").dtype_key == "tf32"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert tp.device_peak_flops(gpu, "32-true").flops == 67.0e12
    gpu = _gpu(monkeypatch, "NVIDIA RTX 6000 Ada Generation")
    assert tp.device_peak_flops(gpu, "bf16-mixed", fallback).flops == 91.1e12
    none = tp.device_peak_flops(gpu, "16-mixed", fallback)
    assert none.flops is None and "RTX 6000" in none.note and asked == ["bf16", "fp16"]
    assert tp.device_peak_flops(gpu, "bf16-mixed").flops is None  # no fallback given


def test_cpu_peak_is_measured_once_per_dtype_and_thread_count(monkeypatch):
    seen: list[torch.dtype] = []
    monkeypatch.setattr(tp, "measure_matmul_peak", lambda dtype: seen.append(dtype) or 1e10)
    monkeypatch.setattr(tp, "CPU_PEAK_CACHE", {})
    for precision in ("bf16-mixed", "32-true", "32-true"):
        peak = tp.device_peak_flops("cpu", precision)
        assert peak.flops == 1e10 and "measured CPU" in peak.note
    assert seen == [torch.bfloat16, torch.float32]
    assert tp.device_peak_flops("meta", "32-true").flops is None  # no table, no benchmark


def test_matmul_peak_is_two_n_cubed_flops_over_the_fastest_run(monkeypatch):
    """Each matmul 'takes' the next scripted duration on a fake clock: the best one decides."""
    durations = iter([0.0, 0.5, 0.25, 1.0, 0.5, 2.0])  # the first call picks kernels: not timed
    clock = FakeClock()
    real_mm = torch.mm

    def scripted_mm(*args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        clock.advance(next(durations))
        return real_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "mm", scripted_mm)
    size = 8
    # at least 3 runs and 1 s: stops after 0.5 + 0.25 + 1.0
    assert tp.measure_matmul_peak(torch.float32, size=size, min_seconds=1.0, clock=clock) == 2 * size**3 / 0.25
