"""A seeded, learnable, CIFAR-10-shaped data set for offline demos, smoke runs and benchmarks.

What it is. Each class is a "glyph": four strokes in a class-specific arrangement, as an object
is a class-specific arrangement of parts. Classes come in pairs that share two of their four
strokes (cat and dog share ears and legs), so telling a pair apart needs the strokes' spatial
relations, not one cue. A sample draws its class's glyph with its own pose (rotation ±25°,
scale 0.75-1.15, shift ±3 px, mirror image half of the time, each stroke end jittered), stroke
width and colour, in front of a smooth random background with two distractor strokes of random
colour (label-irrelevant structure), plus pixel noise. In 12 % of the samples the two strokes
that tell a class from its pair are missing: those are genuinely ambiguous (class overlap),
so no model can be right on all of them. Stored as uint8 ``(N, 3, 32, 32)`` like CIFAR-10.

What it is good for: offline demos and smoke runs; relative speed (images/s, data wait);
checking that a network or recipe learns and that training machinery (resume, DDP, callbacks)
works. Because colour and position carry no label and the classes need part relations, a
too-small network visibly underfits and an easy shortcut does not exist, unlike the first
version of this set (a class-coloured blob), on which the half-width BatchNormCNN looked best.

What it is not: a stand-in for real-image accuracy. Its augmentation response differs (its
pose variation is exactly what crops and flips imitate, so augmentation helps more here than on
real images at short budgets), and absolute accuracies do not transfer. Choose recipes on real
images (``python -m tools.bench recipe --data_dir DIR``); BENCHMARKS.md lists what
the maintainers measured on real images and how this set compares.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["make_synthetic_cifar"]

_STROKES = 4  # strokes per class glyph; a class shares the first _SHARED with its pair
_SHARED = 2
_DISTRACTORS = 2  # label-irrelevant strokes per image
_POINTS = 12  # points splatted along each stroke
_AMBIGUOUS = 0.12  # share of samples that lack the strokes telling a class from its pair
_MAX_ROTATION = math.radians(25)
_SCALE = (0.75, 1.15)
_MAX_SHIFT = 0.2  # in units of half the image (0.2 → ±3.2 px)
_JITTER = 0.06  # per stroke end, same units
_NOISE_STD = 0.08  # pixel noise, in units of the [0, 1] intensity range
_INK_GAIN = 4.2  # ink = 1 - exp(-gain × stroke density): a thin stroke is nearly opaque at its centre
_CHUNK = 8192  # samples generated at a time, to bound peak memory
_SIZE = 32


def make_synthetic_cifar(
    num_samples: int, seed: int = 0, split: int = 0, num_classes: int = 10
) -> tuple[Tensor, Tensor]:
    """Generate ``num_samples`` images and labels.

    Args:
        num_samples: number of images.
        seed: picks the data set (the class glyphs); the same seed gives the same classes.
        split: picks the samples within the data set (e.g. 0 for training, 1 for test), so splits
            share their classes but not their images.
        num_classes: number of classes.

    Returns:
        ``(images, labels)``: uint8 ``(num_samples, 3, 32, 32)`` and int64 ``(num_samples,)``.

    Raises:
        ValueError: if ``num_samples`` < 1 or ``num_classes`` < 2.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} is not allowed: use a positive number")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} is not allowed: use 2 or more classes")
    glyphs = class_glyphs(seed, num_classes)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (split + 1))
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    images = torch.empty(num_samples, 3, _SIZE, _SIZE, dtype=torch.uint8)
    for start in range(0, num_samples, _CHUNK):
        stop = min(start + _CHUNK, num_samples)
        images[start:stop] = _render(glyphs[labels[start:stop]], generator)
    return images, labels


def class_glyphs(seed: int, num_classes: int) -> Tensor:
    """The classes' strokes, ``(num_classes, strokes, 2 ends, xy)`` in [-0.7, 0.7]; class ``2k + 1``
    shares its first ``_SHARED`` strokes with class ``2k``."""
    glyphs = torch.rand(num_classes, _STROKES, 2, 2, generator=torch.Generator().manual_seed(seed)) * 1.4 - 0.7
    pairs = num_classes // 2
    glyphs[1 : 2 * pairs : 2, :_SHARED] = glyphs[0 : 2 * pairs : 2, :_SHARED]
    return glyphs


def _render(strokes: Tensor, generator: torch.Generator) -> Tensor:
    """``(n, strokes, 2 ends, xy)`` class glyphs in [-1, 1] coordinates → uint8 images, each posed anew."""
    n = strokes.shape[0]
    uniform = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    mirror = uniform(n) < 0.5
    strokes = strokes.clone()
    strokes[..., 0] = torch.where(mirror[:, None, None], -strokes[..., 0], strokes[..., 0])
    angle = (uniform(n) * 2 - 1) * _MAX_ROTATION
    scale = _SCALE[0] + (_SCALE[1] - _SCALE[0]) * uniform(n)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shift = (uniform(n, 1, 1, 2) * 2 - 1) * _MAX_SHIFT
    strokes = torch.einsum("nij,nkej->nkei", rotation, strokes) + shift
    strokes = strokes + _JITTER * torch.randn(strokes.shape, generator=generator)
    ambiguous = uniform(n) < _AMBIGUOUS
    # a missing stroke collapses to a point of zero length, which leaves no ink
    strokes[ambiguous, _SHARED:, 1] = strokes[ambiguous, _SHARED:, 0]
    thickness = uniform(n)  # 0: thin, 1: thick
    glyph_ink = _ink(strokes, thickness)

    starts = uniform(n, _DISTRACTORS, 2) * 2 - 1
    ends = starts + 0.5 * (uniform(n, _DISTRACTORS, 2) - 0.5)
    distractor_ink = _ink(torch.stack([starts, ends], 2), thickness)

    background = 0.25 + 0.5 * _smooth_patterns(n, generator)
    brightness = background.mean((1, 2, 3))
    glyph_colour = uniform(n, 3)
    # keep the glyph visible: lighter than a dark background, darker than a light one
    glyph_colour = torch.where(
        (glyph_colour.mean(1) > brightness)[:, None], 0.5 + 0.5 * glyph_colour, 0.5 * glyph_colour
    )
    distractor_colour = uniform(n, 3)
    image = torch.lerp(background, distractor_colour[:, :, None, None].expand_as(background), distractor_ink)
    image = torch.lerp(image, glyph_colour[:, :, None, None].expand_as(image), glyph_ink)
    image += _NOISE_STD * torch.randn(image.shape, generator=generator)
    return image.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def _ink(strokes: Tensor, thickness: Tensor) -> Tensor:
    """Anti-aliased strokes: points along each stroke splatted bilinearly, then blurred; (n, 1, 32, 32)."""
    t = torch.linspace(0, 1, _POINTS)
    starts, ends = strokes[:, :, 0, None], strokes[:, :, 1, None]
    points = (starts + t[None, None, :, None] * (ends - starts)) * (_SIZE - 1) / 2 + (_SIZE - 1) / 2
    length = (ends - starts).squeeze(2).norm(dim=-1) * (_SIZE - 1) / 2  # pixels
    weight = (length / _POINTS)[:, :, None].expand(-1, -1, _POINTS)
    density = _splat(points.flatten(1, 2), weight.flatten(1))
    thin_band, thick_band = _blur_bands()
    thin, thick = thin_band @ density @ thin_band.T, thick_band @ density @ thick_band.T
    density = torch.lerp(thin, thick, thickness[:, None, None, None])
    return 1 - torch.exp(-_INK_GAIN * density)


def _splat(points: Tensor, weights: Tensor) -> Tensor:
    """Bilinear splat of ``weights`` (n, m) at ``points`` (n, m, xy in pixels) into (n, 1, 32, 32)."""
    n = points.shape[0]
    padded = _SIZE + 2  # one pixel of margin on each side catches points just outside
    canvas = torch.zeros(n, padded * padded)
    x, y = points[..., 0], points[..., 1]
    x0, y0 = x.floor(), y.floor()
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            share = weights * (1 - (x - xi).abs()) * (1 - (y - yi).abs())
            inside = (xi >= -1) & (xi <= _SIZE) & (yi >= -1) & (yi <= _SIZE)
            index = ((yi + 1).clamp(0, padded - 1) * padded + (xi + 1).clamp(0, padded - 1)).long()
            canvas.scatter_add_(1, index, torch.where(inside, share, 0.0))
    return canvas.view(n, 1, padded, padded)[:, :, 1:-1, 1:-1]


@lru_cache(maxsize=1)
def _blur_bands() -> tuple[Tensor, Tensor]:
    """Gaussian blurs (σ 0.8 and 1.6 px, zero padding) as banded matrices: ``B @ x @ B.T`` is a
    separable blur, 6x faster than ``conv2d`` on one-channel 32×32 images on a CPU."""
    offsets = torch.arange(_SIZE)[:, None] - torch.arange(_SIZE)[None, :]
    bands = []
    for sigma in (0.8, 1.6):
        band = torch.exp(-(offsets.float() ** 2) / (2 * sigma**2)) * (offsets.abs() <= 3)
        bands.append(band / torch.exp(-(torch.arange(-3, 4).float() ** 2) / (2 * sigma**2)).sum())
    return bands[0], bands[1]


@lru_cache(maxsize=1)
def _upsample_matrix() -> Tensor:
    """Bicubic 4 → 32 upsampling as a (32, 4) matrix: ``U @ x @ U.T`` equals ``F.interpolate``."""
    return F.interpolate(torch.eye(4)[None, None], size=(_SIZE, 4), mode="bicubic", align_corners=False)[0, 0]


def _smooth_patterns(count: int, generator: torch.Generator) -> Tensor:
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    upsample = _upsample_matrix()
    return upsample @ coarse @ upsample.T
