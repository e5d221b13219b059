"""Reusable Lightning callbacks. Each module imports only ``lightning``, ``torch``, the standard
library, ``typing_extensions`` (for ``@override``; torch and lightning require it) and, for
checkpoint state keys, the private ``_state_keys.py`` (standard library only), so it can be copied
into another project with that one helper file."""

from lit_accel.callbacks.divergence_guard import DivergenceError, DivergenceGuard
from lit_accel.callbacks.dynamic_batch_lr import DynamicBatchLR
from lit_accel.callbacks.generalization_monitor import GeneralizationMonitor
from lit_accel.callbacks.hparams_summary import HParamsSummary
from lit_accel.callbacks.prediction_writer import PredictionCSVWriter
from lit_accel.callbacks.preemption_checkpoint import PreemptionCheckpoint
from lit_accel.callbacks.rng_state import RNGStateCheckpoint
from lit_accel.callbacks.throughput_meter import ThroughputMeter
from lit_accel.callbacks.validation_figures import ValidationFigures

__all__ = [
    "DivergenceError",
    "DivergenceGuard",
    "DynamicBatchLR",
    "GeneralizationMonitor",
    "HParamsSummary",
    "PredictionCSVWriter",
    "PreemptionCheckpoint",
    "RNGStateCheckpoint",
    "ThroughputMeter",
    "ValidationFigures",
]
