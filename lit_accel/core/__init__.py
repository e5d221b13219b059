"""Trainer-free engines: torch and the standard library only, never ``lightning``.

Plain PyTorch loops, Lightning Fabric loops and lit_accel's callbacks all use these; the callbacks
in :mod:`lit_accel.callbacks` are thin adapters over them.
"""

from lit_accel.core.batch_plan import (
    BatchDecision,
    BatchPlan,
    BatchPlanError,
    BatchSetting,
    Plateau,
    Reason,
    batch_lr_factor,
    progress_epochs,
    split_samples,
)
from lit_accel.core.checks import check_int, check_name, fmt, is_int, is_number, require
from lit_accel.core.dist import local_tensor
from lit_accel.core.lr_scaling import DYNAMIC_LR_SCALE_KEY, GROUP_LR_KEYS, apply_lr_scale, scale_learning_rates
from lit_accel.core.state_keys import adopt_older_state, identity_state_key

__all__ = [
    # batch plans and the LR rescaler
    "BatchDecision",
    "BatchPlan",
    "BatchPlanError",
    "BatchSetting",
    "DYNAMIC_LR_SCALE_KEY",
    "GROUP_LR_KEYS",
    "Plateau",
    "Reason",
    "apply_lr_scale",
    "batch_lr_factor",
    "progress_epochs",
    "scale_learning_rates",
    "split_samples",
    # the rest
    "adopt_older_state",
    "check_int",
    "check_name",
    "fmt",
    "identity_state_key",
    "is_int",
    "is_number",
    "local_tensor",
    "require",
]
