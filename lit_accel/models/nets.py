"""Networks that :class:`~lit_accel.models.ImageClassifier` can wrap.

All take ``(N, 3, 32, 32)`` float images (already normalized) and return ``(N, num_classes)``
logits. Each exposes ``fsdp_units()``: the sub-modules that FSDP2 shards one by one before the
root (one all-gather per unit instead of one for the whole network).
"""

from __future__ import annotations

import math

from torch import Tensor, nn
from typing_extensions import override

__all__ = ["SeedCNN", "BatchNormCNN", "LiteCNN", "ResNet9"]


class SeedCNN(nn.Module):
    """The baseline from the originating design (Keras-style, "valid" convolutions).

    Conv 32 3×3 ReLU, MaxPool 2, Conv 64 3×3 ReLU, MaxPool 2, Flatten, Dense 128 ReLU,
    Dropout 0.2, Dense ``num_classes``. Spatial sizes: 32 → 30 → 15 → 13 → 6, so the first dense
    layer sees 64·6·6 = 2,304 features. About 0.32 M parameters.

    Args:
        num_classes: number of output logits.
        dropout: dropout probability before the last layer.

    Example::

        model:
          net:
            class_path: lit_accel.models.SeedCNN
    """

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
        self.classifier = _dense_head(64 * 6 * 6, num_classes, dropout)

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

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
    optionally with a third ("same") convolution on the pooled 6×6 maps: BatchNormCNN, LiteCNN."""

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
        self.classifier = _dense_head(channels * 6 * 6, num_classes, dropout)

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def fsdp_units(self) -> list[nn.Module]:
        return [self.features, self.classifier]


class BatchNormCNN(_PoolThenNormCNN):
    """A BatchNorm CNN that reaches a given accuracy in less training time than SeedCNN on a CPU.

    SeedCNN's layout at half the width, with BatchNorm: Conv ``w`` 3×3, MaxPool 2, BN, ReLU,
    Conv ``2w`` 3×3, MaxPool 2, BN, ReLU, Flatten, Dense 128 ReLU, Dropout, Dense
    ``num_classes`` ("valid" convolutions, 32 → 30 → 15 → 13 → 6, as in SeedCNN). About 0.15 M
    parameters and 1.3 M multiply-adds per image at ``width=16``, against SeedCNN's 0.32 M and 4.2 M.

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
    ``width=16``: half of SeedCNN's compute, 1.6 × BatchNormCNN's.

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
    record network, built for GPUs; a smaller width makes it usable on CPU.

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
