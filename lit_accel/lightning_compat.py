"""The private members of Lightning that lit_accel relies on, in one place.

Lightning may rename or drop a private member in any release. pyproject.toml therefore pins the
minor version these were checked against (``lightning>=2.6,<2.7``), and
``tests/test_lightning_compat.py`` checks that each one below exists, naming the member and its
user when one is gone. Before widening the pin, run that test against the new release; when
lit_accel starts using another private member, add it here.

Members used inside ``lit_accel/callbacks/`` are listed too (those modules import nothing from the
rest of lit_accel, so the list lives here and not next to them).
"""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from typing_extensions import override

__all__ = ["PRIVATE_LIGHTNING_MEMBERS", "PrivateMember", "missing_private_members"]


@dataclass(frozen=True)
class PrivateMember:
    """A private member of a Lightning object.

    Args:
        owner: ``module:Name`` of a class or module; with ``instance``, an object built from it
            (see ``_INSTANCES``) is checked instead, for attributes set in ``__init__``.
        name: the attribute, dotted for a chain (``_logger_connector.should_update_logs``).
        used_by: the lit_accel file that uses it, and what for.
        instance: check an instance of ``owner`` rather than the class.
    """

    owner: str
    name: str
    used_by: str
    instance: bool = False

    @override
    def __str__(self) -> str:
        owner = self.owner.split(":")[1] + ("()" if self.instance else "")
        return f"{owner}.{self.name}"


_CLI = "lightning.pytorch.cli:LightningCLI"
_MODEL_CHECKPOINT = "lightning.pytorch.callbacks:ModelCheckpoint"
_TRAINER = "lightning.pytorch:Trainer"

PRIVATE_LIGHTNING_MEMBERS: tuple[PrivateMember, ...] = (
    PrivateMember(
        _CLI,
        "_parse_ckpt_path",
        "lit_accel/cli.py: LightningCLI calls it after parse_arguments to rebuild the model from a --ckpt_path "
        "file's hyperparameters; LitAccelCLI resolves best/last before it so aliases get that too",
    ),
    PrivateMember(
        "lightning.pytorch.trainer.connectors.checkpoint_connector:_CheckpointConnector",
        "hpc_save_path",
        "lit_accel/checkpoints.py: --ckpt_path last also finds the hpc_ckpt_<n>.ckpt files this names "
        "(SLURM requeue, saved in trainer.default_root_dir)",
    ),
    PrivateMember(
        _MODEL_CHECKPOINT,
        "_should_skip_saving_checkpoint",
        "lit_accel/checkpoints.py: LastAfterEveryValidation saves last.ckpt after every validation",
    ),
    PrivateMember(
        _MODEL_CHECKPOINT, "_should_save_on_train_epoch_end", "lit_accel/checkpoints.py: LastAfterEveryValidation"
    ),
    PrivateMember(_MODEL_CHECKPOINT, "_save_last_checkpoint", "lit_accel/checkpoints.py: LastAfterEveryValidation"),
    PrivateMember(_MODEL_CHECKPOINT, "_monitor_candidates", "lit_accel/checkpoints.py: LastAfterEveryValidation"),
    PrivateMember(
        _MODEL_CHECKPOINT,
        "_last_global_step_saved",
        "lit_accel/checkpoints.py: LastAfterEveryValidation",
        instance=True,
    ),
    PrivateMember(
        "lightning.pytorch.strategies:ModelParallelStrategy",
        "_data_parallel_size",
        "lit_accel/strategies.py: FSDP2Strategy resolves 'auto' to every process",
        instance=True,
    ),
    PrivateMember(
        "lightning.fabric.utilities.load:_load_distributed_checkpoint",
        "__call__",
        "lit_accel/export.py: an FSDP2 checkpoint folder consolidated into one state dict",
    ),
    PrivateMember(
        _TRAINER,
        "_logger_connector.should_update_logs",
        "lit_accel/models/classifier.py: log train/loss_step only on the steps the loggers write",
        instance=True,
    ),
    PrivateMember(
        "lightning.pytorch.core.mixins.hparams_mixin:_given_hyperparameters",
        "get",
        "lit_accel/models/classifier.py: keep the network out of hparams unless LightningCLI builds the model",
    ),
    PrivateMember(
        _TRAINER,
        "fit_loop._combined_loader",
        "lit_accel/callbacks/dynamic_batch_lr.py: reload the training DataLoader mid-fit",
        instance=True,
    ),
    PrivateMember(
        _TRAINER,
        "_accelerator_connector.cluster_environment",
        "lit_accel/callbacks/preemption_checkpoint.py: find SLURM auto-requeue, whose signal it defers to a "
        "batch's end",
        instance=True,
    ),
    PrivateMember(
        _TRAINER,
        "_accelerator_connector.use_distributed_sampler",
        "lit_accel/data/cifar10.py: residency 'device' shards across ranks only where Lightning would inject "
        "a DistributedSampler (Trainer(use_distributed_sampler=...))",
        instance=True,
    ),
    PrivateMember(
        "lightning.pytorch.loggers:TensorBoardLogger",
        "_default_hp_metric",
        "lit_accel/callbacks/hparams_summary.py: warn when Lightning's placeholder hp_metric is on",
        instance=True,
    ),
)


def _trainer() -> Any:
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _tensorboard_logger() -> Any:
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=tempfile.gettempdir())  # writes nothing until first used


# How to build the owner of an instance attribute: cheaply, without side effects.
_INSTANCES: dict[str, Callable[[], Any]] = {
    _TRAINER: _trainer,
    "lightning.pytorch.loggers:TensorBoardLogger": _tensorboard_logger,
}


def _owner(member: PrivateMember, built: dict[str, Any]) -> Any:
    module_name, _, qualname = member.owner.partition(":")
    owner: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        owner = getattr(owner, part)
    if member.instance:
        if member.owner not in built:
            built[member.owner] = _INSTANCES.get(member.owner, owner)()
        owner = built[member.owner]
    return owner


def missing_private_members(members: tuple[PrivateMember, ...] = PRIVATE_LIGHTNING_MEMBERS) -> list[str]:
    """One line per member this Lightning lacks (empty: all present), naming it and its user."""
    import lightning

    missing = []
    built: dict[str, Any] = {}  # one instance per owner
    for member in members:
        try:
            value = _owner(member, built)
            for part in member.name.split("."):
                value = getattr(value, part)
        except (AttributeError, ImportError) as err:
            missing.append(
                f"lightning {lightning.__version__} has no {member} ({type(err).__name__}: {err}), which "
                f"{member.used_by.split(':')[0]} relies on ({member.used_by.split(': ', 1)[-1]}). Install the "
                "Lightning that pyproject.toml pins, or port that code and update lit_accel/lightning_compat.py."
            )
    return missing
