"""ThroughputMeter: the Lightning adapter over :mod:`lit_accel.core.throughput`.

Imports only ``lightning``, ``torch``, the standard library, ``typing_extensions`` (for
``@override``) and ``lit_accel.core``, so it can be copied with that package into another project.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from typing_extensions import override

from lit_accel.core.checks import check_name, is_int
from lit_accel.core.state_keys import identity_state_key
from lit_accel.core.throughput import (
    DTYPES,
    BatchFlops,
    PeakFlops,
    Tally,
    Throughput,
    device_peak_flops,
    format_summary,
    peak_memory_mb,
    throughput_metrics,
)

__all__ = ["ThroughputMeter"]

log = logging.getLogger(__name__)


def lightning_peak_flops(device: torch.device, dtype_key: str) -> float | None:
    """Lightning's table (``get_available_flops``) for a GPU missing from lit_accel's; it warns when it
    does not know the device either. Some of its rows count structured sparsity: lit_accel's table
    comes first."""
    flops = get_available_flops(device, "tf32" if dtype_key == "tf32" else DTYPES[dtype_key])
    return float(flops) if flops else None


class ThroughputMeter(Callback):
    """Logs training samples/s, data wait vs compute, FLOP/s and MFU, and peak memory, per rank and global.

    Each training batch is split into *data wait* (from the previous batch's end, the epoch's start
    or validation's end, to ``on_train_batch_start``) and *compute* (to ``on_train_batch_end``);
    sanity checking and validation are not counted. CPU: the host clock; CUDA: events, synchronized
    only at logging moments. FLOPs come from the module's ``flops_per_batch`` (of the current batch),
    else are counted once per batch size on a real batch with ``FlopCounterMode`` (that batch is
    not timed); MFU is against a GPU datasheet table or, on a CPU, a measured matmul peak. Ranks
    agree in one sum and one max reduction per logging moment. The README's callbacks section
    tells the rest.

    Batch-size change protocol (:class:`lit_accel.callbacks.shared.BatchSizeListener`): whatever
    changes the batch size mid-fit calls ``on_batch_size_changed(trainer, pl_module, batch_size)``
    on every rank; the meter recounts FLOPs, starts a fresh rate window and warms up again.

    Args:
        log_every_n_steps: log every this many training batches; None: the trainer's. >= 1.
        warmup_steps: batches not timed at the start of a fit and after a batch-size change. >= 0.
        peak_flops_per_sec: peak FLOP/s of one device in the run's dtype, overriding the table and
            the CPU benchmark. > 0.
        measure_flops: count FLOPs when the module has no ``flops_per_batch``; False: no FLOPs
            (and no CPU peak benchmark) unless the module gives them.
        batch_size_fn: number of samples in a batch; None: Lightning's ``extract_batch_size``.
        print_summary: print the end-of-training summary on rank 0.
        name: tells two instances in one Trainer apart in checkpoints (None: the class name).

    Logged keys (``trainer.loggers``, at the last optimizer step measured; per-rank keys are rank 0's):
        ``throughput/samples_per_sec``, ``throughput/batches_per_sec`` (this rank, last interval);
        ``throughput/global_samples_per_sec``, ``throughput/global_batches_per_sec`` (all ranks);
        ``throughput/step_time``, ``throughput/step_time_max`` (seconds per batch; slowest rank);
        ``throughput/data_wait_fraction``, ``throughput/data_wait_fraction_max``;
        ``throughput/flops_per_sample``, ``throughput/flops_per_sec``,
        ``throughput/global_flops_per_sec``, ``throughput/mfu`` (when FLOPs and the peak are known);
        ``throughput/peak_memory_mb``, ``throughput/peak_memory_mb_max`` (CUDA max allocated, else
        peak RSS); and at each epoch's end ``throughput/epoch_<key>`` for every key above but memory.

    Attributes:
        summary: after each ``fit``, the run's figures reduced over ranks (the keys above without
            ``throughput/``): what the printed summary shows. Empty before the first fit ends.
        device_peak: the peak FLOP/s used for MFU and where it came from (after ``setup``).
        flops: the FLOPs counted per batch size in this fit (``flops.counted``).
        clock: host clock for step timing (``time.perf_counter``; tests replace it).

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

    clock: Callable[[], float] = time.perf_counter

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
        self.summary: dict[str, float] = {}
        self.device_peak = PeakFlops(None, "no peak", None)
        self._total = Tally()  # progress, saved in checkpoints: the run's timed batches
        self._throughput: Throughput | None = None  # per fit (its CUDA events do not pickle)
        self.flops = BatchFlops()
        self._device = torch.device("cpu")
        self._every = 1
        self._train_started_at = 0.0
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return identity_state_key(type(self).__qualname__, name=self.name)

    # ------------------------------------------------------------------------------------ fit start
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._device = trainer.strategy.root_device
        self._every = self.log_every_n_steps or max(1, int(trainer.log_every_n_steps))  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
        self.device_peak = self._resolve_peak(trainer, pl_module)

    def _resolve_peak(self, trainer: Trainer, pl_module: LightningModule) -> PeakFlops:
        if self.peak_flops_per_sec is not None:
            given = self.peak_flops_per_sec
            return PeakFlops(given, f"peak {given:.3g} FLOP/s per device, given", None)
        if not self.measure_flops and getattr(pl_module, "flops_per_batch", None) is None:
            return PeakFlops(None, "no FLOPs", None)
        peak = device_peak_flops(self._device, str(trainer.precision), fallback=lightning_peak_flops)
        if peak.flops is None:
            self._warn_once(
                "peak",
                f"ThroughputMeter: {peak.note}; MFU is not logged. Pass peak_flops_per_sec (FLOP/s of one "
                "device) to get it.",
            )
            return peak._replace(note="unknown device")
        if self._device.type == "cpu":
            rank_zero_info(f"ThroughputMeter: MFU is {peak.note}")
        return peak

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._throughput = Throughput(self._device, self.warmup_steps, clock=self.clock, total=self._total)
        self.flops = BatchFlops()
        self.flops.watch(pl_module)
        self._train_started_at = time.perf_counter()

    # ------------------------------------------------------------------------------------ per batch
    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._throughput is None:
            return
        self.flops.watch(pl_module)
        self._throughput.start_epoch()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._throughput is None:
            return
        size = self._batch_size(batch)
        flops = getattr(pl_module, "flops_per_batch", None)
        if flops is None and self.measure_flops:
            if size not in self.flops.counted:  # count this batch's FLOPs: it runs slower, so untimed
                self.flops.start(size)
                return
            flops = self.flops.counted[size]
        self._throughput.start(size, None if flops is None else float(flops))

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._throughput is None:
            return
        if self.flops.counting:
            # training_step returned None: no backward ran, count a later batch
            flops = self.flops.stop(skipped=pl_module.automatic_optimization and outputs is None)
            if flops == 0:
                self._warn_once(
                    "flops",
                    "ThroughputMeter: FlopCounterMode counted no FLOPs in a training batch (torch.compile?); "
                    "FLOP/s and MFU are not logged. Give the LightningModule a flops_per_batch attribute or property.",
                )
        self._throughput.stop()
        if self._throughput.steps % self._every == 0:
            self.flops.watch(pl_module)
            self._log(trainer, self._metrics(trainer, self._throughput.take_interval(), with_memory=True))

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # validation inside fit is not training time: the next batch's data wait counts from here
        if self._throughput is not None and not trainer.sanity_checking:
            self._throughput.anchor()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._throughput is None:
            return
        self.flops.abandon()
        self._throughput.flush()
        metrics = self._metrics(trainer, self._throughput.epoch, with_memory=False)
        self._log(trainer, {f"epoch_{k}": v for k, v in metrics.items()})

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._throughput is None:
            return
        self.flops.abandon()
        self._throughput.flush()
        wall = time.perf_counter() - self._train_started_at
        self.summary = self._metrics(trainer, self._total, with_memory=True)
        if self.print_summary:
            total, note, title = self._total, self.device_peak.note, "ThroughputMeter summary"
            text = format_summary(self.summary, trainer.world_size, total.batches, total.seconds, wall, note, title)
            rank_zero_info(text)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.flops.abandon()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.flops.abandon()
        if stage == "fit":
            self._throughput = None

    def on_batch_size_changed(self, trainer: Trainer, pl_module: LightningModule, batch_size: int) -> None:
        """Called (on every rank) by whatever changed the training batch size, after the change.

        Forgets the FLOPs counts, drops the current interval from interval metrics (its batches stay
        in epoch and total figures) and warms up again for ``warmup_steps`` batches.

        Raises:
            ValueError: if ``batch_size`` is not an integer >= 1.
        """
        if not (is_int(batch_size) and batch_size >= 1):
            raise ValueError(f"batch_size={batch_size!r} is not allowed: use the new batch size, an integer >= 1")
        log.debug("ThroughputMeter: batch size changed to %d; fresh rate window", batch_size)
        self.flops.forget()
        if self._throughput is not None:
            self._throughput.restart_window()

    # ------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._throughput is not None:
            self._throughput.flush()
        return self._total.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._total = Tally.from_state_dict(state_dict)  # keys missing from older checkpoints load as zero
        if self._throughput is not None:
            self._throughput.total = self._total

    # ------------------------------------------------------------------------------------ helpers
    def _batch_size(self, batch: Any) -> int | None:
        try:
            return int(self.batch_size_fn(batch)) if self.batch_size_fn is not None else extract_batch_size(batch)
        except Exception as err:  # a meter must not stop training
            self._warn_once(
                "size",
                f"ThroughputMeter: cannot tell the batch size ({err}); pass batch_size_fn. Samples/s is not logged.",
            )
            return None

    def _metrics(self, trainer: Trainer, tally: Tally, with_memory: bool) -> dict[str, float]:
        """Every rank calls this at the same batches: with several ranks it runs two collectives."""

        def reduce(values: list[float], op: str) -> list[float]:
            dtype = torch.float32 if self._device.type == "mps" else torch.float64
            tensor = torch.tensor(values, dtype=dtype, device=self._device)
            return trainer.strategy.reduce(tensor, reduce_op=op).tolist()

        memory = peak_memory_mb(self._device)
        world = trainer.world_size
        metrics = throughput_metrics(tally, self.device_peak.flops, memory, world, reduce if world > 1 else None)
        return metrics if with_memory else {k: v for k, v in metrics.items() if not k.startswith("peak_memory")}

    def _log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        # no rank timed a batch (warm-up, FLOPs counting): nothing to report
        if not trainer.is_global_zero or not any(k.endswith("global_batches_per_sec") for k in metrics):
            return
        named = {f"throughput/{k}": v for k, v in metrics.items()}
        # at the index of the last optimizer step measured, as Lightning logs `self.log` values
        step = max(trainer.global_step - 1, 0)
        for logger in trainer.loggers:
            logger.log_metrics(named, step=step)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)
