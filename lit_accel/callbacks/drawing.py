"""The pictures ValidationFigures draws, as plain functions: counts, display scaling, and two Pillow drawings.

Torch only at import; Pillow is imported when a picture is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["confusion_counts", "draw_confusion_matrix", "draw_image_grid", "to_display"]

_MIN_TILE = 64  # pixels: smaller images (CIFAR's 32) are enlarged, nearest-neighbour, to be seen
_MAX_NUMBERED_CLASSES = 30  # beyond this the counts no longer fit in the confusion matrix's cells
# The ends of matplotlib's "Blues" colour map: a share of 0 is near white, 1 is dark blue.
_LIGHT, _DARK = (247, 251, 255), (8, 48, 107)


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
