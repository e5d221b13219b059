"""Networks that :class:`~lit_accel.models.ImageClassifier` can wrap.

All take ``(N, 3, S, S)`` float images (already normalized), S from the network's
``min_image_size`` up (32 for CIFAR-10; 64, 96, 128 … for image folders), and return
``(N, num_classes)`` logits. Each exposes ``fsdp_units()``: the sub-modules that FSDP2 shards one
by one before the root (one all-gather per unit instead of one for the whole network).

Other image sizes: SeedCNN, BatchNormCNN and LiteCNN flatten a 6×6 grid of features into their
first dense layer (its size fixed by CIFAR-10's 32-pixel images). A :class:`GridPool` between the
features and the dense head averages larger maps down to that grid (adaptive average pooling) and
passes a 6×6 map through untouched. So at 32 pixels (and 30, 31, whose maps are also 6×6) the
network is exactly the fixed-flatten network it is at heart: same
parameters, same ``state_dict`` keys (GridPool holds none), bit-identical outputs, and no extra
tensor operation (two shape comparisons in Python per forward pass).
ResNet9 ends in a global max pool and takes any size whose maps survive its three poolings.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

__all__ = ["SeedCNN", "BatchNormCNN", "LiteCNN", "ResNet9", "GridPool", "check_image_size"]

# The side of the feature grid the dense heads read: 32-pixel images leave 6×6 maps after two
# "valid" 3×3 convolutions and two 2×2 poolings (32 → 30 → 15 → 13 → 6).
GRID = 6


class GridPool(nn.Module):
    """Adaptive average pooling of ``(N, C, H, W)`` maps to ``(N, C, size, size)``, skipped for maps
    already that size (so networks sized for 32-pixel images run unchanged at 32 pixels).

    No parameters or buffers: adding it to a network leaves its ``state_dict`` as it was. Maps
    smaller than ``size`` are refused (pooling would have to repeat values to fill the grid).

    Args:
        size: side of the output grid.

    Raises:
        ValueError: for ``size`` < 1; in ``forward``, for a map smaller than ``size`` on a side.
    """

    def __init__(self, size: int = GRID) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"size={size!r} is not allowed: use a positive number of cells")
        self.size = size

    @override
    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2], x.shape[-1]
        if height == self.size and width == self.size:
            return x
        if height < self.size or width < self.size:
            raise ValueError(f"feature maps of {height}×{width} are smaller than the {self.size}×{self.size} grid")
        return F.adaptive_avg_pool2d(x, self.size)

    @override
    def extra_repr(self) -> str:
        return f"size={self.size}"


def check_image_size(images: Tensor, smallest: int, network: str) -> None:
    """Refuse images with a side below ``smallest`` pixels, naming the network and the sizes.

    Raises:
        ValueError: for ``images`` whose height or width is below ``smallest``.
    """
    height, width = images.shape[-2], images.shape[-1]
    if height < smallest or width < smallest:
        raise ValueError(
            f"{network} takes images of at least {smallest}×{smallest} pixels, got {height}×{width}: "
            f"use image_size {smallest} or more"
        )


class SeedCNN(nn.Module):
    """The baseline from the originating design (Keras-style, "valid" convolutions).

    Conv 32 3×3 ReLU, MaxPool 2, Conv 64 3×3 ReLU, MaxPool 2, Flatten, Dense 128 ReLU,
    Dropout 0.2, Dense ``num_classes``. Spatial sizes: 32 → 30 → 15 → 13 → 6, so the first dense
    layer sees 64·6·6 = 2,304 features. About 0.32 M parameters.

    Images of other sizes: 30 pixels or more (the smallest whose maps reach the 6×6 grid); larger
    maps are average-pooled to 6×6 before the flatten (:class:`GridPool`, skipped at 30-32 pixels).

    Args:
        num_classes: number of output logits.
        dropout: dropout probability before the last layer.

    Example::

        model:
          net:
            class_path: lit_accel.models.SeedCNN
    """

    # two "valid" 3×3 convolutions and two 2×2 poolings: 30 → 28 → 14 → 12 → 6
    min_image_size = 30

    def __init__(self, num_classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()
        _check_common(num_classes, dropout)
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        # Outside `classifier`: inside it would shift the dense layers' state_dict keys.
        self.pool = GridPool(GRID)
        self.classifier = _dense_head(64 * GRID * GRID, num_classes, dropout)

    @override
    def forward(self, x: Tensor) -> Tensor:
        check_image_size(x, self.min_image_size, type(self).__name__)
        return self.classifier(self.pool(self.features(x)))

    def fsdp_units(self) -> list[nn.Module]:
        return [self.features, self.classifier]


def _dense_head(features: int, num_classes: int, dropout: float) -> nn.Sequential:
    """SeedCNN's classifier: Flatten, Dense 128 ReLU, Dropout, Dense ``num_classes``."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, 128),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(128, num_classes),
    )


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class _PoolThenNormCNN(nn.Module):
    """SeedCNN's layout with BatchNorm and ReLU after each pooling and bias-free convolutions,
    optionally with a third ("same") convolution on the pooled 6×6 maps: BatchNormCNN, LiteCNN.
    Larger maps are average-pooled to 6×6 after the features (see :class:`SeedCNN`)."""

    min_image_size = SeedCNN.min_image_size  # the same two valid convolutions and poolings

    def __init__(self, num_classes: int, width: int, dropout: float, third_conv: bool) -> None:
        super().__init__()
        _check_common(num_classes, dropout)
        if width < 1:
            raise ValueError(f"width={width!r} is not allowed: use a positive number of channels")
        w = width
        layers: list[nn.Module] = [
            nn.Conv2d(3, w, kernel_size=3, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, kernel_size=3, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(inplace=True),
        ]
        channels = 2 * w
        if third_conv:
            layers += [
                nn.Conv2d(2 * w, 4 * w, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(4 * w),
                nn.ReLU(inplace=True),
            ]
            channels = 4 * w
        self.features = nn.Sequential(*layers)
        self.pool = GridPool(GRID)
        self.classifier = _dense_head(channels * GRID * GRID, num_classes, dropout)

    @override
    def forward(self, x: Tensor) -> Tensor:
        check_image_size(x, self.min_image_size, type(self).__name__)
        return self.classifier(self.pool(self.features(x)))

    def fsdp_units(self) -> list[nn.Module]:
        return [self.features, self.classifier]


class BatchNormCNN(_PoolThenNormCNN):
    """A BatchNorm CNN that reaches a given accuracy in less training time than SeedCNN on a CPU.

    SeedCNN's layout at half the width, with BatchNorm: Conv ``w`` 3×3, MaxPool 2, BN, ReLU,
    Conv ``2w`` 3×3, MaxPool 2, BN, ReLU, Flatten, Dense 128 ReLU, Dropout, Dense
    ``num_classes`` ("valid" convolutions, 32 → 30 → 15 → 13 → 6, as in SeedCNN). About 0.15 M
    parameters and 1.3 M multiply-adds per image at ``width=16``, against SeedCNN's 0.32 M and 4.2 M.
    Images of other sizes: 30 pixels or more, pooled to the 6×6 grid as in SeedCNN.

    Why it is faster per second of training:

    - Half the width is a quarter of the second convolution's work, the bulk of SeedCNN's.
    - BatchNorm and ReLU come after the pooling, on a quarter of the values; the convolutions have
      no bias (BatchNorm's shift replaces it).
    - BatchNorm keeps the half-width network learning about as much per step as SeedCNN: ahead
      early in training, 4-21 % more steps to reach 0.93-0.95 on the synthetic set.

    Measured on 2 CPU cores (BENCHMARKS.md, "networks"): 1.7 × SeedCNN's images/s, and a given
    validation accuracy in 0.6-0.7 × SeedCNN's training time on the synthetic set (both at LR
    0.05: SeedCNN's best of 0.02-0.2, BatchNormCNN's of 0.05 and 0.1).

    Args:
        num_classes: number of output logits.
        width: channels of the first convolution (the second has twice as many). 12 and 16 did
            best of 12-32 on a 2-core CPU (BENCHMARKS.md); 32 is SeedCNN's width.
        dropout: dropout probability before the last layer.

    Example::

        model:
          net:
            class_path: lit_accel.models.BatchNormCNN
            init_args: {width: 16}
    """

    def __init__(self, num_classes: int = 10, width: int = 16, dropout: float = 0.2) -> None:
        super().__init__(num_classes, width, dropout, third_conv=False)


class LiteCNN(_PoolThenNormCNN):
    """The default network: BatchNormCNN plus a third convolution, for accuracy per second on a CPU.

    Conv ``w`` 3×3, MaxPool 2, BN, ReLU, Conv ``2w`` 3×3, MaxPool 2, BN, ReLU, Conv ``4w`` 3×3
    ("same"), BN, ReLU, Flatten, Dense 128 ReLU, Dropout, Dense ``num_classes``. Spatial sizes
    32 → 30 → 15 → 13 → 6 → 6. About 0.32 M parameters and 2.1 M multiply-adds per image at
    ``width=16``: half of SeedCNN's compute, 1.6 × BatchNormCNN's. Images of other sizes: 30 pixels
    or more; the third convolution runs on the full maps, then they are pooled to 6×6 as in SeedCNN.

    Why this shape. On real images the half-width BatchNormCNN underfits (maintainers'
    measurement: ``train/acc`` 0.893 below ``val/acc`` 0.910 after 15 epochs), and more capacity
    paid even at 3 epochs (width 32: 0.877 vs 0.854). Depth is the cheap way to add it: the third
    convolution runs on the 6×6 maps left after two poolings, so it adds 0.8 M multiply-adds but
    composes the second layer's features (parts into objects), where widening the network adds
    its cost at full resolution (BatchNormCNN at width 24: 2.6 M, at 32: 4.2 M; LiteCNN at 24: 4.3 M).
    BatchNorm and ReLU of the first two convolutions come after pooling (on a quarter of the values), and no convolution
    has a bias (BatchNorm's shift replaces it). BENCHMARKS.md has the measurements.

    Args:
        num_classes: number of output logits.
        width: channels of the first convolution (then 2× and 4×).
        dropout: dropout probability before the last layer.

    Example::

        model:
          net:
            class_path: lit_accel.models.LiteCNN
            init_args: {width: 16}
    """

    def __init__(self, num_classes: int = 10, width: int = 16, dropout: float = 0.2) -> None:
        super().__init__(num_classes, width, dropout, third_conv=True)


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    @override
    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """The residual net of the CIFAR-10 speed records (Page's ResNet-9, as in airbench's lineage).

    prep conv(w) → [conv(2w), pool, residual] → [conv(4w), pool] → [conv(8w), pool, residual] →
    global max pool → linear, with logits multiplied by ``logit_scale`` (0.125 in the records,
    which keeps the softmax soft early in training). With ``width=64`` it is the 6.5 M-parameter
    record network, built for GPUs; a smaller width makes it usable on CPU. Any image size from 8
    pixels up (its maps must survive three 2×2 poolings: 8 → 4 → 2 → 1); the global pool makes
    the head independent of the size.

    Args:
        num_classes: number of output logits.
        width: channels of the prep layer (the record network uses 64).
        logit_scale: multiplier applied to the logits.

    Example::

        model:
          net:
            class_path: lit_accel.models.ResNet9
            init_args: {width: 64}
    """

    min_image_size = 8  # three 2×2 poolings: 8 → 4 → 2 → 1

    def __init__(self, num_classes: int = 10, width: int = 64, logit_scale: float = 0.125) -> None:
        super().__init__()
        _check_common(num_classes, 0.0)
        if width < 1:
            raise ValueError(f"width={width!r} is not allowed: use a positive number of channels")
        if not (math.isfinite(logit_scale) and logit_scale > 0):
            raise ValueError(f"logit_scale={logit_scale!r} is not allowed: use a positive number")
        w = width
        self.logit_scale = logit_scale
        self.prep = _conv_bn(3, w)
        self.layers = nn.ModuleList(
            [
                nn.Sequential(_conv_bn(w, 2 * w), nn.MaxPool2d(2), _Residual(2 * w)),
                nn.Sequential(_conv_bn(2 * w, 4 * w), nn.MaxPool2d(2)),
                nn.Sequential(_conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), _Residual(8 * w)),
            ]
        )
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8 * w, num_classes, bias=False))

    @override
    def forward(self, x: Tensor) -> Tensor:
        check_image_size(x, self.min_image_size, type(self).__name__)
        x = self.prep(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x) * self.logit_scale

    def fsdp_units(self) -> list[nn.Module]:
        return [self.prep, *self.layers, self.head]


def _check_common(num_classes: int, dropout: float) -> None:
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} is not allowed: use 2 or more classes")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} is not allowed: use a probability in [0, 1)")
