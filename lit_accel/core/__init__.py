"""Trainer-free engines: torch and the standard library only, never ``lightning``.

Plain PyTorch loops, Lightning Fabric loops and lit_accel's callbacks all use these; the callbacks
in :mod:`lit_accel.callbacks` are thin adapters over them (README: "Use the engines outside Lightning").
The two ``Reason`` Enums are not re-exported here (they would clash): import them from
:mod:`lit_accel.core.divergence` and :mod:`lit_accel.core.batch_plan`.
"""

from lit_accel.core.batch_plan import (
    BatchDecision,
    BatchPlan,
    BatchPlanError,
    BatchSetting,
    Plateau,
    batch_lr_factor,
    progress_epochs,
    split_samples,
)
from lit_accel.core.checks import check_int, check_name, fmt, is_int, is_number, require
from lit_accel.core.dist import all_sum, local_tensor, shard_groups, squared_norm_share, total_norm
from lit_accel.core.divergence import Action, DivergenceDetector, Kind, Verdict, back_off, drop_gradients
from lit_accel.core.lr_scaling import DYNAMIC_LR_SCALE_KEY, GROUP_LR_KEYS, apply_lr_scale, scale_learning_rates
from lit_accel.core.snapshot import Snapshot, host_weights, load_weights
from lit_accel.core.state_keys import identity_state_key
from lit_accel.core.throughput import (
    BatchFlops,
    PeakFlops,
    StepTimer,
    Tally,
    Throughput,
    TimedSteps,
    device_peak_flops,
    format_summary,
    measure_flops,
    peak_memory_mb,
    peak_rss_mb,
    reset_peak_memory,
    reset_peak_rss,
    throughput_metrics,
)

__all__ = [
    "Action",
    "BatchDecision",
    "BatchFlops",
    "BatchPlan",
    "BatchPlanError",
    "BatchSetting",
    "DYNAMIC_LR_SCALE_KEY",
    "DivergenceDetector",
    "GROUP_LR_KEYS",
    "Kind",
    "PeakFlops",
    "Plateau",
    "Snapshot",
    "StepTimer",
    "Tally",
    "Throughput",
    "TimedSteps",
    "Verdict",
    "all_sum",
    "apply_lr_scale",
    "back_off",
    "batch_lr_factor",
    "check_int",
    "check_name",
    "device_peak_flops",
    "drop_gradients",
    "fmt",
    "format_summary",
    "host_weights",
    "identity_state_key",
    "is_int",
    "is_number",
    "load_weights",
    "local_tensor",
    "measure_flops",
    "peak_memory_mb",
    "peak_rss_mb",
    "progress_epochs",
    "require",
    "reset_peak_memory",
    "reset_peak_rss",
    "scale_learning_rates",
    "shard_groups",
    "split_samples",
    "squared_norm_share",
    "throughput_metrics",
    "total_norm",
]
