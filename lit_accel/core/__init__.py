"""Trainer-free engines: torch and the standard library only, never ``lightning``.

Plain PyTorch loops, Lightning Fabric loops and lit_accel's callbacks all use these; the callbacks
in :mod:`lit_accel.callbacks` are thin adapters over them.
"""

from lit_accel.core.checks import check_int, check_name, fmt, is_int, is_number, require
from lit_accel.core.dist import all_sum, local_tensor, shard_groups, squared_norm_share, total_norm
from lit_accel.core.divergence import (
    Action,
    DivergenceDetector,
    Kind,
    Reason,
    Verdict,
    back_off,
    drop_gradients,
)
from lit_accel.core.lr_scaling import DYNAMIC_LR_SCALE_KEY, GROUP_LR_KEYS, scale_learning_rates
from lit_accel.core.snapshot import Snapshot, host_weights, load_weights
from lit_accel.core.state_keys import adopt_older_state, identity_state_key
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
    "DYNAMIC_LR_SCALE_KEY",
    "GROUP_LR_KEYS",
    "adopt_older_state",
    "check_int",
    "check_name",
    "fmt",
    "identity_state_key",
    "is_int",
    "is_number",
    "local_tensor",
    "require",
    "scale_learning_rates",
    # Divergence detection and snapshots.
    "Action",
    "DivergenceDetector",
    "Kind",
    "Reason",
    "Snapshot",
    "Verdict",
    "all_sum",
    "back_off",
    "drop_gradients",
    "host_weights",
    "load_weights",
    "shard_groups",
    "squared_norm_share",
    "total_norm",
    # throughput
    "BatchFlops",
    "PeakFlops",
    "StepTimer",
    "Tally",
    "Throughput",
    "TimedSteps",
    "device_peak_flops",
    "format_summary",
    "measure_flops",
    "peak_memory_mb",
    "peak_rss_mb",
    "reset_peak_memory",
    "reset_peak_rss",
    "throughput_metrics",
]
