"""HParamsSummary: a run's hyperparameters in TensorBoard's HParams tab, next to its final metrics."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

__all__ = ["HParamsSummary"]

log = logging.getLogger(__name__)

HParamValue = bool | int | float | str


class HParamsSummary(Callback):
    """Writes the run's hyperparameters to TensorBoard's HParams tab, so runs compare by their final metrics.

    Hyperparameters (one column each in the HParams tab):

    * ``model/…`` and ``data/…``: the LightningModule's and the DataModule's ``hparams`` (under
      LightningCLI: the model and data config). A ``class_path``/``init_args`` pair becomes the
      class and its arguments: ``model/optimizer = torch.optim.SGD``, ``model/optimizer/lr =
      0.02``. Lists and other values TensorBoard cannot hold are written as text.
    * ``trainer/…``: ``strategy`` and ``accelerator`` (class names), ``precision``,
      ``world_size``, ``max_epochs``, ``accumulate_grad_batches``, ``callbacks`` (class names).

    Metrics: TensorBoard's HParams tab shows, for each run, the last value of every scalar the run
    logged (``val/acc``, ``val/loss``, ``test/acc`` …), so no metric is named here. The summary
    holds the run's hyperparameters only (TensorBoard's "session start"), not an experiment
    definition: TensorBoard then builds the table from all runs, and runs with different
    hyperparameters (another network, another strategy) still line up.

    Written once per TensorBoard run folder, by rank 0, at the start of ``fit``, ``validate`` or
    ``test``. A ``validate``/``test`` run with a checkpoint (``ckpt_path``) takes the ``model/…``
    and ``data/…`` values from the checkpoint, the ones its weights were trained with, and adds a
    ``checkpoint`` column; its ``trainer/…`` values are the training's too, which this callback
    saves in every checkpoint (``checkpoint["trainer_settings"]``; a checkpoint without them gives
    no ``trainer/…`` columns rather than the evaluation's). ``lit-accel fit`` and a later
    ``lit-accel test`` write two runs (two ``version_<n>`` folders), so ``val/acc`` and
    ``test/acc`` appear in two rows with the same hyperparameters; in one process
    (``trainer.fit`` then ``trainer.test``) they share a row.

    Set ``default_hp_metric: false`` on the ``TensorBoardLogger``: otherwise Lightning writes its
    own HParams definition with a placeholder ``hp_metric`` (-1), which TensorBoard then shows in
    place of these columns. The callback warns when it finds it on.

    Args:
        include_trainer: also write the ``trainer/…`` settings.

    Raises:
        ValueError: if ``include_trainer`` is not a bool.

    Logged keys: none as scalars; the HParams summary of the run (TensorBoard tag
    ``_hparams_/session_start_info``).

    Example::

        trainer:
          logger:
            class_path: lightning.pytorch.loggers.TensorBoardLogger
            init_args: {save_dir: runs, name: cifar10, default_hp_metric: false}
          callbacks:
            - class_path: lit_accel.callbacks.HParamsSummary
    """

    def __init__(self, include_trainer: bool = True) -> None:
        if not isinstance(include_trainer, bool):
            raise ValueError(f"include_trainer={include_trainer!r} is not allowed: use true or false")
        self.include_trainer = include_trainer
        self._written: set[str] = set()
        self._warned = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.include_trainer:
            # What the weights were trained with, for the row of a later validate/test of them.
            checkpoint["trainer_settings"] = trainer_settings(trainer)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "validate":
            self._write(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None or not trainer.is_global_zero:
            if logger is None and not self._warned:
                rank_zero_warn("HParamsSummary writes to TensorBoard only: no TensorBoardLogger in trainer.loggers.")
                self._warned = True
            return
        if logger.log_dir in self._written:
            return
        if getattr(logger, "_default_hp_metric", False) and not self._warned:
            rank_zero_warn(
                "HParamsSummary: the TensorBoardLogger has default_hp_metric=True, so Lightning also writes a "
                "placeholder hp_metric that hides these hyperparameters' metrics in the HParams tab. "
                "Set default_hp_metric: false in the logger's init_args."
            )
            self._warned = True
        params = collect_hparams(trainer, pl_module, include_trainer=self.include_trainer)
        if trainer.state.fn != "fit" and trainer.ckpt_path:
            # The row describes the weights: this evaluation's trainer settings are not theirs.
            params = {k: v for k, v in params.items() if not k.startswith("trainer/")}
            params.update(checkpoint_hparams(trainer.ckpt_path))
        write_session_start(logger.experiment, params)
        self._written.add(logger.log_dir)


# ----------------------------------------------------------------------------- pure functions
def collect_hparams(
    trainer: pl.Trainer, pl_module: pl.LightningModule, include_trainer: bool = True
) -> dict[str, HParamValue]:
    """The flat ``{name: value}`` table of a run: model, data and (optionally) trainer settings."""
    params: dict[str, HParamValue] = {}
    params.update(flatten_hparams(_plain(pl_module.hparams_initial), prefix="model"))
    if trainer.datamodule is not None:  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
        params.update(flatten_hparams(_plain(trainer.datamodule.hparams_initial), prefix="data"))  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
    if include_trainer:
        params.update(flatten_hparams(trainer_settings(trainer), prefix="trainer"))
    return params


def checkpoint_hparams(path: str | os.PathLike[str]) -> dict[str, HParamValue]:
    """The ``model/…`` and ``data/…`` hyperparameters a checkpoint was trained with, and ``checkpoint``.

    A ``validate``/``test`` run builds its model from the command line's config and then loads the
    checkpoint's weights, so its own hparams may not be the ones the weights were trained with.
    Reads a checkpoint file (memory-mapped: the weights are not read) or the ``meta.pt`` of a
    distributed checkpoint folder; returns only ``{"checkpoint": path}`` when neither is readable.
    """
    params: dict[str, HParamValue] = {"checkpoint": str(path)}
    file = os.path.join(path, "meta.pt") if os.path.isdir(path) else path
    try:
        contents = torch.load(file, map_location="cpu", weights_only=True, mmap=not os.path.isdir(path))
    except Exception as err:  # a missing or foreign file only costs the columns, not the run
        log.warning("HParamsSummary: could not read hyperparameters from %s (%s)", file, err)
        return params
    if isinstance(contents, Mapping):
        for key, prefix in (
            ("hyper_parameters", "model"),
            ("datamodule_hyper_parameters", "data"),
            ("trainer_settings", "trainer"),  # saved by HParamsSummary while training
        ):
            if isinstance(contents.get(key), Mapping):
                params.update(flatten_hparams(_plain(contents[key]), prefix=prefix))
    return params


def trainer_settings(trainer: pl.Trainer) -> dict[str, Any]:
    """The trainer choices that change how a run trains: what runs are usually compared by."""
    return {
        "strategy": type(trainer.strategy).__name__,
        "accelerator": type(trainer.accelerator).__name__,
        "precision": str(trainer.precision),
        "world_size": trainer.world_size,
        "max_epochs": trainer.max_epochs if trainer.max_epochs is not None else -1,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "callbacks": ",".join(sorted(type(cb).__name__ for cb in trainer.callbacks)),  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
    }


def flatten_hparams(params: Mapping[str, Any], prefix: str = "") -> dict[str, HParamValue]:
    """Nested hyperparameters → ``{"a/b/c": value}`` with values TensorBoard can hold.

    ``{"class_path": C, "init_args": {...}}`` under key ``k`` becomes ``k = C`` plus ``k/arg``
    for each argument. ``None`` becomes ``"None"``; lists, tuples and other objects become their
    text; one-element tensors their number. Keys starting with ``_`` (LightningCLI's internal
    ``_class_path``, ``_instantiator``) are left out.
    """
    flat: dict[str, HParamValue] = {}
    for key, value in params.items():
        if str(key).startswith("_"):
            continue
        name = f"{prefix}/{key}" if prefix else str(key)
        value = _plain(value)
        if isinstance(value, Mapping) and "class_path" in value:
            flat[name] = str(value["class_path"])
            flat.update(flatten_hparams(_plain(value.get("init_args") or {}), prefix=name))
            extra = {k: v for k, v in value.items() if k not in ("class_path", "init_args")}
            flat.update(flatten_hparams(extra, prefix=name))
        elif isinstance(value, Mapping):
            flat.update(flatten_hparams(value, prefix=name))
        else:
            flat[name] = _scalar(value)
    return flat


def write_session_start(experiment: Any, params: Mapping[str, HParamValue]) -> None:
    """Write TensorBoard's hparams "session start" summary for ``params`` into the run of ``experiment``."""
    from torch.utils.tensorboard.summary import hparams

    # hparams() returns (experiment definition, session start, session end); only the session
    # start is written, see the class docstring. The metric dict only names metrics for the
    # experiment definition, which is dropped.
    _, session_start, _ = hparams(dict(params), {})
    experiment._get_file_writer().add_summary(session_start)


def _plain(value: Any) -> Any:
    """jsonargparse / argparse Namespaces (LightningCLI configs) → dicts; anything else unchanged."""
    if hasattr(value, "as_dict") and callable(value.as_dict):
        return value.as_dict()
    if isinstance(value, argparse.Namespace):
        return vars(value)
    return value


def _scalar(value: Any) -> HParamValue:
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return str(value)
