"""Throughput engine: step timing, peak memory, a tally of timed steps, FLOPs, MFU and a summary.

Trainer-free (torch and the standard library only), so a plain PyTorch loop, a Lightning Fabric
loop, ``lit-accel tune``, the benchmarks and :class:`lit_accel.callbacks.ThroughputMeter` all use
the same implementation. Numbers in, numbers out; the only clocks are the injectable one of
:class:`StepTimer` and CUDA events.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

__all__ = [
    "StepTimer",
    "TimedSteps",
    "peak_memory_mb",
    "peak_rss_mb",
    "reset_peak_memory",
    "reset_peak_rss",
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
