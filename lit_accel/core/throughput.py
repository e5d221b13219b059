"""Throughput engine: step timing, peak memory, a tally of timed steps, FLOPs, MFU and a summary.

Trainer-free (torch and the standard library only), so a plain PyTorch loop, a Lightning Fabric
loop, ``lit-accel tune``, the benchmarks and :class:`lit_accel.callbacks.ThroughputMeter` all use
the same implementation. Numbers in, numbers out; the only clocks are the injectable one of
:class:`StepTimer` and CUDA events.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "CPU_PEAK_CACHE",
    "DTYPES",
    "GPU_PEAK_FLOPS",
    "MAX_FIELDS",
    "SUM_FIELDS",
    "BatchFlops",
    "PeakFlops",
    "Reduce",
    "StepTimer",
    "Tally",
    "Throughput",
    "TimedSteps",
    "cpu_peak_flops",
    "cuda_fp32_uses_tf32",
    "device_peak_flops",
    "format_summary",
    "gpu_peak_flops",
    "gpu_table_row",
    "measure_flops",
    "measure_matmul_peak",
    "module_signature",
    "peak_memory_mb",
    "peak_rss_mb",
    "precision_dtype_key",
    "rank_contribution",
    "release_free_host_memory",
    "reset_peak_memory",
    "reset_peak_rss",
    "throughput_metrics",
]

_MIB = 2**20


# ------------------------------------------------------------------------------------ step timing
class TimedSteps(NamedTuple):
    """What :meth:`StepTimer.read` returns: steps stopped since the last read and their seconds."""

    steps: int
    wait: float  # seconds from "ready" (previous step's end, or an anchor) to each step's start
    compute: float  # seconds from each step's start to its end

    @property
    def seconds(self) -> float:
        return self.wait + self.compute


class StepTimer:
    """Splits each step into data wait and compute; synchronizes a device only in :meth:`read`.

    A step's *wait* runs from the moment the loop was ready for it (the previous step's
    :meth:`stop`, or the last :meth:`anchor`) to its :meth:`start`; its *compute* from
    :meth:`start` to :meth:`stop`. Anything between a stop and an :meth:`anchor` (validation,
    checkpointing, the gap between epochs) is not counted. A :meth:`stop` without a
    :meth:`start` (an untimed warm-up step) only marks the loop ready again.

    On a CUDA device the marks are CUDA events on the current stream, read on the device timeline:
    the gap from one step's end event to the next one's start event is the wait as the device saw
    it (idle for data), and nothing synchronizes until :meth:`read`. Elsewhere the host clock is
    used (CPU work is synchronous).

    Args:
        device: the device the steps run on; CUDA events when it is a CUDA device, else the host
            clock. None: the host clock.
        clock: host clock in seconds (default ``time.perf_counter``); tests pass a fake one.

    Example::

        timer = StepTimer(device)
        for i, batch in enumerate(loader):
            if i >= warmup:
                timer.start()
            train_step(batch)
            timer.stop()
        steps, wait, compute = timer.read()
    """

    def __init__(self, device: torch.device | str | None = None, clock: Callable[[], float] | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self._clock = clock or time.perf_counter
        # a mark is a host time (float) or a recorded torch.cuda.Event
        self._ready: Any = self._mark()
        self._start: Any = None
        self._host = [0, 0.0, 0.0]  # steps, wait, compute (host clock)
        self._events: list[tuple[Any, Any, Any]] = []  # (ready, start, end) events of unread steps

    def _mark(self) -> Any:
        if not self.cuda:
            return self._clock()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def anchor(self) -> None:
        """The loop is ready for the next step now: its wait counts from here (a started step is dropped)."""
        self._ready = self._mark()
        self._start = None

    def start(self) -> None:
        """The step's data is here: its compute starts."""
        self._start = self._mark()

    def stop(self) -> bool:
        """The step ended; returns whether it was timed (started), and marks the loop ready."""
        end = self._mark()
        start, ready = self._start, self._ready
        self._ready, self._start = end, None
        if start is None:
            return False
        if not self.cuda:
            self._host[0] += 1
            self._host[1] += start - ready
            self._host[2] += end - start
        else:
            self._events.append((ready, start, end))
        return True

    def read(self) -> TimedSteps:
        """The steps stopped since the last read, and forgets them. On CUDA, waits for the last one."""
        steps, wait, compute = self._host
        self._host = [0, 0.0, 0.0]
        if self._events:
            self._events[-1][2].synchronize()  # the only synchronization
            steps += len(self._events)
            wait += sum(ready.elapsed_time(start) for ready, start, _ in self._events) / 1000.0
            compute += sum(start.elapsed_time(end) for _, start, end in self._events) / 1000.0
            self._events.clear()
        return TimedSteps(int(steps), float(wait), float(compute))


# ------------------------------------------------------------------------------------ peak memory
def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB since it started or the last :func:`reset_peak_rss`.

    Linux reads ``VmHWM``; elsewhere ``ru_maxrss`` (the peak over the process's life); 0.0 where
    neither exists (Windows).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / _MIB if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def release_free_host_memory() -> bool:
    """Hands the memory the C allocator holds free back to the system (glibc's ``malloc_trim(0)``).

    Freed memory the allocator keeps stays in the resident set, and later allocations reuse it
    without growing it: a peak window (:func:`reset_peak_rss`) opened then would miss them. Returns
    False where the C library has no ``malloc_trim`` (not glibc: nothing is done).
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # TypeError: Windows' CDLL needs a library name
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def reset_peak_rss() -> bool:
    """Resets the peak RSS to the current RSS; False where the system cannot (then the peak is the process's).

    Linux >= 4.0: writing 5 to ``/proc/self/clear_refs`` resets ``VmHWM``.
    """
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def peak_memory_mb(device: torch.device | str | None = None) -> float:
    """Peak memory in MiB since the process started or :func:`reset_peak_memory`.

    CUDA device: ``torch.cuda.max_memory_allocated`` (tensors, not the allocator's cache); any other
    device: the process's peak RSS (:func:`peak_rss_mb`).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / _MIB
    return peak_rss_mb()


def reset_peak_memory(device: torch.device | str | None = None) -> bool:
    """Starts a new peak-memory window for :func:`peak_memory_mb` (CUDA peak stats and host peak RSS).

    Returns False where the host peak cannot be reset (see :func:`reset_peak_rss`).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        with contextlib.suppress(RuntimeError):  # CUDA not initialised yet: nothing to reset
            torch.cuda.reset_peak_memory_stats(dev)
    return reset_peak_rss()


# ------------------------------------------------------------------------------------ the tally
@dataclass
class Tally:
    """Sums over a set of timed training steps on one rank; its fields are a checkpoint's format.

    Attributes:
        samples: samples in the timed steps (those of known size).
        batches: timed steps.
        wait: seconds waiting for data before the timed steps.
        compute: seconds inside the timed steps.
        flops: FLOPs of the timed steps (those with known FLOPs).
        flops_missing: timed steps whose FLOPs are unknown.
        unsized: timed steps whose number of samples is unknown.
    """

    samples: int = 0
    batches: int = 0
    wait: float = 0.0
    compute: float = 0.0
    flops: float = 0.0
    flops_missing: int = 0
    unsized: int = 0

    @property
    def seconds(self) -> float:
        return self.wait + self.compute

    def count(self, samples: int | None, flops: float | None) -> None:
        """Adds one timed step of ``samples`` samples and ``flops`` FLOPs (None: unknown)."""
        self.batches += 1
        self.samples += samples or 0
        self.unsized += samples is None
        self.flops += flops or 0.0
        self.flops_missing += flops is None

    def add(self, other: Tally) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Tally:
        """The tally of a :meth:`state_dict`; keys it lacks load as zero."""
        zero = cls()
        values = {f.name: getattr(zero, f.name) for f in fields(cls)}
        return cls(**{name: type(value)(state.get(name, value)) for name, value in values.items()})


class Throughput:
    """Times steps after a warm-up and tallies them per interval, per epoch and for the whole run.

    The first ``warmup_steps`` steps (of the run, and after :meth:`restart_window`) are not timed.
    A step given to :meth:`stop` without :meth:`start` is a step that was not timed (warm-up, or a
    step the caller slows on purpose, such as one whose FLOPs are counted).

    Args:
        device: where the steps run (see :class:`StepTimer`).
        warmup_steps: steps not timed at the start and after each :meth:`restart_window`.
        clock: host clock for :class:`StepTimer`.
        total: the run's tally so far (a resumed run's); a fresh one if None.

    Attributes:
        interval, epoch, total: :class:`Tally` of the timed steps since the last
            :meth:`take_interval`, since :meth:`start_epoch`, and over the run; up to date after
            :meth:`flush` (which reads the timer: on CUDA, a synchronization).
        steps: steps stopped since construction, timed or not.
        window_step: steps stopped since construction or the last :meth:`restart_window`.

    Example::

        meter = Throughput(device, warmup_steps=3)
        for x, y in loader:
            meter.start(samples=len(x))
            train_step(x, y)
            meter.stop()
        print(throughput_metrics(meter.take_interval())["samples_per_sec"])
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        warmup_steps: int = 0,
        clock: Callable[[], float] | None = None,
        total: Tally | None = None,
    ) -> None:
        self.timer = StepTimer(device, clock)
        self.warmup_steps = warmup_steps
        self.interval, self.epoch = Tally(), Tally()
        self.total = total if total is not None else Tally()
        self.steps = 0
        self.window_step = 0
        self._pending = Tally()  # stopped steps whose time is still in the timer
        self._step: tuple[int | None, float | None] | None = None

    def anchor(self) -> None:
        """The loop is ready for the next step now (after validation, at an epoch's start)."""
        self.timer.anchor()

    def start(self, samples: int | None = None, flops: float | None = None) -> bool:
        """A step with ``samples`` samples and ``flops`` FLOPs begins; False (not timed) in the warm-up."""
        if self.window_step < self.warmup_steps:
            return False
        self._step = (samples, flops)
        self.timer.start()
        return True

    def stop(self) -> bool:
        """The step ended; returns whether it was timed."""
        timed = self.timer.stop() and self._step is not None
        if timed and self._step is not None:
            self._pending.count(*self._step)
        self._step = None
        self.steps += 1
        self.window_step += 1
        return timed

    def flush(self) -> None:
        """Adds the timer's readings to the interval, epoch and run tallies."""
        steps = self.timer.read()
        self._pending.wait += steps.wait
        self._pending.compute += steps.compute
        for tally in (self.interval, self.epoch, self.total):
            tally.add(self._pending)
        self._pending = Tally()

    def take_interval(self) -> Tally:
        """The interval's tally (flushed), and a fresh interval."""
        self.flush()
        interval, self.interval = self.interval, Tally()
        return interval

    def start_epoch(self) -> None:
        """A fresh epoch tally; the next step's wait counts from now."""
        self.epoch = Tally()
        self.anchor()

    def restart_window(self) -> None:
        """A new rate window (e.g. the batch size changed): drops the interval, warms up again.

        The steps timed so far stay in the epoch and run tallies.
        """
        self.flush()
        self.interval = Tally()
        self.window_step = 0


# ------------------------------------------------------------------------------------ metrics
# What each rank contributes to the one sum- and the one max-reduction of throughput_metrics.
SUM_FIELDS = (
    "samples_per_sec",
    "batches_per_sec",
    "flops_per_sec",
    "peak_flops_per_sec",
    "ranks_timed",
    "ranks_sized",
    "ranks_with_flops",
    "ranks_with_peak",
)
MAX_FIELDS = ("step_time", "data_wait_fraction", "peak_memory_mb")

#: ``reduce(values, op)``: the element-wise ``"sum"`` or ``"max"`` of ``values`` over all ranks.
Reduce = Callable[[list[float], str], list[float]]


def rank_contribution(tally: Tally, peak_flops: float | None, memory_mb: float) -> tuple[list[float], list[float]]:
    """This rank's values for the sum-reduction (:data:`SUM_FIELDS`) and the max-reduction (:data:`MAX_FIELDS`)."""
    seconds = tally.seconds
    if tally.batches == 0 or seconds <= 0:
        return [0.0] * len(SUM_FIELDS), [0.0, 0.0, memory_mb]
    sized = tally.unsized == 0
    has_flops = tally.flops_missing == 0
    has_peak = has_flops and peak_flops is not None
    sums = [
        tally.samples / seconds if sized else 0.0,
        tally.batches / seconds,
        tally.flops / seconds if has_flops else 0.0,
        float(peak_flops) if has_peak and peak_flops is not None else 0.0,
        1.0,
        float(sized),
        float(has_flops),
        float(has_peak),
    ]
    return sums, [seconds / tally.batches, tally.wait / seconds, memory_mb]


def throughput_metrics(
    tally: Tally,
    peak_flops: float | None = None,
    memory_mb: float = 0.0,
    world_size: int = 1,
    reduce: Reduce | None = None,
) -> dict[str, float]:
    """Rates, data wait, FLOP/s, MFU and peak memory of ``tally``, this rank's and over all ranks.

    Every rank must call it at the same moment when ``reduce`` is given: it runs exactly two
    reductions (one ``"sum"``, one ``"max"``). Global sums are extrapolated to ``world_size``
    when some rank timed no step. A figure whose inputs are unknown (no timed step, samples or
    FLOPs unknown, no peak on some rank) is left out.

    Args:
        tally: this rank's timed steps.
        peak_flops: peak FLOP/s of this rank's device (for MFU), or None.
        memory_mb: this rank's peak memory in MiB.
        world_size: number of ranks.
        reduce: the collective over ranks; None for one process.

    Returns:
        ``samples_per_sec``, ``batches_per_sec``, ``step_time``, ``data_wait_fraction``,
        ``flops_per_sec``, ``flops_per_sample`` (this rank); ``global_samples_per_sec``,
        ``global_batches_per_sec``, ``global_flops_per_sec`` (sums), ``step_time_max``,
        ``data_wait_fraction_max`` (the slowest rank's), ``mfu`` (global FLOP/s ÷ sum of peaks);
        ``peak_memory_mb`` and ``peak_memory_mb_max``.
    """
    local, local_max = rank_contribution(tally, peak_flops, memory_mb)
    summed, maxed = (reduce(local, "sum"), reduce(local_max, "max")) if reduce is not None else (local, local_max)
    mine = dict(zip(SUM_FIELDS, local))
    s = dict(zip(SUM_FIELDS, summed))
    m = dict(zip(MAX_FIELDS, maxed))
    out: dict[str, float] = {}
    if mine["ranks_timed"]:
        out["batches_per_sec"] = mine["batches_per_sec"]
        out["step_time"] = local_max[0]
        out["data_wait_fraction"] = local_max[1]
        if mine["ranks_sized"]:
            out["samples_per_sec"] = mine["samples_per_sec"]
        if mine["ranks_with_flops"]:
            out["flops_per_sec"] = mine["flops_per_sec"]
            if mine["ranks_sized"] and tally.samples > 0:
                out["flops_per_sample"] = tally.flops / tally.samples
    if s["ranks_timed"]:
        out["global_batches_per_sec"] = s["batches_per_sec"] * world_size / s["ranks_timed"]
        out["step_time_max"] = m["step_time"]
        out["data_wait_fraction_max"] = m["data_wait_fraction"]
        if s["ranks_sized"]:
            out["global_samples_per_sec"] = s["samples_per_sec"] * world_size / s["ranks_sized"]
        if s["ranks_with_flops"]:
            out["global_flops_per_sec"] = s["flops_per_sec"] * world_size / s["ranks_with_flops"]
        if s["ranks_with_peak"] == s["ranks_timed"] and s["peak_flops_per_sec"] > 0:
            out["mfu"] = s["flops_per_sec"] / s["peak_flops_per_sec"]
    out["peak_memory_mb"] = memory_mb
    out["peak_memory_mb_max"] = m["peak_memory_mb"]
    return out


def format_summary(
    metrics: dict[str, float],
    world_size: int,
    batches: int,
    timed_seconds: float,
    wall_seconds: float,
    peak_note: str,
    title: str = "Throughput summary",
) -> str:
    """A run's figures as a few lines of text (``n/a`` for those missing from ``metrics``).

    Args:
        metrics: :func:`throughput_metrics` of the run's tally.
        world_size: number of ranks.
        batches: timed steps on this rank.
        timed_seconds: seconds in timed steps on this rank.
        wall_seconds: wall-clock seconds of the training.
        peak_note: where the MFU's peak came from (:class:`PeakFlops` ``note``).
        title: the first line's name.
    """

    def num(key: str, spec: str) -> str:
        return format(metrics[key], spec) if key in metrics else "n/a"

    return "\n".join(
        [
            f"{title} ({world_size} rank(s), {batches:,} timed batches on rank 0)",
            f"  samples/s      {num('global_samples_per_sec', ',.1f')} global, {num('samples_per_sec', ',.1f')} rank 0",
            f"  MFU            {num('mfu', '.1%')} ({peak_note})",
            f"  data wait      {num('data_wait_fraction', '.1%')} rank 0, {num('data_wait_fraction_max', '.1%')} max",
            f"  peak memory    {num('peak_memory_mb_max', ',.0f')} MiB (max over ranks)",
            f"  training time  {timed_seconds:,.1f} s in timed batches (whole run, rank 0), "
            f"{wall_seconds:,.1f} s wall for this fit's training",
        ]
    )


# ------------------------------------------------------------------------------------ FLOPs
def module_signature(module: torch.nn.Module) -> tuple[int, int, int, int]:
    """Identity, parameter count, total and trainable elements: a change means the FLOPs may differ."""
    count = total = trainable = 0
    for p in module.parameters():
        count += 1
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return id(module), count, total, trainable


def measure_flops(step: Callable[[], object]) -> float:
    """FLOPs of one call of ``step`` (e.g. forward, backward and optimizer step of one batch).

    Counted by ``torch.utils.flop_counter.FlopCounterMode``: matmuls and convolutions, 2 FLOPs per
    multiply-add, not element-wise ops; 0.0 when it sees none (e.g. under ``torch.compile``).
    """
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


class BatchFlops:
    """FLOPs of one training batch per batch size, counted once on a real batch (nothing re-run).

    Wrap one real step in :meth:`start` / :meth:`stop`; the count is kept for that batch size
    until :meth:`forget` (or :meth:`watch` sees the model change). A counted step runs slower:
    do not time it.

    Attributes:
        counted: batch size -> FLOPs of a batch of that size (None: FlopCounterMode saw none).
    """

    def __init__(self) -> None:
        self.counted: dict[int | None, float | None] = {}
        self._mode: FlopCounterMode | None = None
        self._size: int | None = None
        self._signature: tuple[int, int, int, int] | None = None

    @property
    def counting(self) -> bool:
        return self._mode is not None

    def start(self, size: int | None) -> None:
        """Counts the FLOPs of what runs until :meth:`stop` as those of a batch of ``size``."""
        self.abandon()
        self._mode = FlopCounterMode(display=False)
        self._mode.__enter__()
        self._size = size

    def stop(self, skipped: bool = False) -> float | None:
        """Ends the count and returns it; ``skipped``: the step did no backward, count a later one (None)."""
        mode, self._mode = self._mode, None
        if mode is None:
            return None
        mode.__exit__(None, None, None)
        if skipped:
            return None
        flops = float(mode.get_total_flops())
        self.counted[self._size] = flops if flops > 0 else None
        return flops

    def abandon(self) -> None:
        """Ends a count without keeping it (an exception, the end of a fit)."""
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(None, None, None)

    def forget(self) -> None:
        self.counted.clear()

    def watch(self, module: torch.nn.Module) -> bool:
        """Forgets the counts when ``module`` differs from the last one watched; returns whether it did."""
        signature = module_signature(module)
        changed = signature != self._signature
        self._signature = signature
        if changed:
            self.forget()
        return changed


# ------------------------------------------------------------------------------------ peak FLOP/s
# Dense (no structured sparsity) peak FLOP/s per device, by compute dtype. Started from Lightning's
# table (lightning/fabric/utilities/throughput.py, `_CUDA_FLOPS`, lightning 2.6.6) and checked against
# NVIDIA's datasheets. Lightning's H200 rows and its "h100 nvl" row hold the with-sparsity (2x) or
# two-board figures; the rows below halve those to the dense single-device numbers:
#   H100/H200 SXM: https://resources.nvidia.com/en-us-tensor-core (H100) and the H200 datasheet
#     (nvdam.widen.net/s/nb5zzzsjdf): BF16 1,979 TFLOP/s "with sparsity" -> 989.4 dense.
#   H100/H200 NVL: BF16 1,671 TFLOP/s with sparsity -> 835.5 dense; FP32 60 TFLOP/s.
#   A100: datasheet nvidia-a100-datasheet-us-nvidia-1758950-r4 (TF32 156, BF16 312 dense).
#   L4 / L40 / L40S: Ada whitepaper v2.1 and the L40S datasheet (dense columns).
#   T4, V100: the Turing/Volta datasheets (no BF16 on these chips).
GPU_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h200 sxm": {"fp64": 34.0e12, "fp32": 67.0e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
    "h200 nvl": {"fp64": 30.0e12, "fp32": 60.0e12, "tf32": 417.5e12, "bf16": 835.5e12, "fp16": 835.5e12},
    "h100 sxm": {"fp64": 33.5e12, "fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
    "h100 nvl": {"fp64": 30.0e12, "fp32": 60.0e12, "tf32": 417.5e12, "bf16": 835.5e12, "fp16": 835.5e12},
    "h100 pcie": {"fp64": 25.6e12, "fp32": 51.2e12, "tf32": 378e12, "bf16": 756e12, "fp16": 756e12},
    "a100": {"fp64": 9.7e12, "fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
    "l40s": {"fp32": 91.6e12, "tf32": 183e12, "bf16": 362.05e12, "fp16": 362.05e12},
    "l40": {"fp32": 90.5e12, "tf32": 90.5e12, "bf16": 181e12, "fp16": 181e12},
    "l4": {"fp32": 30.3e12, "tf32": 60e12, "bf16": 121e12, "fp16": 121e12},
    "t4": {"fp32": 8.1e12, "fp16": 65e12},
    "v100 sxm": {"fp64": 7.8e12, "fp32": 15.7e12, "fp16": 125e12},
    "v100 pcie": {"fp64": 7.0e12, "fp32": 14.0e12, "fp16": 112e12},
}

#: torch dtype of each dtype key (``"tf32"`` is float32 run on TF32 tensor cores).
DTYPES: dict[str, torch.dtype] = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "tf32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def gpu_table_row(device_name: str) -> str | None:
    """The row of :data:`GPU_PEAK_FLOPS` for a CUDA device name (``torch.cuda.get_device_name``), or None."""
    name = device_name.lower()
    tokens = set(re.split(r"[\s\-_/]+", name))
    if "h200" in name:
        return "h200 nvl" if "nvl" in tokens else "h200 sxm"
    if "h100" in name:
        if "nvl" in tokens:
            return "h100 nvl"
        return "h100 pcie" if "pcie" in tokens else "h100 sxm"  # "H100 80GB HBM3" is the SXM part
    if "a100" in name:
        return "a100"
    for row in ("l40s", "l40", "l4", "t4"):
        if row in tokens:
            return row
    if "v100" in name:
        return "v100 pcie" if "pcie" in tokens else "v100 sxm"
    return None


def gpu_peak_flops(device_name: str, dtype_key: str) -> float | None:
    """Dense datasheet peak FLOP/s of one GPU for a dtype key (``"bf16"``, ``"tf32"``...), or None."""
    row = gpu_table_row(device_name)
    return None if row is None else GPU_PEAK_FLOPS[row].get(dtype_key)


def precision_dtype_key(precision: str) -> str | None:
    """The dtype in which a Lightning precision setting's matmuls run (``"bf16-mixed"`` -> ``"bf16"``), or None."""
    p = str(precision)
    for prefix, key in (("bf16", "bf16"), ("16", "fp16"), ("32", "fp32"), ("64", "fp64")):
        if p.startswith(prefix):
            return key
    return None


def cuda_fp32_uses_tf32() -> bool:
    """Whether fp32 work may run on TF32 tensor cores (then TF32's peak is the honest denominator).

    cuDNN runs fp32 convolutions in TF32 unless told not to (``torch.backends.cudnn.allow_tf32``
    defaults to True); matmuls only when allowed. fp32's peak would let a CNN's MFU exceed 100 %.
    """
    return bool(
        torch.backends.cudnn.allow_tf32
        or torch.backends.cuda.matmul.allow_tf32
        or torch.get_float32_matmul_precision() != "highest"
    )


def measure_matmul_peak(
    dtype: torch.dtype,
    size: int = 1024,
    min_seconds: float = 0.2,
    clock: Callable[[], float] | None = None,
) -> float:
    """Achievable FLOP/s of a ``size`` x ``size`` matmul on the CPU in ``dtype``: 2·size³ over the best run.

    Runs at least 3 times and ``min_seconds``, at most ``5 * min_seconds``. The default size is
    large enough for BLAS/oneDNN to reach its peak and small enough (2.1 GFLOP) to take well under
    a second on a laptop core. The operands are random normal values (no zeros or denormals for a
    kernel to take a shortcut on) from a private generator: a draw from torch's global one would
    shift every later draw of the run (data order, augmentation, dropout).
    """
    clock = clock or time.perf_counter
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    out = torch.mm(a, b)  # the first call picks kernels and allocates
    best = math.inf
    reps = 0
    begin = clock()
    while True:
        t0 = clock()
        torch.mm(a, b, out=out)
        best = min(best, clock() - t0)
        reps += 1
        elapsed = clock() - begin
        if (reps >= 3 and elapsed >= min_seconds) or elapsed >= 5 * min_seconds:
            break
    return 2.0 * size**3 / best


#: (dtype, intra-op threads) -> measured FLOP/s: :func:`cpu_peak_flops` measures once per process.
CPU_PEAK_CACHE: dict[tuple[torch.dtype, int], float] = {}


def cpu_peak_flops(dtype: torch.dtype) -> float:
    """The CPU's matmul peak in ``dtype`` at the current thread count (:func:`measure_matmul_peak`, cached)."""
    key = (dtype, torch.get_num_threads())
    if key not in CPU_PEAK_CACHE:
        CPU_PEAK_CACHE[key] = measure_matmul_peak(dtype)
    return CPU_PEAK_CACHE[key]


class PeakFlops(NamedTuple):
    """A device's peak FLOP/s for MFU, and where it came from (or why there is none)."""

    flops: float | None
    note: str
    dtype_key: str | None


def device_peak_flops(
    device: torch.device | str,
    precision: str,
    fallback: Callable[[torch.device, str], float | None] | None = None,
) -> PeakFlops:
    """Peak FLOP/s of one ``device`` in the compute dtype of a Lightning ``precision`` (``"bf16-mixed"``...).

    CUDA: :data:`GPU_PEAK_FLOPS` (fp32 counts as tf32 on Ampere and later when
    :func:`cuda_fp32_uses_tf32`), else ``fallback(device, dtype_key)`` (e.g. Lightning's
    ``get_available_flops``). CPU: a measured matmul peak (:func:`cpu_peak_flops`), so MFU on a
    CPU is relative to what its BLAS reaches, not a datasheet. Other devices: none.
    """
    device = torch.device(device)
    key = precision_dtype_key(precision)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if key == "fp32" and torch.cuda.get_device_capability(device) >= (8, 0) and cuda_fp32_uses_tf32():
            key = "tf32"
        flops = None if key is None else gpu_peak_flops(name, key)
        if flops is None and key is not None and fallback is not None:
            flops = fallback(device, key) or None
        if flops is None:
            return PeakFlops(None, f"no peak FLOP/s known for {name!r} in {key or precision}", key)
        return PeakFlops(flops, f"peak {flops / 1e12:,.1f} TFLOP/s per device, {name} {key}", key)
    if device.type == "cpu" and key is not None:
        flops = cpu_peak_flops(DTYPES[key])
        return PeakFlops(
            flops, f"relative to a measured CPU {key} matmul peak of {flops / 1e9:,.1f} GFLOP/s per rank", key
        )
    return PeakFlops(None, f"no peak FLOP/s known for device {device} with precision {precision!r}", key)
