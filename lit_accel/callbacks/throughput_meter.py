"""Training throughput, data wait, FLOPs/MFU and peak memory for any Lightning run.

This module imports only ``lightning``, ``torch``, the standard library, ``typing_extensions``
(for ``@override``; torch and lightning require it) and the private
``lit_accel/core`` (torch and the standard library only), so it can be copied with that package into
another project as they are.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch.utils.flop_counter import FlopCounterMode
from typing_extensions import override

from lit_accel.core.checks import check_name, is_int
from lit_accel.core.state_keys import adopt_older_state, identity_state_key

__all__ = ["ThroughputMeter"]

log = logging.getLogger(__name__)

# The clock for step timing on hosts without CUDA events; tests replace it with a scripted one.
_clock = time.perf_counter

_MIB = 2**20

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
_GPU_PEAK_FLOPS: dict[str, dict[str, float]] = {
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

_DTYPE_KEYS = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Square matmul size for the CPU peak benchmark: large enough for BLAS/oneDNN to reach its peak,
# small enough (2.1 GFLOP per product) to take well under a second on a laptop core.
_CPU_MATMUL_SIZE = 1024


def _gpu_row(device_name: str) -> str | None:
    """Maps a CUDA device name (``torch.cuda.get_device_name``) to a row of the peak table."""
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


# The dtype argument Lightning's get_available_flops takes for each of our dtype keys.
_LIGHTNING_DTYPES: dict[str, torch.dtype | str] = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "tf32": "tf32",
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def _gpu_peak_flops(device_name: str, dtype_key: str, device: torch.device | None = None) -> float | None:
    """Dense peak FLOP/s of one GPU for a compute dtype key (``"bf16"``, ``"tf32"``...), or None.

    A GPU missing from the table above falls back, when ``device`` is given, to Lightning's own
    table (``get_available_flops``, which warns when it does not know the device either). Its
    figures for some chips include structured sparsity, which is why the table above comes first.
    """
    row = _gpu_row(device_name)
    if row is not None:
        return _GPU_PEAK_FLOPS[row].get(dtype_key)
    if device is None or dtype_key not in _LIGHTNING_DTYPES:
        return None
    flops = get_available_flops(device, _LIGHTNING_DTYPES[dtype_key])
    return float(flops) if flops else None


def _cuda_fp32_uses_tf32() -> bool:
    # cuDNN runs fp32 convolutions in TF32 unless told not to (torch.backends.cudnn.allow_tf32 defaults to
    # True); matmuls only when allowed. Either way the TF32 peak is the honest denominator: fp32's would
    # let a CNN's MFU exceed 100%.
    return bool(
        torch.backends.cudnn.allow_tf32
        or torch.backends.cuda.matmul.allow_tf32
        or torch.get_float32_matmul_precision() != "highest"
    )


def _precision_dtype_key(precision: str) -> str | None:
    """The dtype in which the matmuls of a Lightning precision setting run (``"bf16-mixed"`` -> ``"bf16"``)."""
    p = str(precision)
    if p.startswith("bf16"):
        return "bf16"
    if p.startswith("16"):
        return "fp16"
    if p.startswith("32"):
        return "fp32"
    if p.startswith("64"):
        return "fp64"
    return None


def _measure_matmul_peak(dtype: torch.dtype, size: int = _CPU_MATMUL_SIZE, min_seconds: float = 0.2) -> float:
    """Achievable FLOP/s of one ``size``x``size`` matmul on the CPU in ``dtype`` (best of several runs).

    The operands are random normal values (no zeros or denormals for a kernel to take a shortcut
    on), drawn from a private generator: a draw from torch's global one would shift every later
    draw of the run (data order, augmentation, dropout), so a fit with the meter would train
    differently from one without it.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    out = torch.mm(a, b)  # first call picks kernels and allocates
    best = math.inf
    reps = 0
    begin = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
        reps += 1
        elapsed = time.perf_counter() - begin
        if (reps >= 3 and elapsed >= min_seconds) or elapsed >= 5 * min_seconds:
            break
    return 2.0 * size**3 / best


# (dtype, intra-op threads) -> measured FLOP/s: the benchmark runs once per process, not once per fit.
_CPU_PEAK_CACHE: dict[tuple[torch.dtype, int], float] = {}


def _cpu_peak_flops(dtype: torch.dtype) -> float:
    key = (dtype, torch.get_num_threads())
    if key not in _CPU_PEAK_CACHE:
        _CPU_PEAK_CACHE[key] = _measure_matmul_peak(dtype)
    return _CPU_PEAK_CACHE[key]


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process since it started, in MiB: CUDA max allocated, else peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _MIB
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / _MIB if sys.platform == "darwin" else rss * 1024 / _MIB  # bytes on macOS, KiB on Linux


@dataclass
class _Tally:
    """Sums over a set of timed training batches on one rank (seconds, samples, FLOPs)."""

    samples: int = 0
    batches: int = 0
    wait: float = 0.0
    compute: float = 0.0
    flops: float = 0.0
    flops_missing: int = 0  # timed batches whose FLOPs are unknown
    unsized: int = 0  # timed batches whose number of samples is unknown

    def add(self, other: _Tally) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def seconds(self) -> float:
        return self.wait + self.compute


# What each rank contributes to the one sum- and the one max-reduction at a logging moment.
_SUM_FIELDS = (
    "samples_per_sec",
    "batches_per_sec",
    "flops_per_sec",
    "peak_flops_per_sec",
    "ranks_timed",
    "ranks_sized",
    "ranks_with_flops",
    "ranks_with_peak",
)
_MAX_FIELDS = ("step_time", "data_wait_fraction", "peak_memory_mb")


def _rank_contribution(tally: _Tally, peak: float | None, memory_mb: float) -> tuple[list[float], list[float]]:
    """This rank's values for the sum-reduction (``_SUM_FIELDS``) and the max-reduction (``_MAX_FIELDS``)."""
    seconds = tally.seconds
    if tally.batches == 0 or seconds <= 0:
        return [0.0] * len(_SUM_FIELDS), [0.0, 0.0, memory_mb]
    sized = tally.unsized == 0
    has_flops = tally.flops_missing == 0
    has_peak = has_flops and peak is not None
    sums = [
        tally.samples / seconds if sized else 0.0,
        tally.batches / seconds,
        tally.flops / seconds if has_flops else 0.0,
        float(peak) if has_peak and peak is not None else 0.0,
        1.0,
        float(sized),
        float(has_flops),
        float(has_peak),
    ]
    return sums, [seconds / tally.batches, tally.wait / seconds, memory_mb]


def _throughput_metrics(
    tally: _Tally,
    peak: float | None,
    memory_mb: float,
    summed: list[float],
    maxed: list[float],
    world_size: int,
) -> dict[str, float]:
    """Metrics (keys without the ``throughput/`` prefix) from this rank's tally and the reduced values.

    ``summed``/``maxed`` are the element-wise sum/max over ranks of :func:`_rank_contribution`. Global
    sums are extrapolated to ``world_size`` when some rank timed no batch in the interval.
    """
    local, local_max = _rank_contribution(tally, peak, memory_mb)
    mine = dict(zip(_SUM_FIELDS, local))
    s = dict(zip(_SUM_FIELDS, summed))
    m = dict(zip(_MAX_FIELDS, maxed))
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


def _format_summary(
    metrics: dict[str, float],
    world_size: int,
    batches: int,
    timed_seconds: float,
    wall_seconds: float,
    peak_note: str,
) -> str:
    """The end-of-fit table printed on rank 0."""

    def num(key: str, fmt: str) -> str:
        return format(metrics[key], fmt) if key in metrics else "n/a"

    return "\n".join(
        [
            f"ThroughputMeter summary ({world_size} rank(s), {batches:,} timed batches on rank 0)",
            f"  samples/s      {num('global_samples_per_sec', ',.1f')} global, {num('samples_per_sec', ',.1f')} rank 0",
            f"  MFU            {num('mfu', '.1%')} ({peak_note})",
            f"  data wait      {num('data_wait_fraction', '.1%')} rank 0, {num('data_wait_fraction_max', '.1%')} max",
            f"  peak memory    {num('peak_memory_mb_max', ',.0f')} MiB (max over ranks)",
            f"  training time  {timed_seconds:,.1f} s in timed batches (whole run, rank 0), "
            f"{wall_seconds:,.1f} s wall for this fit's training",
        ]
    )


def _batch_role(must_count_flops: bool, window_step: int, warmup_steps: int) -> str:
    """What to do with the next training batch: ``"count"`` its FLOPs (counting slows it: not timed),
    skip it as ``"warmup"``, or ``"time"`` it."""
    if must_count_flops:
        return "count"
    return "warmup" if window_step < warmup_steps else "time"


class _HostTimer:
    """Wait/compute split of each batch from the host clock (CPU: work is synchronous)."""

    def __init__(self) -> None:
        self._ready = _clock()
        self._start: float | None = None
        self._wait = 0.0
        self._compute = 0.0

    def anchor(self) -> None:
        """The trainer is ready for the next batch: data wait of the next batch counts from here."""
        self._ready = _clock()
        self._start = None

    def start(self) -> None:
        self._start = _clock()

    def stop(self) -> bool:
        """Ends a batch; False when it was not started (then it only re-anchors)."""
        now = _clock()
        if self._start is None:
            self._ready = now
            return False
        self._wait += self._start - self._ready
        self._compute += now - self._start
        self._ready = now
        self._start = None
        return True

    def drain(self) -> tuple[float, float]:
        """(wait, compute) seconds of the batches stopped since the last drain."""
        out = (self._wait, self._compute)
        self._wait = self._compute = 0.0
        return out


class _CudaTimer:
    """Wait/compute split on the device timeline with CUDA events: no per-step synchronization.

    The device reaches a batch's start event either when it finished the previous work (no wait) or
    when the host submitted the batch (it sat idle waiting for data): the gap between the previous
    end event and this start event is the data wait as the device saw it.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._ready = self._record()
        self._start: torch.cuda.Event | None = None
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event, torch.cuda.Event]] = []

    def _record(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self._device))
        return event

    def anchor(self) -> None:
        self._ready = self._record()
        self._start = None

    def start(self) -> None:
        self._start = self._record()

    def stop(self) -> bool:
        end = self._record()
        start = self._start
        if start is not None:
            self._pending.append((self._ready, start, end))
        self._ready = end
        self._start = None
        return start is not None

    def drain(self) -> tuple[float, float]:
        if not self._pending:
            return 0.0, 0.0
        self._pending[-1][2].synchronize()  # the only synchronization: at logging moments
        wait = sum(ready.elapsed_time(start) for ready, start, _ in self._pending) / 1000.0
        compute = sum(start.elapsed_time(end) for _, start, end in self._pending) / 1000.0
        self._pending.clear()
        return wait, compute


class ThroughputMeter(Callback):
    """Logs training samples/s, data wait vs compute, FLOP/s and MFU, and peak memory, per rank and global.

    Every training batch is split into *data wait* (from the end of the previous training batch, or
    from the start of the epoch or the end of validation, to the start of this one: fetching from the
    DataLoader, host-to-device copy, ``on_before/after_batch_transfer`` such as device-side
    augmentation, and hooks and logging that run between batches) and *compute* (from
    ``on_train_batch_start`` to ``on_train_batch_end``: forward, backward, optimizer step). Sanity
    checking, validation and the time between epochs are not counted. On CPU the host clock is used;
    on CUDA, events on the device timeline, so the device is synchronized only at logging moments
    (every ``log_every_n_steps`` batches and at the end of each epoch), never every step.

    The first ``warmup_steps`` batches of a fit (and after every batch-size change) are not timed.
    Samples are counted from each real batch (``batch_size_fn``, default Lightning's
    ``extract_batch_size``), so partial last batches and batch-size changes are exact.

    FLOPs: if the LightningModule has ``flops_per_batch`` (attribute or property, not None), it is
    read at every training batch and taken as the FLOPs (forward + backward) of *that* batch, so a
    plain attribute is right only for a fixed batch size; make it a property of the batch size
    otherwise. If not, the FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` during
    the first real training batch of each batch size (between ``on_train_batch_start`` and
    ``on_train_batch_end``: the real step, nothing re-run, training state untouched), and counted
    again after the model changes (number or trainability of parameters, checked at logging moments
    and epoch starts) or the batch size is announced as changed. A batch that is counted is not timed
    (counting slows it down). FlopCounterMode counts matmuls and convolutions (2 FLOPs per
    multiply-add), not element-wise ops; recomputation (activation checkpointing) counts as work.

    MFU = FLOP/s ÷ peak FLOP/s of the device in the run's compute dtype (from the trainer's
    precision: ``32-true`` -> fp32, or tf32 on Ampere+ when cuDNN (its default for convolutions) or
    matmuls may use TF32; ``bf16-*`` -> bf16; ``16-*`` -> fp16). The peak comes from
    ``peak_flops_per_sec`` if given, else from a table of dense datasheet peaks (H200, H100, A100,
    L40S, L40, L4, T4, V100), else, on CPU, from a short matmul benchmark in that dtype (0.2-1 s,
    once per process and thread count): **MFU on CPU is relative to that measured matmul peak**, not
    a datasheet figure. On an unknown accelerator without ``peak_flops_per_sec``, MFU is not logged
    and one warning says so. The benchmark draws its operands from a private generator and FLOPs
    are counted on the real step, so the meter changes neither the random number streams nor the
    model: on a CPU, a fit with it ends with the same weights as one without it.
    Global MFU = sum of FLOP/s over ranks ÷ sum of the ranks' peaks.

    Distributed: at each logging moment every rank contributes its own rates; global rates are the
    sum over ranks and the slowest rank's step time is the max, reduced with
    ``trainer.strategy.reduce`` in exactly two reductions (one ``"sum"``, one ``"max"``, each over one
    stacked tensor) at the same batches on every rank. Per-rank keys are rank 0's values (the loggers
    write from rank 0).

    Batch-size change protocol: code that changes the batch size mid-fit (e.g. a dynamic batch-size
    callback) calls ``on_batch_size_changed(trainer, pl_module, batch_size)`` on every callback in
    ``trainer.callbacks`` that has that method, on every rank, after the change. The meter then
    forgets its FLOPs counts, starts a fresh rate window (the current interval is dropped from
    interval metrics but kept in epoch and total figures) and warms up again. No import is needed:
    look the method up with ``getattr``.

    At the end of training (``on_train_end``) rank 0 prints a summary: samples/s, MFU, data-wait %,
    peak memory and training time.

    Args:
        log_every_n_steps: log every this many training batches; None: the trainer's
            ``log_every_n_steps``. Must be >= 1.
        warmup_steps: training batches at the start of a fit, and after a batch-size change, that
            are not timed (allocator, cudnn autotuning, worker start-up). Must be >= 0.
        peak_flops_per_sec: peak FLOP/s of one device in the run's dtype, overriding the table and
            the CPU benchmark. Must be > 0.
        measure_flops: count FLOPs with ``FlopCounterMode`` when the module has no ``flops_per_batch``.
            False: no FLOPs unless the module provides them (and no CPU peak benchmark).
        batch_size_fn: number of samples in a batch; None: ``extract_batch_size`` (first tensor's
            first dimension).
        print_summary: print the end-of-training summary on rank 0.
        name: tells two instances in one Trainer apart in checkpoints (``None``: the class name
            alone). Settings are not part of the key, so a run resumed with other settings keeps
            this callback's state; state saved under an older key that listed settings is adopted.

    Logged keys (to ``trainer.loggers`` at the index of the last optimizer step measured, the step
    Lightning logs ``self.log`` values at; per-rank keys are rank 0's):

    - ``throughput/samples_per_sec``, ``throughput/batches_per_sec``: this rank, last interval.
    - ``throughput/global_samples_per_sec``, ``throughput/global_batches_per_sec``: sum over ranks.
    - ``throughput/step_time``: this rank's mean seconds per batch (wait + compute);
      ``throughput/step_time_max``: the slowest rank's (straggler).
    - ``throughput/data_wait_fraction``: data wait ÷ (wait + compute) on this rank;
      ``throughput/data_wait_fraction_max``: the largest over ranks.
    - ``throughput/flops_per_sample``, ``throughput/flops_per_sec``, ``throughput/global_flops_per_sec``:
      only when FLOPs are known.
    - ``throughput/mfu``: global FLOP/s ÷ sum of peaks (0..1), only when FLOPs and peak are known.
    - ``throughput/peak_memory_mb``: this process's peak (CUDA max allocated, else peak RSS) in MiB;
      ``throughput/peak_memory_mb_max``: the largest over ranks.
    - ``throughput/epoch_<key>`` at the end of each training epoch, over the epoch's timed batches,
      for every key above except the memory ones (``throughput/epoch_samples_per_sec``,
      ``throughput/epoch_global_samples_per_sec``, ``throughput/epoch_mfu``, ...).

    Attributes:
        summary: after each ``fit``, the whole run's figures, reduced over ranks (the keys above
            without ``throughput/``, e.g. ``global_samples_per_sec``, ``mfu``,
            ``data_wait_fraction_max``, ``peak_memory_mb_max``): what the printed summary shows,
            for a script to read. Empty before the first fit ends.

    Raises:
        ValueError: if an argument is out of range (the message names it and what is allowed).

    Example::

        trainer:
          callbacks:
            - class_path: lit_accel.callbacks.ThroughputMeter
              init_args:
                warmup_steps: 3
                # peak_flops_per_sec: 989.4e12  # override the table / CPU benchmark
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        warmup_steps: int = 3,
        peak_flops_per_sec: float | None = None,
        measure_flops: bool = True,
        batch_size_fn: Callable[[Any], int] | None = None,
        print_summary: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__()
        check_name(name)
        self.name = name
        if log_every_n_steps is not None and not (is_int(log_every_n_steps) and log_every_n_steps >= 1):
            raise ValueError(
                f"log_every_n_steps={log_every_n_steps!r} is not allowed: use an integer >= 1, "
                "or None for the trainer's"
            )
        if not (is_int(warmup_steps) and warmup_steps >= 0):
            raise ValueError(f"warmup_steps={warmup_steps!r} is not allowed: use an integer >= 0")
        if peak_flops_per_sec is not None and (
            isinstance(peak_flops_per_sec, bool)
            or not isinstance(peak_flops_per_sec, (int, float))
            or not math.isfinite(peak_flops_per_sec)
            or peak_flops_per_sec <= 0
        ):
            raise ValueError(
                f"peak_flops_per_sec={peak_flops_per_sec!r} is not allowed: use a finite number > 0 "
                "(FLOP/s of one device), or None for the built-in table / CPU benchmark"
            )
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise ValueError(
                f"batch_size_fn={batch_size_fn!r} is not allowed: use a callable (batch -> number of samples), or None"
            )
        if not isinstance(measure_flops, bool):
            raise ValueError(f"measure_flops={measure_flops!r} is not allowed: use true or false")
        if not isinstance(print_summary, bool):
            raise ValueError(f"print_summary={print_summary!r} is not allowed: use true or false")
        self.log_every_n_steps = log_every_n_steps
        self.warmup_steps = warmup_steps
        self.peak_flops_per_sec = None if peak_flops_per_sec is None else float(peak_flops_per_sec)
        self.measure_flops = measure_flops
        self.batch_size_fn = batch_size_fn
        self.print_summary = print_summary

        # progress, saved in checkpoints: sums over all timed batches of the run
        self._total = _Tally()
        # per fit
        self._timer: _HostTimer | _CudaTimer | None = None
        self._every = 1
        self._device = torch.device("cpu")
        self._peak: float | None = None
        self._peak_note = "no peak"
        self.summary: dict[str, float] = {}
        self._pending = _Tally()  # timed batches not yet drained from the timer
        self._interval = _Tally()
        self._epoch = _Tally()
        self._batches_seen = 0  # training batches in this fit, the same on every rank
        self._window_step = 0  # batches since the fit started or the batch size was announced
        self._flops_cache: dict[int | None, float | None] = {}  # batch size -> FLOPs (None: not countable)
        self._model_signature: tuple[int, int, int, int] | None = None
        self._counter: FlopCounterMode | None = None
        self._counting_size: int | None = None
        self._step: tuple[int | None, float | None] | None = None  # (samples, FLOPs) of the batch being timed
        self._train_started_at = 0.0
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return identity_state_key(type(self).__qualname__, name=self.name)

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        adopt_older_state(checkpoint, self.state_key, type(self).__qualname__, name=self.name)

    # ----------------------------------------------------------------- setup

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._device = trainer.strategy.root_device
        self._every = self.log_every_n_steps or max(1, int(trainer.log_every_n_steps))  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
        self._peak, self._peak_note = self._resolve_peak(trainer, pl_module)

    def _resolve_peak(self, trainer: Trainer, pl_module: LightningModule) -> tuple[float | None, str]:
        if self.peak_flops_per_sec is not None:
            return self.peak_flops_per_sec, f"peak {self.peak_flops_per_sec:.3g} FLOP/s per device, given"
        if not self.measure_flops and getattr(pl_module, "flops_per_batch", None) is None:
            return None, "no FLOPs"
        key = _precision_dtype_key(trainer.precision)
        device = self._device
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            if key == "fp32" and torch.cuda.get_device_capability(device) >= (8, 0) and _cuda_fp32_uses_tf32():
                key = "tf32"
            peak = None if key is None else _gpu_peak_flops(name, key, device)
            if peak is None:
                self._warn_once(
                    "peak",
                    f"ThroughputMeter: no peak FLOP/s known for {name!r} in {key or trainer.precision}; MFU is not "
                    "logged. Pass peak_flops_per_sec (FLOP/s of one device) to get it.",
                )
                return None, "unknown device"
            return peak, f"peak {peak / 1e12:,.1f} TFLOP/s per device, {name} {key} datasheet"
        if device.type == "cpu" and key is not None:
            peak = _cpu_peak_flops(_DTYPE_KEYS[key])
            rank_zero_info(
                f"ThroughputMeter: measured CPU matmul peak {peak / 1e9:,.1f} GFLOP/s ({key}); MFU is relative to it"
            )
            return peak, f"relative to a measured CPU {key} matmul peak of {peak / 1e9:,.1f} GFLOP/s per rank"
        self._warn_once(
            "peak",
            f"ThroughputMeter: no peak FLOP/s known for device {device} with precision {trainer.precision!r}; "
            "MFU is not logged. Pass peak_flops_per_sec to get it.",
        )
        return None, "unknown device"

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._timer = _CudaTimer(self._device) if self._device.type == "cuda" else _HostTimer()
        self._pending, self._interval, self._epoch = _Tally(), _Tally(), _Tally()
        self._batches_seen = 0
        self._window_step = 0
        self._flops_cache.clear()
        self._model_signature = _signature(pl_module)
        self._train_started_at = time.perf_counter()

    # ---------------------------------------------------------- per batch

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._timer is None:
            return
        self._check_model(pl_module)
        self._epoch = _Tally()
        self._timer.anchor()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._timer is None:
            return
        size = self._batch_size(batch)
        flops = getattr(pl_module, "flops_per_batch", None)
        auto = flops is None and self.measure_flops
        role = _batch_role(auto and size not in self._flops_cache, self._window_step, self.warmup_steps)
        if role == "count":
            self._start_counting(size)
        elif role == "time":
            flops = self._flops_cache[size] if auto else flops
            self._step = (size, None if flops is None else float(flops))
            self._timer.start()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._timer is None:
            return
        if self._counter is not None:
            self._stop_counting(skipped=pl_module.automatic_optimization and outputs is None)
        if self._timer.stop() and self._step is not None:
            size, flops = self._step
            self._pending.batches += 1
            self._pending.samples += size or 0
            self._pending.unsized += size is None
            self._pending.flops += flops or 0.0
            self._pending.flops_missing += flops is None
        self._step = None
        self._batches_seen += 1
        self._window_step += 1
        if self._batches_seen % self._every == 0:
            self._log_interval(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # validation inside fit is not training time: the next batch's data wait counts from here
        if self._timer is not None and not trainer.sanity_checking:
            self._timer.anchor()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._timer is None:
            return
        self._abandon_counting()
        self._drain()
        metrics = self._reduce_metrics(trainer, self._epoch, with_memory=False)
        self._log(trainer, {f"epoch_{k}": v for k, v in metrics.items()})

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._timer is None:
            return
        self._abandon_counting()
        self._drain()
        wall = time.perf_counter() - self._train_started_at
        metrics = self._reduce_metrics(trainer, self._total, with_memory=True)
        self.summary = dict(metrics)
        if self.print_summary:
            total = self._total
            text = _format_summary(metrics, trainer.world_size, total.batches, total.seconds, wall, self._peak_note)
            rank_zero_info(text)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._abandon_counting()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._abandon_counting()
        if stage == "fit":
            self._timer = None  # CUDA events do not pickle

    # ----------------------------------------------------------- protocol

    def on_batch_size_changed(self, trainer: Trainer, pl_module: LightningModule, batch_size: int) -> None:
        """Called (on every rank) by whatever changed the training batch size, after the change.

        Forgets the FLOPs counts, drops the current interval from interval metrics (its batches stay
        in epoch and total figures) and warms up again for ``warmup_steps`` batches.
        """
        if not (is_int(batch_size) and batch_size >= 1):
            raise ValueError(f"batch_size={batch_size!r} is not allowed: use the new batch size, an integer >= 1")
        log.debug("ThroughputMeter: batch size changed to %d; fresh rate window", batch_size)
        self._flops_cache.clear()
        self._window_step = 0
        if self._timer is not None:
            self._drain()
        self._interval = _Tally()

    # ------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._timer is not None:
            self._drain()
        return {f.name: getattr(self._total, f.name) for f in fields(_Tally)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # keys missing from older checkpoints load as zero
        default = _Tally()
        values = {}
        for f in fields(_Tally):
            zero = getattr(default, f.name)
            values[f.name] = type(zero)(state_dict.get(f.name, zero))
        self._total = _Tally(**values)

    # ------------------------------------------------------------ helpers

    def _batch_size(self, batch: Any) -> int | None:
        try:
            return int(self.batch_size_fn(batch)) if self.batch_size_fn is not None else extract_batch_size(batch)
        except Exception as err:  # a meter must not stop training
            self._warn_once(
                "size",
                f"ThroughputMeter: cannot tell the batch size ({err}); pass batch_size_fn. Samples/s is not logged.",
            )
            return None

    def _start_counting(self, size: int | None) -> None:
        self._counter = FlopCounterMode(display=False)
        self._counter.__enter__()
        self._counting_size = size

    def _stop_counting(self, skipped: bool) -> None:
        counter, self._counter = self._counter, None
        assert counter is not None  # the caller checks that a count runs
        counter.__exit__(None, None, None)
        if skipped:  # training_step returned None: no backward ran, count again on the next batch
            return
        flops = counter.get_total_flops()
        if flops <= 0:
            self._warn_once(
                "flops",
                "ThroughputMeter: FlopCounterMode counted no FLOPs in a training batch (torch.compile?); FLOP/s "
                "and MFU are not logged. Give the LightningModule a flops_per_batch attribute or property.",
            )
        self._flops_cache[self._counting_size] = float(flops) if flops > 0 else None

    def _abandon_counting(self) -> None:
        if self._counter is not None:
            counter, self._counter = self._counter, None
            counter.__exit__(None, None, None)

    def _check_model(self, pl_module: LightningModule) -> None:
        signature = _signature(pl_module)
        if signature != self._model_signature:
            self._model_signature = signature
            self._flops_cache.clear()

    def _drain(self) -> None:
        assert self._timer is not None  # every caller returns early while no timer runs (not fitting)
        wait, compute = self._timer.drain()
        self._pending.wait += wait
        self._pending.compute += compute
        for tally in (self._interval, self._epoch, self._total):
            tally.add(self._pending)
        self._pending = _Tally()

    def _log_interval(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._drain()
        self._check_model(pl_module)
        metrics = self._reduce_metrics(trainer, self._interval, with_memory=True)
        self._interval = _Tally()
        self._log(trainer, metrics)

    def _reduce_metrics(self, trainer: Trainer, tally: _Tally, with_memory: bool) -> dict[str, float]:
        """Every rank calls this at the same batches: the two reductions below are collectives."""
        memory = _peak_memory_mb(self._device)
        sums, maxes = _rank_contribution(tally, self._peak, memory)
        if trainer.world_size > 1:
            dtype = torch.float32 if self._device.type == "mps" else torch.float64
            reduce = trainer.strategy.reduce
            sums = reduce(torch.tensor(sums, dtype=dtype, device=self._device), reduce_op="sum").tolist()
            maxes = reduce(torch.tensor(maxes, dtype=dtype, device=self._device), reduce_op="max").tolist()
        metrics = _throughput_metrics(tally, self._peak, memory, sums, maxes, trainer.world_size)
        if not with_memory:
            metrics = {k: v for k, v in metrics.items() if not k.startswith("peak_memory")}
        return metrics

    def _log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        # no rank timed a batch (warm-up, FLOPs counting): nothing to report
        if not trainer.is_global_zero or not any(k.endswith("global_batches_per_sec") for k in metrics):
            return
        named = {f"throughput/{k}": v for k, v in metrics.items()}
        # At the index of the last optimizer step measured, as Lightning logs `self.log` values
        # (and DivergenceGuard its events), so one step's curves line up in TensorBoard.
        step = max(trainer.global_step - 1, 0)
        for logger in trainer.loggers:
            logger.log_metrics(named, step=step)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def _signature(module: torch.nn.Module) -> tuple[int, int, int, int]:
    """Identity, parameter count, total and trainable elements: a change means the FLOPs may differ."""
    count = total = trainable = 0
    for p in module.parameters():
        count += 1
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return id(module), count, total, trainable
