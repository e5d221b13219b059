"""LightningCLI with lit_accel's model, data and defaults: ``lit-accel fit|validate|test|predict``.

``lit-accel fit --config configs/cifar10.yaml [--config overlay.yaml …]``; the ``lit-accel``
command itself is :mod:`lit_accel.commands`, which also runs ``tune`` and ``export``. Defaults:
TensorBoard logs under ``runs/``, a checkpoint of the best ``val/acc`` and the last epoch, the
learning rate logged, seed 42. ``--ckpt_path best|last`` finds the newest run's checkpoint under
the logger's folder (without a logger: ``default_root_dir/checkpoints/``), also in a fresh process.
This module imports no command (tune, export): they build on it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml  # type: ignore[import-untyped]  # PyYAML ships no types (its stubs are a separate package)
from jsonargparse import Namespace, lazy_instance
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, instantiate_class
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from typing_extensions import override

from lit_accel.callbacks import PredictionCSVWriter, PreemptionCheckpoint, RNGStateCheckpoint
from lit_accel.callbacks.divergence_guard import DivergenceError
from lit_accel.checkpoints import (
    CHECKPOINT_ALIASES,
    AtomicCheckpointIO,
    LastAfterEveryValidation,
    check_checkpoint,
    check_import_paths,
    check_readable,
    find_checkpoint,
    import_paths,
    read_checkpoint,
    read_folder_meta,
    run_checkpoints,
)
from lit_accel.data import CIFAR10DataModule, PreloadedImageDataModule
from lit_accel.errors import CheckpointError, ConfigurationError, LitAccelUserError
from lit_accel.models import ImageClassifier
from lit_accel.models.classifier import EXAMPLE_IMAGE_SIZE, checkpoint_image_size, scheduler_interval

if TYPE_CHECKING:
    from _typeshed import SupportsWrite  # typeshed's type for print_usage's file

__all__ = [
    "DEFAULT_RECIPE",
    "SHIPPED_CONFIGS",
    "LitAccelCLI",
    "evaluation_image_size",
    "main",
    "shipped_config_names",
    "with_configs_resolved",
]

DEFAULT_LOG_DIR = "runs"
EVALUATING = ("validate", "test", "predict")  # the subcommands that read images at a checkpoint's size
# The recipes, strategy and precision files, shipped as package data (the clone's configs/ is a
# link to this folder, so each file exists once).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT_RECIPE = "cifar10"  # what fit/validate/test/predict use when no --config is given
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

log = logging.getLogger(__name__)

# Lightning 2.6.6 calls a pytree API that torch 2.14 deprecated; users can do nothing about it.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# lit-accel always hands LitAccelCLI its arguments (the command line, its --config names resolved):
# LightningCLI's warning against passing args while sys.argv holds some is about another use.
warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")


class _ConciseParser(LightningArgumentParser):
    """The parser of ``lit-accel`` and of each subcommand: options spelt out in full (argparse's prefix
    matching would take ``--trainer.max_epoch 3`` as ``max_epochs``), an empty config file named, and
    on a bad argument one usage line instead of every option of every class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    @override
    def print_usage(self, file: SupportsWrite[str] | None = None) -> None:
        prog = self.prog.replace(" [options]", "")
        (file or sys.stderr).write(f"usage: {prog} [--config CONFIG ...] [options]\n")

    @override
    def parse_path(self, path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Namespace:
        """``--config FILE``: a file with no settings in it (empty, or comments only) is named in the message."""
        check_config_file(path)
        return super().parse_path(path, *args, **kwargs)


class _VersionProgressBar(RichProgressBar):
    """Lightning's default progress bar, with the run's version shown as it is (``v_num: 0``): the
    rich bar prints every number in its metrics format, ``.3f`` (``v_num: 0.000``)."""

    @override
    def get_metrics(self, trainer: Trainer, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        if "v_num" in items:
            items["v_num"] = str(items["v_num"])
        return items


class LitAccelCLI(LightningCLI):
    """LightningCLI for :class:`ImageClassifier` and a data module (:class:`CIFAR10DataModule` unless
    ``--data ImageFolderDataModule`` or a config's ``data.class_path`` names another) with lit_accel's defaults.

    Adds always-present callbacks, configurable under their own keys:

    * ``checkpoint`` (:class:`~lit_accel.checkpoints.LastAfterEveryValidation`, a ModelCheckpoint):
      ``best-epoch…-acc….ckpt`` for the best ``val/acc``, and ``last.ckpt`` after every validation
      and at the end of fit;
    * ``step_checkpoint`` (ModelCheckpoint): ``last.ckpt`` also every
      ``step_checkpoint.every_n_train_steps`` optimizer steps (default 100; 0 turns it off), so a
      crash loses at most that many steps;
    * ``preemption`` (PreemptionCheckpoint): SIGTERM or Ctrl-C saves ``last.ckpt`` and stops;
    * ``rng_state`` (RNGStateCheckpoint): random generators in every checkpoint, for exact resumes;
    * ``lr_monitor`` (LearningRateMonitor; left out without a logger, which it needs);
    * ``predict_writer`` (PredictionCSVWriter): ``lit-accel predict`` writes ``predictions.csv``.

    ``--ckpt_path best|last`` is resolved to a file while the arguments are parsed, so the model
    is rebuilt from that checkpoint's hyperparameters as for a file path; before a subcommand runs
    the checkpoint is checked (exists, loads, fits the network), and bad arguments end in one
    message. ``validate``, ``test`` and ``predict`` with a checkpoint read images at the size its
    network was trained at (``checkpoint["image_size"]``, see :func:`evaluation_image_size`): they
    set the data module's ``image_size`` attribute to it, and refuse a ``--data.image_size`` that
    differs. ``predict`` runs without a logger: it writes no run folder, only the predictions.
    ``validate``, ``test`` and ``predict`` without ``--ckpt_path`` evaluate the untrained network,
    with one warning.
    """

    # validate/test/predict with a checkpoint file: (its training image size, data.image_size as given)
    _checkpoint_sizes: tuple[int, int | None] | None = None
    # The subcommand the arguments start with, when they do: the only parser built (see subcommands)
    _requested: str | None = None

    def __init__(self, args: ArgsType = None, run: bool = True) -> None:
        if args is None or isinstance(args, list):
            args = with_configs_resolved(sys.argv[1:] if args is None else args, subcommands=run)
            if run and args and args[0] in LIGHTNING_SUBCOMMANDS:
                self._requested = args[0]
        super().__init__(
            ImageClassifier,
            PreloadedImageDataModule,  # any of lit_accel's data modules: --data ImageFolderDataModule
            subclass_mode_data=True,
            seed_everything_default=42,
            parser_class=_ConciseParser,
            # Optimizer and scheduler are ImageClassifier's (model.optimizer, model.lr_scheduler):
            # LightningCLI's top-level pair would replace configure_optimizers, and with it the
            # sizing of WarmupDecayLR and its per-step interval.
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    @override
    def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]  # LightningCLI calls it on the instance
        """LightningCLI's subcommands, or only the one the arguments start with (``fit …``): the
        three parsers that would go unused cost every command time (BENCHMARKS.md, "Start and exit
        of a command"). Arguments that start with an option (``--config FILE fit``), whose config
        may hold a section per subcommand, get every parser."""
        every = LightningCLI.subcommands()
        return {self._requested: every[self._requested]} if self._requested else every

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"data": lazy_instance(CIFAR10DataModule)})  # plain `data:` keys are its arguments
        parser.add_lightning_class_args(LastAfterEveryValidation, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:03d}-acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                # Both checkpoint callbacks write the one last.ckpt, the newer state winning;
                # a version counter would make them write last-v1.ckpt beside it.
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(ModelCheckpoint, "step_checkpoint")
        parser.set_defaults(
            {
                "step_checkpoint.every_n_train_steps": 100,
                "step_checkpoint.save_top_k": 0,
                "step_checkpoint.save_last": True,
                "step_checkpoint.monitor": None,
                "step_checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        parser.add_lightning_class_args(RNGStateCheckpoint, "rng_state")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(PredictionCSVWriter, "predict_writer")
        parser.add_argument(
            "--num_threads",
            type=int | None,
            default=None,
            help="intra-op CPU threads (torch.set_num_threads) in each process; null: torch's default",
        )
        parser.set_defaults(
            {
                "trainer.logger": lazy_instance(
                    # default_hp_metric off: Lightning's placeholder hp_metric would hide the
                    # HParams tab's real metrics (val/acc, test/acc).
                    TensorBoardLogger,
                    save_dir=DEFAULT_LOG_DIR,
                    name="lit_accel",
                    default_hp_metric=False,
                )
            }
        )

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, then replace ``--ckpt_path best|last`` by the file it names, before anything is built.

        LightningCLI rebuilds the model from a ``--ckpt_path`` file's saved hyperparameters right
        after parsing (its private ``_parse_ckpt_path``, listed in ``lit_accel/lightning_compat.py``),
        so an alias resolved here behaves exactly like the path it names: a run trained with
        another network is tested with that network. The file is read first, so a damaged or
        crafted one ends in one message, and every class it names is checked before that rebuild
        imports it (:func:`~lit_accel.checkpoints.check_import_paths`: lit_accel, torch, torchvision,
        or what this command's own config names); ``seed_everything: true`` under an outside
        launcher is refused before LightningCLI draws a seed.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        _check_seed_agreed(config.get("seed_everything"))
        alias = config.get("ckpt_path")
        if alias in CHECKPOINT_ALIASES:
            config["ckpt_path"] = _resolve_alias(str(alias), subcommand, config["trainer"])
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and os.path.isfile(ckpt_path):
            named = {path for _, path in import_paths(_plain(config), "")}
            contents = read_checkpoint(ckpt_path)
            check_import_paths(contents, str(ckpt_path), allowed=named)
            if subcommand in EVALUATING:
                given = _given_image_size(parser, args, subcommand)
                self._checkpoint_sizes = (checkpoint_image_size(contents), given)
        elif ckpt_path and os.path.isdir(ckpt_path) and subcommand in EVALUATING:
            meta = read_folder_meta(ckpt_path)  # an FSDP2 folder: its image_size is in meta.pt
            if meta is not None:
                self._checkpoint_sizes = (checkpoint_image_size(meta), _given_image_size(parser, args, subcommand))

    @override
    def before_instantiate_classes(self) -> None:
        # TF32 matmuls on Ampere+ GPUs: faster fp32 GEMMs at a precision loss CNN training does not feel.
        torch.set_float32_matmul_precision("high")
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer_config = config["trainer"]
        threads = config.get("num_threads")
        if threads is not None:
            if not (isinstance(threads, int) and threads >= 1):
                raise ConfigurationError(f"num_threads={threads} is not allowed: use a positive integer or null")
            torch.set_num_threads(threads)
        check_trainer_integers(trainer_config)
        _check_gpu_available(str(trainer_config.get("accelerator")))
        _check_cpu_devices(trainer_config.get("accelerator"), trainer_config.get("devices"))
        if self.subcommand == "predict":
            # Prediction is not a run: no logger (no new runs/<name>/version_N/ folder), no
            # config.yaml; the predictions go where predict_writer.output_path says.
            trainer_config["logger"] = False
            self.save_config_callback = None
        elif self.subcommand != "fit" and _logger_from_config(trainer_config) is False:
            # Without a logger config.yaml goes to default_root_dir itself, where the training's
            # already is: LightningCLI would refuse to overwrite it (a traceback). An evaluation
            # writes no run folder to describe.
            self.save_config_callback = None

    @override
    def instantiate_classes(self) -> None:
        """Build everything; an argument that a class rejects becomes one clear message."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            if isinstance(err, LitAccelUserError):
                raise
            cause: BaseException | None = err  # a data module's own message, inside jsonargparse's union error
            while cause is not None and not isinstance(cause, LitAccelUserError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise cause from None
            raise ConfigurationError(f"invalid configuration: {err}") from err
        try:
            # Build the optimizer once on a stand-in parameter: a bad learning rate or momentum
            # fails here, in a message, instead of as a traceback after the run has started.
            optimizer = self.model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
        except ValueError as err:
            raise ConfigurationError(
                f"invalid model.optimizer: {err}. Fix it in the config or on the command line."
            ) from err
        settings = {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}
        _check_finite("model.optimizer", settings)
        learning_rate = settings.get("lr")
        if isinstance(learning_rate, (int, float)) and learning_rate <= 0:
            raise ConfigurationError(
                f"model.optimizer lr={learning_rate} is not allowed: use a positive learning rate, "
                "e.g. --model.optimizer.lr 0.05."
            )
        _check_lr_scheduler(self.model, optimizer, self.trainer, self.datamodule)
        _check_finite("trainer", {"gradient_clip_val": self.trainer.gradient_clip_val})
        if self.subcommand in EVALUATING and self._checkpoint_sizes is not None:
            _set_image_size(self.datamodule, *self._checkpoint_sizes, self.subcommand)

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Every checkpoint (last, step, best, preemption, divergence, SLURM's hpc) is saved through
        # the strategy's CheckpointIO: written beside its target and renamed into place. A user's
        # own CheckpointIO plugin is kept. FSDP2 folder checkpoints bypass it (torch.distributed.checkpoint).
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.logger is None:
            # LearningRateMonitor stops `fit` at its start without a logger (--trainer.logger false),
            # and would have nothing to log to: leave it out.
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, LearningRateMonitor)]  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
        bar = trainer.progress_bar_callback
        if type(bar) is RichProgressBar:
            # The same bar with its settings (Lightning's default or one configured), only its
            # v_num text differs: the subclass adds no state. A subclass of the user's is left alone.
            bar.__class__ = _VersionProgressBar
        return trainer

    def before_fit(self) -> None:
        self._check_before_run("fit")

    def before_validate(self) -> None:
        self._check_before_run("validate")
        self._keep_checkpoint_folders("validate")
        self._warn_without_checkpoint("validate")

    def before_test(self) -> None:
        self._check_before_run("test")
        self._keep_checkpoint_folders("test")
        self._warn_without_checkpoint("test")

    def before_predict(self) -> None:
        self._check_before_run("predict")
        self._keep_checkpoint_folders("predict")
        self._warn_without_checkpoint("predict")

    def _warn_without_checkpoint(self, subcommand: str) -> None:
        """validate/test/predict without ``--ckpt_path`` use the network as built: untrained. Allowed
        (a test of the set-up itself), but said, since it is almost never what is meant."""
        if self.config_init[subcommand].get("ckpt_path") is None:
            _rank_zero_warning(
                f"lit-accel {subcommand}: no --ckpt_path given, so the untrained network (its random initial "
                "weights) is evaluated. Pass --ckpt_path best|last|FILE to use a trained checkpoint."
            )

    def _keep_checkpoint_folders(self, subcommand: str) -> None:
        """The checkpoint callbacks save nothing outside fit; restored with another folder than
        the one they saved in, they would warn that it changed (and that their best-k records
        will not be reloaded). Give them back their folder."""
        ckpt_path = self.config_init[subcommand].get("ckpt_path")
        if ckpt_path is None or not os.path.isfile(ckpt_path):
            return
        states = read_checkpoint(ckpt_path).get("callbacks") or {}
        for callback in self.trainer.checkpoint_callbacks:
            saved = states.get(callback.state_key)
            if (
                isinstance(callback, ModelCheckpoint)
                and isinstance(saved, dict)
                and isinstance(saved.get("dirpath"), str)
            ):
                callback.dirpath = saved["dirpath"]

    def after_predict(self) -> None:
        """Nothing predicted (every file unreadable, or no batch run) is an error, as an empty folder
        is; the CSV a user already had is left as it was."""
        if not self.trainer.is_global_zero:  # predictions_written is counted on rank 0, where the parts merge
            return
        for callback in self.trainer.callbacks:  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
            # None: the writer's hooks never ran (no batch to predict, e.g. limit_predict_batches 0).
            if isinstance(callback, PredictionCSVWriter) and not callback.predictions_written:
                folder = getattr(self.datamodule, "predict_dir", None)
                limit = self.trainer.limit_predict_batches
                if limit == 0:
                    source = f"trainer.limit_predict_batches={limit:g} runs no batch"
                    advice = "Pass a number of batches above 0, or a fraction in (0, 1], or leave it unset (all)."
                else:
                    source = (
                        f"none of the files in {folder} is a readable image" if folder else "the data set was empty"
                    )
                    advice = "Point --data.predict_dir at a folder of PNG/JPEG/... images."
                raise LitAccelUserError(
                    f"nothing was predicted: {source}, so {callback.output_path} was not written (an existing file "
                    f"is kept). {advice}"
                )

    def _check_before_run(self, subcommand: str) -> None:
        """Check every place the run writes, and the checkpoint (exists, loads, fits the model),
        before anything starts: a folder that cannot be written fails here, not at the first save."""
        for folder, setting in self._output_folders(subcommand):
            check_output_folder(folder, setting)
        for path, setting in self._output_files(subcommand):
            check_output_file(path, setting)
        ckpt_path = self.config_init[subcommand].get("ckpt_path")
        if ckpt_path is not None:
            sharded = isinstance(self.trainer.strategy, ModelParallelStrategy)
            check_checkpoint(str(ckpt_path), self.model, sharded=sharded)

    def _setting_of(self, subcommand: str, callback: object, key: str) -> str:
        """The setting a user gives for ``callback``'s ``key``: ``checkpoint.dirpath`` for the CLI's own
        callbacks, ``trainer.callbacks (ModelCheckpoint) dirpath`` for one from a callbacks list."""
        for name in ("checkpoint", "step_checkpoint", "predict_writer"):
            if self.config_init[subcommand].get(name) is callback:
                return f"{name}.{key}"
        return f"trainer.callbacks ({type(callback).__name__}) {key}"

    def _output_folders(self, subcommand: str) -> list[tuple[str, str]]:
        """``(folder, setting)`` for each folder this subcommand writes in: the loggers' folders, and
        for ``fit`` the checkpoint folders and ``default_root_dir`` (checkpoints without a logger,
        SLURM's requeue checkpoints). ``predict`` runs without a logger and writes only its CSV."""
        trainer = self.trainer
        if subcommand == "predict":
            return []
        folders = [(_log_root(trainer), "trainer.logger.init_args.save_dir")] if trainer.loggers else []
        if subcommand != "fit":
            return folders
        if not trainer.loggers or self.config_init[subcommand]["trainer"].get("default_root_dir") is not None:
            folders.append((str(trainer.default_root_dir), "trainer.default_root_dir"))
        for callback in trainer.checkpoint_callbacks:
            dirpath = getattr(callback, "dirpath", None)
            if isinstance(dirpath, str):
                folders.append((dirpath, self._setting_of(subcommand, callback, "dirpath")))
        return folders

    def _output_files(self, subcommand: str) -> list[tuple[str, str]]:
        """``(file, setting)`` for each file this subcommand writes at a path of the user's: the
        predictions CSV of ``predict``, a DivergenceGuard's ``checkpoint_path`` in ``fit``."""
        files = []
        for callback in self.trainer.callbacks:  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
            if subcommand == "predict" and isinstance(callback, PredictionCSVWriter):
                files.append((callback.output_path, self._setting_of(subcommand, callback, "output_path")))
            path = getattr(callback, "checkpoint_path", None)
            if subcommand == "fit" and isinstance(path, str):
                files.append((path, self._setting_of(subcommand, callback, "checkpoint_path")))
        return files


def evaluation_image_size(saved: int, given: int | None) -> int:
    """The side of the images ``lit-accel validate|test|predict`` read: the checkpoint's training size.

    Args:
        saved: the size the checkpoint's network was trained at
            (:func:`~lit_accel.models.classifier.checkpoint_image_size`).
        given: ``data.image_size`` as the user set it (command line or config file), or None.

    Raises:
        ConfigurationError: for a ``given`` size other than ``saved``: the network would see
            images of another scale than it learnt from, and predict worse without a word.

    Example::

        evaluation_image_size(64, None)  # 64
    """
    if given is not None and given != saved:
        raise ConfigurationError(
            f"data.image_size={given} but the checkpoint's network was trained on {saved}×{saved} images: "
            f"leave data.image_size out (images are then read at the checkpoint's size) or set it to {saved}."
        )
    return saved


def _given_image_size(parser: LightningArgumentParser, args: ArgsType, subcommand: str) -> int | None:
    """``data.image_size`` (or ``data.init_args.image_size``) as given on the command line or in a
    config file, not a default: parsed again without defaults."""
    if isinstance(args, (dict, Namespace)):
        given = parser.parse_object(args, defaults=False)
    else:
        given = parser.parse_args(args, defaults=False)
    for key in ("data.image_size", "data.init_args.image_size"):
        value = given.get(f"{subcommand}.{key}")
        if value is not None:
            return int(value)
    return None


def _set_image_size(datamodule: Any, saved: int, given: int | None, subcommand: str) -> None:
    """Point the data module at the checkpoint's image size (see :func:`evaluation_image_size`)."""
    size = evaluation_image_size(saved, given)
    if isinstance(datamodule, CIFAR10DataModule) and subcommand != "predict" and size != EXAMPLE_IMAGE_SIZE:
        # CIFAR-10's splits are 32x32 (only predict_dir images are resized): say so rather than
        # evaluate a network on images of another scale without a word.
        _rank_zero_warning(
            f"the checkpoint's network was trained on {size}×{size} images, but CIFAR-10's are 32×32: "
            f"{subcommand} runs on them as they are. Evaluate it on its own data (e.g. --data ImageFolderDataModule)."
        )
    if hasattr(datamodule, "image_size"):
        datamodule.image_size = size
    elif size != EXAMPLE_IMAGE_SIZE:
        _rank_zero_warning(
            f"the checkpoint's network was trained on {size}×{size} images, but {type(datamodule).__name__} has no "
            "image_size attribute to read them at that size: its images are predicted as it makes them."
        )


def shipped_config_names() -> list[str]:
    """The names ``--config`` accepts without a path: ``cifar10``, ``strategy/ddp``, … (sorted)."""
    return sorted(
        path.relative_to(SHIPPED_CONFIGS).with_suffix("").as_posix() for path in SHIPPED_CONFIGS.rglob("*.yaml")
    )


def with_configs_resolved(args: list[str], subcommands: bool = True) -> list[str]:
    """``args`` with every ``--config`` value that is no file here replaced by the shipped file it
    names, and the default recipe added when no ``--config`` is given at all.

    A value resolves as a file relative to the working folder first; only if there is none, as the
    name of a shipped config: ``cifar10``, ``strategy/ddp`` (``.yaml`` optional), or a clone's path
    ``configs/strategy/ddp.yaml`` (so the README's commands also work after ``pip install``, and
    where the clone's ``configs`` link is not one, e.g. a Windows checkout). Values that are no
    path (an inline YAML string) are left to jsonargparse. Without any ``--config`` (before or after
    the subcommand), ``--config DEFAULT_RECIPE`` is put right after the subcommand (first, with
    ``subcommands=False``), so that later arguments override it; an explicit ``--config`` replaces
    the default recipe: ``--config strategy/ddp`` alone is the strategy on Lightning's defaults.

    Args:
        args: the arguments after ``lit-accel`` (``fit --config cifar10 …``).
        subcommands: whether ``args`` start with a subcommand (``LitAccelCLI(run=False)``: no).

    Raises:
        ConfigurationError: a ``--config`` value that is neither a file nor a shipped name (the
            message lists the shipped names).

    Example::

        with_configs_resolved(["fit", "--data.synthetic", "true"])
        # ["fit", "--config", ".../lit_accel/configs/cifar10.yaml", "--data.synthetic", "true"]
    """
    resolved: list[str] = []
    given = False
    pending = False  # the previous argument was --config / -c: this one is its value
    for arg in args:
        if pending:
            resolved.append(_config_path(arg))
            pending = False
            continue
        if arg in ("--config", "-c"):
            pending = given = True
        elif arg.startswith("--config="):
            given = True
            arg = "--config=" + _config_path(arg.removeprefix("--config="))
        resolved.append(arg)
    if given:
        return resolved
    recipe = ["--config", str(SHIPPED_CONFIGS / f"{DEFAULT_RECIPE}.yaml")]
    if not subcommands:
        return [*recipe, *resolved]
    at = next((i for i, arg in enumerate(resolved) if arg in LIGHTNING_SUBCOMMANDS), None)
    return resolved if at is None else [*resolved[: at + 1], *recipe, *resolved[at + 1 :]]


def _config_path(value: str) -> str:
    """A ``--config`` value as a path: the file here, else the shipped config it names (see
    :func:`with_configs_resolved`)."""
    if os.path.isfile(value) or not re.fullmatch(r"[\w.\-/\\]+", value):
        return value  # a file here, or an inline YAML string: jsonargparse reads it
    name = value.replace("\\", "/")
    name = name.removeprefix("./").removeprefix("configs/")
    for suffix in (".yaml", ".yml"):
        name = name.removesuffix(suffix)
    if name in shipped_config_names():
        return str(SHIPPED_CONFIGS / f"{name}.yaml")
    raise ConfigurationError(
        f"--config {value}: no such file (in {os.getcwd()}) and no shipped config of that name. Shipped "
        f"configs, usable as --config NAME: {', '.join(shipped_config_names())}. Or pass the path of your own file."
    )


def _resolve_alias(alias: str, subcommand: str, trainer_config: Any) -> str | None:
    """The file ``--ckpt_path best|last`` names: the newest run's under this experiment's log folder
    (Lightning knows only its own runs). ``last`` is also the newest ``hpc_ckpt_N.ckpt`` that
    Lightning wrote on SLURM's requeue signal (SIGUSR1) for this experiment; when that file cannot
    be read (a kill while it was copied in place, a full disk), ``last`` is the newest readable
    checkpoint of the same run, with one warning naming both.

    Raises:
        LitAccelUserError: when there is no such checkpoint (except ``fit`` with ``last``: None,
            a fresh start), or none of the run's checkpoints can be read.
    """
    root = _log_root_from_config(trainer_config)
    hpc_dir = str(trainer_config.get("default_root_dir") or os.getcwd())
    # Without a logger Lightning saves in default_root_dir/checkpoints/ only; searching below it
    # would find other experiments' runs (runs/<name>/…) when it is the working folder.
    with_logger = _logger_from_config(trainer_config) is not False
    path = find_checkpoint(root, alias, hpc_dir=hpc_dir, recursive=with_logger)
    where = root if with_logger else os.path.join(root, "checkpoints")
    if path is not None:
        if alias == "last":
            path = _readable_last(path, root, hpc_dir, with_logger)
        rank_zero_info(f"--ckpt_path {alias}: using {path}")
        return path
    if subcommand == "fit" and alias == "last":
        # Resuming with "last" before any checkpoint exists starts afresh, so the same command
        # can be used for the first launch and for every relaunch after preemption.
        rank_zero_info(f"--ckpt_path last: no checkpoint under {where} yet, starting from scratch")
        return None
    raise LitAccelUserError(
        f"--ckpt_path {alias}: no {alias!r} checkpoint found under {where}/. Train first with "
        f"'lit-accel fit --config …' (same logger settings), or pass the checkpoint file itself."
    )


def _readable_last(path: str, root: str, hpc_dir: str, recursive: bool) -> str:
    """``path`` when it can be read, else the newest readable checkpoint of its run (one warning).

    Raises:
        CheckpointError: when none of the run's checkpoints can be read.
    """
    try:
        check_readable(path)
        return path
    except CheckpointError as err:
        problem = err
    for other in run_checkpoints(path, root, hpc_dir, recursive):
        try:
            check_readable(other)
        except CheckpointError:
            continue
        _rank_zero_warning(
            f"--ckpt_path last: {path} cannot be read ({_first_cause(problem)}); using {other} instead, the newest "
            "readable checkpoint of the same run."
        )
        return other
    raise CheckpointError(
        f"--ckpt_path last: {problem} No other checkpoint of that run ({os.path.dirname(path)}) can be read either."
    )


def _first_cause(err: CheckpointError) -> str:
    """The reason inside a checkpoint message: its cause's first line, else "refused" or "incomplete"."""
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}"
    return "refused: it holds objects other than checkpoint data" if "refused" in str(err) else "incomplete"


def _plain(value: Any) -> Any:
    """A parsed config (jsonargparse Namespaces, nested) as plain dicts and lists."""
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _check_lr_scheduler(
    model: ImageClassifier, optimizer: torch.optim.Optimizer, trainer: Any, datamodule: Any
) -> None:
    """Build the scheduler once on the stand-in optimizer: bad settings fail before the run starts."""
    if model.lr_scheduler_factory is None:
        return
    try:
        scheduler = model.lr_scheduler_factory(optimizer)
    except ValueError as err:
        if isinstance(err, LitAccelUserError):
            raise
        raise ConfigurationError(
            f"invalid model.lr_scheduler: {err}. Fix it in the config or on the command line."
        ) from err
    interval = scheduler_interval(scheduler, model.lr_scheduler_interval)
    # Settings only: ReduceLROnPlateau starts its best-so-far (and "worse than any") at infinity.
    state = ("optimizer", "_last_lr", "base_lrs", "best", "mode_worse")
    _check_finite("model.lr_scheduler", {k: v for k, v in vars(scheduler).items() if k not in state})
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        _check_plateau_monitor(model.lr_scheduler_monitor, interval, trainer, datamodule)


def _check_plateau_monitor(monitor: str, interval: str, trainer: Any, datamodule: Any) -> None:
    """A ReduceLROnPlateau steps on an epoch metric: it must be logged every epoch, or Lightning stops
    the run at the first epoch without it."""
    if interval != "epoch":
        raise ConfigurationError(
            f"model.lr_scheduler_interval={interval} is not allowed with ReduceLROnPlateau, which follows {monitor}, "
            "a metric logged once per epoch: remove it, or pass --model.lr_scheduler_interval epoch."
        )
    if not monitor.startswith("val/"):
        return
    validation_off = [
        setting
        for setting, off in (
            (f"data.val_size={getattr(datamodule, 'val_size', None)}", getattr(datamodule, "val_size", 1) == 0),
            (f"trainer.limit_val_batches={trainer.limit_val_batches}", trainer.limit_val_batches == 0),
            (
                f"trainer.check_val_every_n_epoch={trainer.check_val_every_n_epoch}",
                trainer.check_val_every_n_epoch != 1,
            ),
        )
        if off
    ]
    if validation_off:
        raise ConfigurationError(
            f"model.lr_scheduler ReduceLROnPlateau follows model.lr_scheduler_monitor={monitor}, which is not logged "
            f"every epoch here ({', '.join(validation_off)}): validate every epoch, or pass "
            "--model.lr_scheduler_monitor train/loss."
        )


def _check_finite(owner: str, settings: dict[str, object]) -> None:
    """NaN or infinity in a numeric setting (or in a tuple such as Adam's betas) is one message.

    torch's optimizers check ``lr < 0`` and the like, which NaN passes; a NaN learning rate then
    trains on NaN. Classes of lit_accel check their own arguments.
    """
    for key, value in settings.items():
        numbers = value if isinstance(value, (tuple, list)) else [value]
        if any(isinstance(n, float) and not math.isfinite(n) for n in numbers):
            raise ConfigurationError(
                f"{owner} {key}={value} is not allowed: use a finite number (NaN and infinity make no sense here)."
            )


def check_output_folder(folder: str, setting: str) -> None:
    """A folder to write in that is, or lies inside, a file, or whose nearest existing folder this
    user cannot write in, fails here in one message, before any work.

    ``os.access`` answers for the real user, read-only mounts included (root may write anywhere else).
    """
    path = os.path.abspath(folder)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        what = "a broken symbolic link" if os.path.islink(path) and not os.path.exists(path) else "a file"
        raise ConfigurationError(
            f"the folder {folder} ({setting}) cannot be created: {path} is {what}. Pass a path in {setting} "
            "whose folders are folders or do not exist yet (they are created)."
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"the folder {folder} ({setting}) cannot be written: {path} is read-only for this user. Pass a "
            f"folder you can write in as {setting}."
        )


def check_output_file(path: str, setting: str) -> None:
    """A file to write that is a folder, is read-only, or lies where no file can be written fails here
    in one message, before any work. A read-only file is the user's way of keeping it: it is not replaced."""
    if os.path.isdir(path):
        raise ConfigurationError(
            f"{setting}={path!r} is an existing folder: pass a file path, e.g. "
            f"--{setting} {os.path.join(path, 'predictions.csv')}"
        )
    if os.path.isfile(path) and not os.access(path, os.W_OK):
        raise ConfigurationError(
            f"{setting}={path!r} is a read-only file, so it is not replaced: make it writable, or pass another "
            f"file as {setting}."
        )
    check_output_folder(os.path.dirname(os.path.abspath(path)), setting)


def check_config_file(path: str | os.PathLike[str]) -> None:
    """A config file that holds no settings (jsonargparse would say only ``Unexpected config:``).

    Raises:
        TypeError: naming the file (jsonargparse reports a TypeError raised while parsing as an
            ``error:`` line and exit status 2).
    """
    if not os.path.isfile(path):
        return  # missing, or a URL: jsonargparse's own message says so
    with open(path, encoding="utf-8", errors="replace") as f:
        content = f.read()
    try:
        settings = yaml.safe_load(content)
    except yaml.YAMLError:
        return  # jsonargparse names the line
    if settings is None:
        raise TypeError(
            f"the config file {path} holds no settings (it is empty or only comments): put 'key: value' lines "
            "in it, or leave out its --config."
        )
    if not isinstance(settings, dict):
        raise TypeError(
            f"the config file {path} holds a {type(settings).__name__}, not settings: write 'key: value' lines, "
            "e.g. 'trainer:' with 'max_epochs: 3' indented under it."
        )


# Trainer integers Lightning divides by, or takes out of their range without a word:
# (setting, smallest allowed value, what the value means). Lightning 2.6.6 raises ZeroDivisionError
# for accumulate_grad_batches / check_val_every_n_epoch / an integer val_check_interval of 0, and
# runs negative ones (and log_every_n_steps < 0, num_sanity_val_steps < -1) as if they made sense.
TRAINER_INTEGERS = (
    ("accumulate_grad_batches", 1, "batches per optimizer step"),
    ("check_val_every_n_epoch", 1, "epochs between validations (null: by val_check_interval only)"),
    ("val_check_interval", 1, "training batches between validations (or a fraction of an epoch in (0, 1])"),
    ("log_every_n_steps", 0, "steps between logged metrics (0: none)"),
    ("num_sanity_val_steps", -1, "validation batches before training (-1: all, 0: none)"),
    ("min_epochs", 0, "epochs"),
    ("min_steps", 0, "steps"),
)


def check_trainer_integers(trainer_config: Any) -> None:
    """Each of :data:`TRAINER_INTEGERS` that is set, is an integer (floats are fractions, for
    ``val_check_interval``) and is below its smallest allowed value is one message, before anything is built.

    Raises:
        ConfigurationError: naming the setting, the value and what is allowed.
    """
    for key, smallest, meaning in TRAINER_INTEGERS:
        value = trainer_config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < smallest:
            raise ConfigurationError(
                f"trainer.{key}={value} is not allowed: use an integer from {smallest} up ({meaning}), "
                f"e.g. --trainer.{key} {max(smallest, 1)}."
            )


@rank_zero_only
def _rank_zero_warning(message: str) -> None:
    """One line on stderr (through logging), from the first process only."""
    log.warning(message)


# What turns the GPU recipe into a CPU run: the CPU, and fp32 (bf16 autocast is slower than fp32 on
# CPUs without AVX512-BF16, BENCHMARKS.md); residency "device" is then host memory.
GPU_RECIPE_ON_CPU = "--trainer.accelerator cpu --trainer.precision 32-true"


def _check_gpu_available(accelerator: str) -> None:
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise LitAccelUserError(
            f"trainer.accelerator is {accelerator!r} but this machine has no usable CUDA GPU. "
            f"The GPU recipe (configs/gpu.yaml) runs on a CPU, slowly, with {GPU_RECIPE_ON_CPU} "
            "(configs/cifar10.yaml alone is the recipe for a CPU). configs/strategy/fsdp_gpu.yaml is GPU "
            "only: on a CPU use configs/strategy/fsdp.yaml (FSDP2, CPU and GPU) or configs/strategy/ddp.yaml."
        )


def _check_cpu_devices(accelerator: object, devices: object) -> None:
    """On a CPU, ``trainer.devices`` is a number of processes: ``auto`` (one) or 1 to the core count.

    Lightning's CPU accelerator raises a TypeError (a traceback) for ``-1`` or a list of indices,
    which name GPUs.
    """
    cores = os.cpu_count() or 1
    on_cpu = accelerator == "cpu" or (
        accelerator == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()
    )
    if not on_cpu or devices == "auto":
        return
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ConfigurationError(
            f"trainer.devices={devices!r} is not allowed on a CPU: each CPU device is a process, so use auto "
            f"(one process) or a number from 1 to {cores} (this machine's cores), e.g. --trainer.devices "
            f"{min(2, cores)}. -1 and lists of device indices name GPUs."
        )
    if devices > cores:
        raise ConfigurationError(
            f"trainer.devices={devices} but this machine has {cores} CPU cores: each CPU device is a "
            f"process, so use at most --trainer.devices {cores}."
        )


def _check_seed_agreed(seed: object) -> None:
    """``seed_everything: true`` draws a random seed per process unless a launcher shares it.

    Lightning's own launcher passes the first process's seed on (``PL_GLOBAL_SEED``); under
    torchrun every process would draw its own, and the samplers would shard the data differently
    on each rank (overlapping and missing samples).
    """
    launched_outside = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "PL_GLOBAL_SEED" not in os.environ
    if seed is True and launched_outside:
        raise ConfigurationError(
            f"seed_everything={seed!r} with WORLD_SIZE={os.environ['WORLD_SIZE']} processes started by another "
            "launcher (e.g. torchrun): each process would draw a different random seed and shard the data "
            "differently. Use an integer, e.g. --seed_everything 42."
        )


def _log_root(trainer: Trainer) -> str:
    """This experiment's folder (``runs/<name>`` for TensorBoard): aliases never pick another one's run."""
    logger = trainer.logger
    root = getattr(logger, "root_dir", None) or getattr(logger, "save_dir", None) if logger is not None else None
    return str(root or trainer.default_root_dir)


def _log_root_from_config(trainer_config: Any) -> str:
    """:func:`_log_root` from the parsed ``trainer`` config, before the Trainer exists."""
    default_root_dir = str(trainer_config.get("default_root_dir") or os.getcwd())
    logger = _logger_from_config(trainer_config)
    if logger is None or logger is True:  # the Trainer's default: TensorBoard (or CSV) logs
        return os.path.join(default_root_dir, "lightning_logs")
    if logger is False:
        return default_root_dir
    if isinstance(logger, (dict, Namespace)):
        init = logger.as_dict() if isinstance(logger, Namespace) else dict(logger)
        # Lightning's loggers do nothing in __init__ (files are made on first use): cheap to build.
        logger = instantiate_class((), init)
    root = getattr(logger, "root_dir", None) or getattr(logger, "save_dir", None)
    return str(root or default_root_dir)


def _logger_from_config(trainer_config: Any) -> Any:
    """The parsed ``trainer.logger`` setting, the first of a list; False for none."""
    logger = trainer_config.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else False
    return logger


def main(args: ArgsType = None) -> None:
    """Run ``fit``, ``validate``, ``test`` or ``predict``; a user error ends in one message and exit status 2.

    User errors are lit_accel's own (missing data, no checkpoint to resume) and Lightning's
    ``MisconfigurationException`` (e.g. a GPU strategy on a machine without a GPU). Configuration
    errors (unknown key, wrong type, missing file) are reported by jsonargparse, also with exit 2.
    A run the DivergenceGuard gave up on exits with 3, SIGTERM/Ctrl-C with 143, both after saving
    a checkpoint. The ``lit-accel`` command is :func:`lit_accel.commands.main`, which calls this.

    Args:
        args: the arguments after ``lit-accel``; ``None``: ``sys.argv[1:]``.
    """
    try:
        LitAccelCLI(args=args)
    except (LitAccelUserError, MisconfigurationException) as err:
        print(f"lit-accel: error: {err}", file=sys.stderr)
        sys.exit(2)
    except DivergenceError as err:
        # The guard already saved divergence.ckpt and explained what to try; no traceback needed.
        print(f"lit-accel: training diverged: {err}", file=sys.stderr)
        sys.exit(3)
    except SIGTERMException:
        # Stopped by SIGTERM/Ctrl-C after saving a checkpoint: exit like a process killed by
        # SIGTERM (128 + 15) so schedulers and torchrun see an interrupted, not a finished, run.
        sys.exit(143)


if __name__ == "__main__":
    main()
