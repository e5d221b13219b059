"""ValidationFigures: a confusion matrix and the misclassified images, drawn into TensorBoard."""

from __future__ import annotations

import importlib.util
import math
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

from lit_accel.core.checks import is_int, is_number, require

__all__ = ["ValidationFigures"]

_MAX_MISCLASSIFIED = 256  # a grid beyond this is unreadable in TensorBoard and slow to draw
_MIN_TILE = 64  # pixels: smaller images (CIFAR's 32) are enlarged, nearest-neighbour, to be seen
_MAX_NUMBERED_CLASSES = 30  # beyond this the counts no longer fit in the confusion matrix's cells
# The ends of matplotlib's "Blues" colour map: a share of 0 is near white, 1 is dark blue.
_LIGHT, _DARK = (247, 251, 255), (8, 48, 107)


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


def confusion_counts(labels: Tensor, predicted: Tensor, num_classes: int) -> Tensor:
    """``(C, C)`` counts: row = true class, column = predicted class. Labels outside 0…C-1 are ignored.

    Computed on the tensors' device without a host sync (no boolean indexing): ignored labels are
    counted in one extra bin that is dropped."""
    labels = labels.long()
    keep = (labels >= 0) & (labels < num_classes)
    cells = num_classes * num_classes
    flat = torch.where(keep, labels * num_classes + predicted.long(), cells)
    counts = torch.zeros(cells + 1, dtype=torch.long, device=labels.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    return counts[:cells].view(num_classes, num_classes)


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
    """A ``(C, C)`` count matrix → an RGB uint8 picture ``(3, H, W)``: a title with the accuracy,
    the true classes down the left, the predicted ones (turned upright) along the top, and each
    cell shaded by its share of the row, with its count when there are at most 30 classes."""
    from PIL import Image, ImageDraw, ImageFont

    counts = counts.long().cpu()
    size = counts.shape[0]
    share = (counts.float() / counts.sum(dim=1, keepdim=True).clamp_min(1)).tolist()
    values = counts.tolist()
    labels = [str(class_names[i]) if i < len(class_names) else str(i) for i in range(size)]
    font = ImageFont.load_default()
    numbered = size <= _MAX_NUMBERED_CLASSES
    label_width = max(_text_size(font, label)[0] for label in labels)
    line = _text_size(font, "Ag")[1]
    cell = max(_text_size(font, str(int(counts.max())))[0] + 8, 2 * line) if numbered else line + 2
    total, correct = int(counts.sum()), int(counts.diag().sum())
    title = f"{correct}/{total} correct ({correct / max(total, 1):.1%}); shade: share of the true class"
    margin = 6
    left = margin + line + margin + label_width + margin  # "true", then the row labels
    top = margin + line + margin + line + margin + label_width + margin  # title, "predicted", column labels
    width = max(left + size * cell + margin, margin + _text_size(font, title)[0] + margin)
    height = top + size * cell + margin
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((margin, margin), title, fill="black", font=font)
    draw.text((left, margin + line + margin), "predicted", fill="black", font=font)
    _paste_upright(picture, "true", (margin, top), font)
    for i, label in enumerate(labels):
        y = top + i * cell + (cell - line) // 2
        draw.text((left - margin - _text_size(font, label)[0], y), label, fill="black", font=font)
        _paste_upright(picture, label, (left + i * cell + (cell - line) // 2, top - margin), font, bottom=True)
    for row in range(size):
        for col in range(size):
            x, y = left + col * cell, top + row * cell
            fraction = share[row][col]
            colour = tuple(round(a + (b - a) * fraction) for a, b in zip(_LIGHT, _DARK))
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour)
            if numbered:
                text = str(values[row][col])
                text_width = _text_size(font, text)[0]
                ink = "white" if fraction > 0.5 else "black"
                draw.text((x + (cell - text_width) // 2, y + (cell - line) // 2), text, fill=ink, font=font)
    return _to_tensor(picture)


def draw_image_grid(images: Tensor, titles: Sequence[str], columns: int = 8) -> Tensor:
    """``(N, C, H, W)`` images in [0, 1] with a title each → one RGB uint8 mosaic ``(3, H, W)``:
    ``columns`` tiles per row, each image enlarged (nearest-neighbour) to at least 64 pixels with
    its title's lines under it. One channel is shown as gray; beyond three, the first three."""
    from PIL import Image, ImageDraw, ImageFont

    count, channels, height, width = images.shape
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    scale = max(1, math.ceil(_MIN_TILE / max(height, width)))
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.expand(-1, 3, -1, -1) if channels == 1 else pixels[:, :3]
    # (N, H, W, 3), each pixel repeated scale × scale times: the canvas is height × width × RGB, as Pillow's
    pixels = pixels.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(-1, -1, scale, -1, scale, -1)
    pixels = pixels.reshape(count, height * scale, width * scale, 3)
    font = ImageFont.load_default()
    spacing = 2
    sizes = [_text_size(font, title, spacing) for title in titles[:count]]
    text_height = max((h for _, h in sizes), default=0)
    margin = 4
    tile_width = max(width * scale, *(w for w, _ in sizes)) + 2 * margin
    tile_height = height * scale + text_height + 3 * margin
    canvas = torch.full((rows * tile_height, columns * tile_width, 3), 255, dtype=torch.uint8)
    for i in range(count):
        y = (i // columns) * tile_height + margin
        x = (i % columns) * tile_width + (tile_width - width * scale) // 2
        canvas[y : y + height * scale, x : x + width * scale] = pixels[i]
    picture = Image.fromarray(canvas.numpy())
    draw = ImageDraw.Draw(picture)
    for i, title in enumerate(titles[:count]):
        x = (i % columns) * tile_width + margin
        y = (i // columns) * tile_height + height * scale + 2 * margin
        draw.multiline_text((x, y), title, fill="black", font=font, spacing=spacing)
    return _to_tensor(picture)


def _text_size(font: Any, text: str, spacing: int = 4) -> tuple[int, int]:
    """Width and height in pixels of ``text`` (lines split at ``\\n``, ``spacing`` pixels apart, as
    Pillow's ``multiline_text`` sets them) drawn from its top-left corner."""
    lines = text.split("\n")
    width = max(font.getlength(line) for line in lines)
    line_step = font.getbbox("A")[3] + spacing
    return math.ceil(width) + 1, int(font.getbbox("Ag")[3]) + (len(lines) - 1) * int(line_step)


def _paste_upright(picture: Any, text: str, at: tuple[int, int], font: Any, bottom: bool = False) -> None:
    """Draw ``text`` turned 90° (read bottom to top) with its top-left corner at ``at``, or its
    bottom-left corner there with ``bottom``."""
    from PIL import Image, ImageDraw

    width, height = _text_size(font, text)
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).text((0, 0), text, fill=255, font=font)
    mask = mask.rotate(90, expand=True)
    x, y = at
    picture.paste((0, 0, 0), (x, y - mask.height if bottom else y), mask)


def _to_tensor(picture: Any) -> Tensor:
    width, height = picture.size
    rgb = torch.frombuffer(bytearray(picture.convert("RGB").tobytes()), dtype=torch.uint8)
    return rgb.view(height, width, 3).permute(2, 0, 1).contiguous()


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
