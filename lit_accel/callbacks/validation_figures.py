"""ValidationFigures: a confusion matrix and the misclassified images, drawn into TensorBoard."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

__all__ = ["ValidationFigures"]

_MAX_MISCLASSIFIED = 256  # a grid beyond this is unreadable in TensorBoard and slow to draw


class ValidationFigures(Callback):
    """At the end of validation, draws a confusion matrix and a grid of misclassified images into TensorBoard.

    Confusion matrix (``val/confusion_matrix``): rows are the true classes, columns the predicted
    ones; each cell shows its count and is shaded by its share of the row (the class's recall on
    the diagonal). Counts cover the whole validation set: each rank counts its shard, then the
    counts are summed over all ranks (under DDP the distributed sampler pads the last batch, so a
    few images may count twice, as in torchmetrics). Misclassified images
    (``val/misclassified``): up to ``misclassified`` images from rank 0's shard, the first ones in
    validation order, each titled with its true and predicted class and the predicted class's
    probability.

    Predictions: when ``validation_step`` returns the logits ``(N, num_classes)`` (a tensor, or a
    dict with key ``"logits"``), they are used as they are; otherwise the callback runs the
    model's forward on the batch once more, without gradients, on drawing epochs only. Batches are
    ``(images, labels)`` as the model sees them (normalized); ``mean``/``std`` undo the
    normalization for display, else each image is stretched to its own min–max range.

    Cost: nothing on epochs that are not drawn. On a drawing epoch: a ``C×C`` count per batch, two
    small all-reduces (the matrix size, then ``C×C`` counts), and on rank 0 the images kept on the
    CPU (``misclassified`` × 3×32×32 floats) and about a second of matplotlib drawing.
    Sanity-check validation is skipped.

    Needs a ``TensorBoardLogger`` and matplotlib (``pip install matplotlib``); without either it
    warns once and does nothing.

    Args:
        every_n_epochs: draw after the validation of every n-th training epoch (``validate`` runs
            always draw).
        confusion_matrix: draw the confusion matrix.
        misclassified: the most misclassified images in the grid (0: no grid).
        mean: per-channel mean the images were normalized with, e.g. CIFAR-10's
            ``[0.4914, 0.4822, 0.4465]``; give it together with ``std``.
        std: per-channel standard deviation the images were normalized with.
        class_names: names for the axes and titles; default: the datamodule's ``classes``
            attribute, else the class indices.

    Logged keys (TensorBoard images, at ``trainer.global_step``): ``val/confusion_matrix``,
    ``val/misclassified``.

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
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs!r} is not allowed: use 1 or more (an integer)")
        if not isinstance(confusion_matrix, bool):
            raise ValueError(f"confusion_matrix={confusion_matrix!r} is not allowed: use true or false")
        if class_names is not None and (
            not isinstance(class_names, (list, tuple)) or not all(isinstance(n, str) for n in class_names)
        ):
            raise ValueError(f"class_names={class_names!r} is not allowed: use a list of names, one per class")
        if (
            isinstance(misclassified, bool)
            or not isinstance(misclassified, int)
            or not 0 <= misclassified <= _MAX_MISCLASSIFIED
        ):
            raise ValueError(
                f"misclassified={misclassified!r} is not allowed: use 0 (off) to {_MAX_MISCLASSIFIED} images"
            )
        if (mean is None) != (std is None):
            raise ValueError(f"mean={mean!r}, std={std!r} is not allowed: give both or neither")
        if mean is not None and std is not None:
            if len(mean) != len(std) or not mean:
                raise ValueError(f"mean={mean!r}, std={std!r} is not allowed: use one value per channel in each")
            if not all(math.isfinite(v) for v in [*mean, *std]):
                raise ValueError(f"mean={mean!r}, std={std!r} is not allowed: use finite values")
            if min(std) <= 0:
                raise ValueError(f"std={std!r} is not allowed: use positive values")
        self.every_n_epochs = every_n_epochs
        self.confusion_matrix = confusion_matrix
        self.misclassified = misclassified
        self.mean = list(mean) if mean is not None else None
        self.std = list(std) if std is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self._active = False
        self._drawing = False
        self._counts: Tensor | None = None
        self._wrong: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self._wrong_count = 0
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
        has_logger = _tensorboard(trainer) is not None
        has_matplotlib = importlib.util.find_spec("matplotlib") is not None
        wanted = self.confusion_matrix or self.misclassified > 0
        # Same on every rank in any sane setup; reduced anyway, because a rank that skipped the
        # all-reduce in on_validation_epoch_end would hang the others.
        self._active = bool(
            trainer.strategy.reduce_boolean_decision(wanted and has_logger and has_matplotlib, all=True)
        )
        if wanted and not has_logger:
            rank_zero_warn(
                "ValidationFigures draws into TensorBoard only: no TensorBoardLogger in trainer.loggers, so it is off."
            )
        elif wanted and not has_matplotlib:
            rank_zero_warn("ValidationFigures needs matplotlib to draw (pip install matplotlib); it is off.")

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._drawing = self._active and is_drawing_epoch(
            trainer.current_epoch,
            self.every_n_epochs,
            fitting=trainer.state.fn == TrainerFn.FITTING,
            sanity_checking=trainer.sanity_checking,
        )
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
        if not self._drawing or dataloader_idx != 0:
            return
        if not _is_images_and_labels(batch):
            if not self._warned_batch:
                rank_zero_warn("ValidationFigures needs (images, labels) tensor batches; this batch is skipped.")
                self._warned_batch = True
            return
        images, labels = batch[0], batch[1]
        logits = _logits_from(outputs, images.shape[0])
        if logits is None:
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
        if not self._drawing:
            return
        # Every rank gets here on a drawing epoch (the decision is rank independent), so every rank
        # joins the all-reduces.
        counts = _sum_over_ranks(trainer, self._counts, pl_module.device) if self.confusion_matrix else None
        if trainer.is_global_zero:
            self._draw(trainer, counts)
        self._wrong, self._counts = [], None

    def _draw(self, trainer: pl.Trainer, counts: Tensor | None) -> None:
        # Not None: setup() turns drawing on only with a TensorBoardLogger.
        experiment = _tensorboard(trainer).experiment  # type: ignore[union-attr]
        step = trainer.global_step
        if counts is not None and counts.numel():
            names = self._names(trainer, counts.shape[0])
            experiment.add_image("val/confusion_matrix", draw_confusion_matrix(counts.cpu(), names), step)
        if self._wrong:
            images, labels, predicted, confidence = (torch.cat(parts) for parts in zip(*self._wrong))
            names = self._names(trainer, int(max(labels.max(), predicted.max())) + 1)
            titles = [
                f"true: {_name(names, t)}\npred: {_name(names, p)} {c:.2f}"
                for t, p, c in zip(labels.tolist(), predicted.tolist(), confidence.tolist())
            ]
            experiment.add_image(
                "val/misclassified", draw_image_grid(to_display(images, self.mean, self.std), titles), step
            )

    def _names(self, trainer: pl.Trainer, num_classes: int) -> list[str]:
        for candidate in (self.class_names, getattr(trainer.datamodule, "classes", None)):  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
            if candidate is not None and len(candidate) >= num_classes:
                return [str(name) for name in candidate]
        return [str(i) for i in range(num_classes)]


# ----------------------------------------------------------------------------- pure functions
def is_drawing_epoch(epoch: int, every_n_epochs: int, fitting: bool, sanity_checking: bool) -> bool:
    """Whether this validation is drawn: not the sanity check; while fitting, every n-th epoch (1-based)."""
    if sanity_checking:
        return False
    return not fitting or (epoch + 1) % every_n_epochs == 0


def confusion_counts(labels: Tensor, predicted: Tensor, num_classes: int) -> Tensor:
    """``(C, C)`` counts: row = true class, column = predicted class. Labels outside 0…C-1 are ignored."""
    labels = labels.long()
    keep = (labels >= 0) & (labels < num_classes)
    flat = labels[keep] * num_classes + predicted.long()[keep]
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def to_display(images: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """Normalized images → [0, 1] for display: undo ``(x - mean) / std``, or stretch each image to its min–max."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    images = images.float()
    if mean is not None and std is not None:
        m = torch.as_tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
        return (images * s + m).clamp(0, 1)
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    return ((images - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)


def draw_confusion_matrix(counts: Tensor, class_names: Sequence[str]) -> Tensor:
    """A ``(C, C)`` count matrix → an RGB uint8 picture ``(3, H, W)`` with labelled axes and counts."""
    from matplotlib.figure import Figure

    counts = counts.long()
    size = counts.shape[0]
    share = counts.float() / counts.sum(dim=1, keepdim=True).clamp_min(1)
    side = 2.0 + 0.55 * size
    figure = Figure(figsize=(side + 1.0, side), dpi=100)
    axes = figure.add_subplot()
    shading = axes.imshow(share.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(shading, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    labels = [str(name) for name in class_names[:size]]
    axes.set_xticks(range(size), labels=labels, rotation=45, ha="right")
    axes.set_yticks(range(size), labels=labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    total = int(counts.sum())
    correct = int(counts.diag().sum())
    axes.set_title(f"{correct}/{total} correct ({correct / max(total, 1):.1%})")
    if size <= 30:  # beyond that the numbers overlap
        for row in range(size):
            for col in range(size):
                axes.text(
                    col,
                    row,
                    str(int(counts[row, col])),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share[row, col] > 0.5 else "black",
                )
    figure.tight_layout()
    return _render(figure)


def draw_image_grid(images: Tensor, titles: Sequence[str], columns: int = 8) -> Tensor:
    """``(N, C, H, W)`` images in [0, 1] with a title each → an RGB uint8 picture ``(3, H, W)``."""
    from matplotlib.figure import Figure

    count = images.shape[0]
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    figure = Figure(figsize=(1.5 * columns, 1.85 * rows), dpi=100)
    for i in range(count):
        axes = figure.add_subplot(rows, columns, i + 1)
        image = images[i]
        if image.shape[0] == 1:
            axes.imshow(image[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
        else:
            axes.imshow(image[:3].permute(1, 2, 0).numpy(), interpolation="nearest")
        axes.set_title(titles[i], fontsize=7, linespacing=1.1)
        axes.axis("off")
    figure.tight_layout()
    return _render(figure)


def _render(figure: Any) -> Tensor:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgba = torch.frombuffer(bytearray(canvas.buffer_rgba()), dtype=torch.uint8)
    width, height = canvas.get_width_height()
    return rgba.view(height, width, 4)[:, :, :3].permute(2, 0, 1).contiguous()


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
