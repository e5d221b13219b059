"""The ``lit-accel`` command: LightningCLI with lit_accel's model, data and defaults.

``lit-accel fit|validate|test|predict --config configs/cifar10.yaml [--config overlay.yaml …]``.
Defaults: TensorBoard logs under ``runs/``, a checkpoint of the best ``val/acc`` and the last epoch,
the learning rate logged, seed 42. ``--ckpt_path best|last`` finds the newest run's checkpoint under
the logger's folder, also in a fresh process.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from jsonargparse import lazy_instance

from lit_accel.checkpoints import CHECKPOINT_ALIASES, find_checkpoint
from lit_accel.data import CIFAR10DataModule
from lit_accel.errors import LitAccelUserError
from lit_accel.models import ImageClassifier

__all__ = ["LitAccelCLI", "main"]

DEFAULT_LOG_DIR = "runs"

# Lightning 2.6.6 calls a pytree API that torch 2.14 deprecated; users can do nothing about it.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


class LitAccelCLI(LightningCLI):
    """LightningCLI for :class:`ImageClassifier` and :class:`CIFAR10DataModule` with lit_accel's defaults.

    Adds two always-present callbacks, configurable under their own keys: ``checkpoint``
    (ModelCheckpoint: ``best-epoch…-acc….ckpt`` for the best ``val/acc`` and ``last.ckpt``) and
    ``lr_monitor`` (LearningRateMonitor).
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(
            ImageClassifier,
            CIFAR10DataModule,
            seed_everything_default=42,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:03d}-acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults(
            {"trainer.logger": lazy_instance(TensorBoardLogger, save_dir=DEFAULT_LOG_DIR, name="lit_accel")}
        )

    def before_instantiate_classes(self) -> None:
        # TF32 matmuls on Ampere+ GPUs: ~2x faster fp32 GEMMs at CNN-irrelevant precision loss.
        torch.set_float32_matmul_precision("high")
        trainer_config = self.config[self.subcommand]["trainer"] if self.subcommand else self.config["trainer"]
        _check_gpu_available(str(trainer_config.get("accelerator")))

    def before_fit(self) -> None:
        self._resolve_checkpoint_alias("fit")

    def before_validate(self) -> None:
        self._resolve_checkpoint_alias("validate")

    def before_test(self) -> None:
        self._resolve_checkpoint_alias("test")

    def before_predict(self) -> None:
        self._resolve_checkpoint_alias("predict")

    def _resolve_checkpoint_alias(self, subcommand: str) -> None:
        """Turn ``--ckpt_path best|last`` into a file from an earlier run (Lightning knows only its own)."""
        config = self.config_init[subcommand]
        alias = config.get("ckpt_path")
        if alias not in CHECKPOINT_ALIASES:
            return
        root = _log_root(self.trainer)
        path = find_checkpoint(root, alias)
        if path is not None:
            rank_zero_info(f"--ckpt_path {alias}: using {path}")
            config["ckpt_path"] = path
        elif subcommand == "fit" and alias == "last":
            # Resuming with "last" before any checkpoint exists starts afresh, so the same
            # command can be used for the first launch and for every relaunch after preemption.
            rank_zero_info(f"--ckpt_path last: no checkpoint under {root} yet, starting from scratch")
            config["ckpt_path"] = None
        else:
            raise LitAccelUserError(
                f"--ckpt_path {alias}: no {alias!r} checkpoint found under {root}/. Train first with "
                f"'lit-accel fit --config …' (same logger settings), or pass the checkpoint file itself."
            )


def _check_gpu_available(accelerator: str) -> None:
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise LitAccelUserError(
            f"trainer.accelerator is {accelerator!r} but this machine has no usable CUDA GPU. "
            "configs/strategy/fsdp_gpu.yaml is GPU only: on a CPU use configs/strategy/fsdp.yaml "
            "(FSDP2, CPU and GPU) or configs/strategy/ddp.yaml, or pass --trainer.accelerator cpu."
        )


def _log_root(trainer) -> str:
    logger = trainer.logger
    if logger is not None and getattr(logger, "save_dir", None):
        return str(logger.save_dir)
    return str(trainer.default_root_dir)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``lit-accel``. A user error ends in one message and exit status 2.

    User errors are lit_accel's own (missing data, no checkpoint to resume) and Lightning's
    ``MisconfigurationException`` (e.g. a GPU strategy on a machine without a GPU). Configuration
    errors (unknown key, wrong type, missing file) are reported by jsonargparse, also with exit 2.
    """
    try:
        LitAccelCLI(args=args)
    except (LitAccelUserError, MisconfigurationException) as err:
        print(f"lit-accel: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
