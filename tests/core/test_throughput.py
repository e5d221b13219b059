"""Tests for lit_accel.core.throughput: numbers in, numbers out, a fake clock, no Trainer."""

from __future__ import annotations

import pytest
import torch

from lit_accel.core import throughput as tp
from lit_accel.core.throughput import StepTimer, TimedSteps


class FakeClock:
    """A clock that moves only when the test says so (seconds)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


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


def test_cuda_peak_memory_reads_and_resets_the_device_figures(monkeypatch):
    calls: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: calls.append(("max", d)) or 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", d)))
    monkeypatch.setattr(tp, "reset_peak_rss", lambda: True)
    assert tp.peak_memory_mb("cuda:1") == 3.0
    assert tp.reset_peak_memory(torch.device("cuda", 1))
    assert calls == [("max", torch.device("cuda", 1)), ("reset", torch.device("cuda", 1))]
