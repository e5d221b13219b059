"""ValidationFigures: a confusion matrix and the misclassified images, drawn into TensorBoard."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lit_accel.callbacks.drawing import confusion_counts, draw_confusion_matrix, draw_image_grid, to_display
from lit_accel.core.checks import is_int, is_number, require

__all__ = ["ValidationFigures"]

_MAX_MISCLASSIFIED = 256  # a grid beyond this is unreadable in TensorBoard and slow to draw


@dataclass
class _Collected:
    """What one validation gathered for drawing: rank 0's mistakes and the counts over all ranks."""

    step: int
    counts: Tensor | None
    wrong: list[tuple[Tensor, Tensor, Tensor, Tensor]]


class ValidationFigures(Callback):
    """At the end of validation, draws a confusion matrix and a grid of misclassified images into TensorBoard.

    Draws after the validation of every ``every_n_epochs``-th training epoch, after the last
    validation of ``fit`` whatever ended it (kept until ``on_train_end``, drawn at its own step),
    and after every ``validate``. Uses the logits ``validation_step`` returns (a tensor, or a dict
    with ``"logits"``), else runs the forward again on validations that may be drawn. Counts are
    summed over ranks; images come from rank 0. Needs a ``TensorBoardLogger`` and Pillow, else it
    warns once and does nothing; ``confusion_matrix: false`` with ``misclassified: 0`` switches it
    off. README, "ValidationFigures in detail", has when, what and what it costs.

    Args:
        every_n_epochs: also draw after the validation of every n-th training epoch.
        confusion_matrix: draw the confusion matrix.
        misclassified: the most misclassified images in the grid (0: no grid).
        mean: per-channel mean the images were normalized with, e.g. CIFAR-10's
            ``[0.4914, 0.4822, 0.4465]``; give it together with ``std``.
        std: per-channel standard deviation the images were normalized with.
        class_names: names for the axes and labels; default: the datamodule's ``classes``
            attribute, else the class indices.

    Logged keys (TensorBoard images, at the ``trainer.global_step`` of the validation drawn):
    ``val/confusion_matrix``, ``val/misclassified``.

    Raises:
        ValueError: for ``every_n_epochs`` not an integer ≥ 1, ``misclassified`` not an integer in
            0–256, a non-bool ``confusion_matrix``, ``class_names`` not a list of strings, only one
            of ``mean``/``std``, or ``mean``/``std`` of different lengths, not finite, or with a
            ``std`` ≤ 0.

    Example::

        trainer:
          callbacks:
            - class_path: lit_accel.callbacks.ValidationFigures
              init_args:
                every_n_epochs: 5
                misclassified: 32
                mean: [0.4914, 0.4822, 0.4465]
                std: [0.2470, 0.2435, 0.2616]
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        confusion_matrix: bool = True,
        misclassified: int = 16,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        require(
            is_int(every_n_epochs) and every_n_epochs >= 1, "every_n_epochs", every_n_epochs, "1 or more (an integer)"
        )
        require(isinstance(confusion_matrix, bool), "confusion_matrix", confusion_matrix, "true or false")
        names_ok = class_names is None or (
            isinstance(class_names, (list, tuple)) and all(isinstance(n, str) for n in class_names)
        )
        require(names_ok, "class_names", class_names, "a list of names, one per class")
        require(
            is_int(misclassified) and 0 <= misclassified <= _MAX_MISCLASSIFIED,
            "misclassified",
            misclassified,
            f"0 (off) to {_MAX_MISCLASSIFIED} images",
        )
        both = f"mean={mean!r}, std={std!r} is not allowed: "
        if (mean is None) != (std is None):
            raise ValueError(both + "give both or neither")
        if mean is not None and std is not None:
            if len(mean) != len(std) or not mean:
                raise ValueError(both + "use one value per channel in each")
            if not all(is_number(v) for v in [*mean, *std]):
                raise ValueError(both + "use finite values")
            require(min(std) > 0, "std", std, "positive values")
        self.every_n_epochs = every_n_epochs
        self.confusion_matrix = confusion_matrix
        self.misclassified = misclassified
        self.mean = list(mean) if mean is not None else None
        self.std = list(std) if std is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self._active = False
        self._collecting = False  # this validation gathers counts and mistakes
        self._draw_now = False  # ... and draws them when it ends
        self._rerun = False  # ... running the forward again where validation_step gives no logits
        self._complete = True  # every batch of this validation was counted
        self._counts: Tensor | None = None
        self._wrong: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self._wrong_count = 0
        self._undrawn: _Collected | None = None  # the latest validation of fit, not drawn yet
        self._warned_batch = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_epochs=self.every_n_epochs, misclassified=self.misclassified)

    # ------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in (TrainerFn.FITTING, TrainerFn.VALIDATING):
            return
        self._undrawn = None
        has_logger = _tensorboard(trainer) is not None
        has_pillow = importlib.util.find_spec("PIL") is not None
        wanted = self.confusion_matrix or self.misclassified > 0
        # Same on every rank in any sane setup; reduced anyway, because a rank that skipped the
        # all-reduce in on_validation_epoch_end would hang the others.
        self._active = bool(trainer.strategy.reduce_boolean_decision(wanted and has_logger and has_pillow, all=True))
        if wanted and not has_logger:
            rank_zero_warn(
                "ValidationFigures draws into TensorBoard only: no TensorBoardLogger in trainer.loggers, so it is off."
            )
        elif wanted and not has_pillow:
            rank_zero_warn("ValidationFigures needs Pillow to draw (pip install pillow); it is off.")

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Rank independent (the Trainer's settings and counters), so every rank joins the
        # all-reduces at the end of the same validations.
        self._collecting = self._active and not trainer.sanity_checking
        fitting = trainer.state.fn == TrainerFn.FITTING
        self._draw_now = self._collecting and is_drawing_epoch(
            trainer.current_epoch, self.every_n_epochs, fitting=fitting, sanity_checking=trainer.sanity_checking
        )
        self._rerun = self._draw_now or (
            self._collecting
            and may_be_last_validation(
                trainer.current_epoch,
                trainer.max_epochs,
                trainer.global_step,
                trainer.max_steps,
                should_stop=trainer.should_stop,
            )
        )
        self._complete = True
        self._counts = None
        self._wrong, self._wrong_count = [], 0

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._collecting or dataloader_idx != 0:
            return
        if not _is_images_and_labels(batch):
            if not self._warned_batch:
                rank_zero_warn("ValidationFigures needs (images, labels) tensor batches; this batch is skipped.")
                self._warned_batch = True
            return
        images, labels = batch[0], batch[1]
        logits = _logits_from(outputs, images.shape[0])
        if logits is None:
            if not self._rerun:
                self._complete = False
                return
            with torch.no_grad(), trainer.precision_plugin.val_step_context():
                logits = pl_module(images)
        probabilities = torch.softmax(logits.detach().float(), dim=-1)
        confidence, predicted = probabilities.max(dim=-1)
        if self.confusion_matrix:
            batch_counts = confusion_counts(labels, predicted, probabilities.shape[1])
            self._counts = batch_counts if self._counts is None else self._counts + batch_counts
        if trainer.is_global_zero:
            self._keep_mistakes(images, labels, predicted, confidence)

    def _keep_mistakes(self, images: Tensor, labels: Tensor, predicted: Tensor, confidence: Tensor) -> None:
        need = self.misclassified - self._wrong_count
        if need <= 0:
            return
        wrong = (predicted != labels).nonzero().flatten()[:need]
        if wrong.numel():
            picked = (images[wrong].detach().float(), labels[wrong].long(), predicted[wrong], confidence[wrong])
            self._wrong.append((picked[0].cpu(), picked[1].cpu(), picked[2].cpu(), picked[3].cpu()))
            self._wrong_count += wrong.numel()

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._collecting:
            return
        # Every rank gets here after the same validations (see on_validation_epoch_start), so
        # every rank joins the all-reduces.
        counts = _sum_over_ranks(trainer, self._counts, pl_module.device) if self.confusion_matrix else None
        self._counts = None
        if not trainer.is_global_zero:
            return
        collected = _Collected(trainer.global_step, counts, self._wrong)
        self._wrong = []
        if self._draw_now:
            self._draw(trainer, collected)
            self._undrawn = None
        elif trainer.state.fn == TrainerFn.FITTING:
            # Drawn at the end of fit if no validation follows; an incomplete count (no logits and
            # no second forward) is not drawn, nor is an earlier validation in its place.
            self._undrawn = collected if self._complete else None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._undrawn is not None and trainer.is_global_zero:
            self._draw(trainer, self._undrawn)
        self._undrawn = None

    def _draw(self, trainer: pl.Trainer, collected: _Collected) -> None:
        # Not None: setup() turns drawing on only with a TensorBoardLogger.
        experiment = _tensorboard(trainer).experiment  # type: ignore[union-attr]
        counts = collected.counts
        if counts is not None and counts.numel():
            names = self._names(trainer, counts.shape[0])
            experiment.add_image("val/confusion_matrix", draw_confusion_matrix(counts.cpu(), names), collected.step)
        if collected.wrong:
            images, labels, predicted, confidence = (torch.cat(parts) for parts in zip(*collected.wrong))
            names = self._names(trainer, int(max(labels.max(), predicted.max())) + 1)
            titles = [
                f"true: {_name(names, t)}\npred: {_name(names, p)} {c:.2f}"
                for t, p, c in zip(labels.tolist(), predicted.tolist(), confidence.tolist())
            ]
            experiment.add_image(
                "val/misclassified", draw_image_grid(to_display(images, self.mean, self.std), titles), collected.step
            )

    def _names(self, trainer: pl.Trainer, num_classes: int) -> list[str]:
        for candidate in (self.class_names, getattr(trainer.datamodule, "classes", None)):  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
            if candidate is not None and len(candidate) >= num_classes:
                return [str(name) for name in candidate]
        return [str(i) for i in range(num_classes)]


# ----------------------------------------------------------------------------- pure functions
def is_drawing_epoch(epoch: int, every_n_epochs: int, fitting: bool, sanity_checking: bool) -> bool:
    """Whether this validation is drawn when it ends: not the sanity check; while fitting, every
    n-th epoch (1-based); always outside fit (``validate``)."""
    if sanity_checking:
        return False
    return not fitting or (epoch + 1) % every_n_epochs == 0


def may_be_last_validation(
    epoch: int, max_epochs: int | None, global_step: int, max_steps: int, should_stop: bool
) -> bool:
    """Whether a validation of ``fit`` starting now can be known to be among the run's last: in the
    last epoch by ``max_epochs``, after ``max_steps`` optimizer steps, or with ``should_stop``
    already set. ``None`` or ``-1`` means no limit, as in the Trainer. A stop decided after the
    validation (``EarlyStopping``) cannot be known here."""
    last_epoch = max_epochs is not None and max_epochs >= 0 and epoch + 1 >= max_epochs
    steps_done = max_steps >= 0 and global_step >= max_steps
    return last_epoch or steps_done or should_stop


def _is_images_and_labels(batch: Any) -> bool:
    return (
        isinstance(batch, (tuple, list))
        and len(batch) >= 2
        and isinstance(batch[0], Tensor)
        and isinstance(batch[1], Tensor)
        and batch[0].ndim == 4
        and batch[1].ndim == 1
    )


def _logits_from(outputs: Any, batch_size: int) -> Tensor | None:
    if isinstance(outputs, dict):
        outputs = outputs.get("logits")
    if isinstance(outputs, Tensor) and outputs.ndim == 2 and outputs.shape[0] == batch_size:
        return outputs
    return None


def _sum_over_ranks(trainer: pl.Trainer, local: Tensor | None, device: torch.device) -> Tensor:
    """The element-wise sum of every rank's ``(C, C)`` counts; a rank that saw no batch adds zeros."""
    local_size = torch.tensor(0 if local is None else local.shape[0], device=device)
    size = int(trainer.strategy.reduce(local_size, reduce_op="max"))
    counts = torch.zeros(size, size, dtype=torch.long, device=device)
    if local is not None:
        counts[: local.shape[0], : local.shape[1]] = local
    return trainer.strategy.reduce(counts, reduce_op="sum")


def _name(names: Sequence[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else str(index)


def _tensorboard(trainer: pl.Trainer) -> TensorBoardLogger | None:
    return next((logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)), None)
