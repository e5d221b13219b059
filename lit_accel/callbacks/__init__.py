"""Reusable Lightning callbacks: thin adapters over the Trainer-free engines of :mod:`lit_accel.core`.

Each module imports only ``lightning``, ``torch``, the standard library, ``typing_extensions`` (for
``@override``), :mod:`lit_accel.core`, :mod:`lit_accel.callbacks.shared` and (for the pictures)
:mod:`lit_accel.callbacks.drawing`, so each works with any LightningModule and DataModule."""

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
