"""A seeded, learnable, CIFAR-10-shaped data set for offline demos, smoke runs and benchmarks.

Each class has a smooth colour "prototype" image. A sample is its class prototype blended with a
smooth distractor pattern of its own, shifted by a few pixels, plus pixel noise, stored as uint8
``(N, 3, 32, 32)`` like CIFAR-10. The class is visible but not trivially: a linear model does
poorly, a small CNN learns it well above chance within an epoch, and it never reaches a perfect
score quickly, so learning curves stay informative.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["make_synthetic_cifar"]

_PROTOTYPE_WEIGHT = 0.4  # share of the class prototype in each image; the rest is distractor
_NOISE_STD = 0.12  # pixel noise, in units of the [0, 1] intensity range
_MAX_SHIFT = 3  # pixels each sample is rolled by, at most, in each direction
_CHUNK = 8192  # samples generated at a time, to bound peak memory


def _smooth_patterns(count: int, generator: torch.Generator, grid: int = 4) -> Tensor:
    coarse = torch.rand(count, 3, grid, grid, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bicubic", align_corners=False)


def _roll_each(images: Tensor, shifts: Tensor) -> Tensor:
    """``torch.roll`` of each image by its own (dy, dx), as one gather."""
    n, c, h, w = images.shape
    rows = (torch.arange(h)[None, :] - shifts[:, :1]) % h
    cols = (torch.arange(w)[None, :] - shifts[:, 1:]) % w
    return images[
        torch.arange(n)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def make_synthetic_cifar(num_samples: int, seed: int = 0, split: int = 0, num_classes: int = 10) -> tuple[Tensor, Tensor]:
    """Generate ``num_samples`` images and labels.

    Args:
        num_samples: number of images.
        seed: picks the data set (the class prototypes); the same seed gives the same classes.
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
    class_gen = torch.Generator().manual_seed(seed)
    prototypes = _smooth_patterns(num_classes, class_gen, grid=4)
    sample_gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (split + 1))
    labels = torch.randint(0, num_classes, (num_samples,), generator=sample_gen)
    images = torch.empty(num_samples, 3, 32, 32, dtype=torch.uint8)
    for start in range(0, num_samples, _CHUNK):
        stop = min(start + _CHUNK, num_samples)
        n = stop - start
        chunk_labels = labels[start:stop]
        distractor = _smooth_patterns(n, sample_gen, grid=4)
        mixed = _PROTOTYPE_WEIGHT * prototypes[chunk_labels] + (1 - _PROTOTYPE_WEIGHT) * distractor
        shifts = torch.randint(-_MAX_SHIFT, _MAX_SHIFT + 1, (n, 2), generator=sample_gen)
        mixed = _roll_each(mixed, shifts)
        mixed += _NOISE_STD * torch.randn(mixed.shape, generator=sample_gen)
        images[start:stop] = mixed.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return images, labels
