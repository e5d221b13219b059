"""Accuracy per second of training: each network (``--networks NET[@WIDTH]:LR,...``) trained for the
same training time (``--network_seconds``, validation left out), validated every 50 steps: images/s,
validation accuracy after 15 s and at the end, seconds to reach 0.90 / 0.93 / 0.95.

    python -m tools.bench networks --full
"""

from __future__ import annotations

from functools import partial
from typing import Any

from lit_accel.measure import cell, markdown_table, median
from tools.bench.fits import Run, Settings, lit_args, timed_fit

# validation accuracies the case reports the training time to reach
ACCURACY_TARGETS = (0.90, 0.93, 0.95)
# and the validation accuracy reached after this many seconds of training
EARLY_SECONDS = 15.0


def parse_networks(spec: str) -> list[tuple[str, int | None, float]]:
    """``"SeedCNN:0.05,BatchNormCNN@24:0.05"`` → ``[("SeedCNN", None, 0.05), ("BatchNormCNN", 24, 0.05)]``.

    Raises:
        ValueError: an item that is not ``NET[@WIDTH]:LR`` with a network of lit_accel.models.
    """
    import lit_accel.models as nets

    parsed = []
    for item in spec.split(","):
        name_width, _, lr = item.strip().partition(":")
        name, _, width = name_width.partition("@")
        if name not in nets.__all__ or name == "ImageClassifier" or not lr:
            raise ValueError(f"--networks item {item!r} is not allowed: use NET[@WIDTH]:LR, e.g. BatchNormCNN@16:0.05")
        parsed.append((name, int(width) if width else None, float(lr)))
    return parsed


def variants(s: Settings) -> dict[str, Run]:
    runs = {}
    for net, width, lr in parse_networks(s.networks):
        data_images = s.network_train_images + s.network_val_images
        args = [*lit_args(s, net=net, data_images=data_images, val_images=s.network_val_images)]
        args += ["--model.optimizer.lr", str(lr), "--trainer.max_epochs", "1000"]
        args += ["--trainer.check_val_every_n_epoch", "null", "--trainer.val_check_interval", str(s.network_val_every)]
        if net == "ResNet9" and width is None:
            width = s.resnet_width
        if width is not None:
            args += ["--model.net.width", str(width)]
        label = f"{net} (width {width}), lr {lr}" if width is not None else f"{net}, lr {lr}"
        runs[label] = partial(timed_fit, s, args, validate=True, budget_seconds=s.network_seconds)
    return runs


def seconds_to_accuracy(curve: list[tuple[float, int, float]], target: float) -> float:
    """Training seconds at the first validation with accuracy ≥ ``target``; inf if none reached it."""
    return next((seconds for seconds, _step, accuracy in curve if accuracy >= target), float("inf"))


def accuracy_after(curve: list[tuple[float, int, float]], seconds: float) -> float:
    """Accuracy at the last validation within ``seconds`` of training; NaN if there was none."""
    return max((point for point in curve if point[0] <= seconds), default=(0.0, 0, float("nan")))[2]


def summarize_curves(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The time-to-accuracy figures of one network's runs (medians over rounds)."""
    return {
        "train_seconds": median(r["train_seconds"] for r in runs),
        "seconds_to": {f"{t:.2f}": median(seconds_to_accuracy(r["curve"], t) for r in runs) for t in ACCURACY_TARGETS},
        "early_val_acc": median(accuracy_after(r["curve"], EARLY_SECONDS) for r in runs),
        "curves": [r["curve"] for r in runs],
    }


def network_table(rows: list[dict[str, Any]]) -> str:
    """Accuracy per second of training: the networks case's time-to-accuracy view."""
    targets = [f"{t:.2f}" for t in ACCURACY_TARGETS]
    columns = ["network", "images/s:", "training s:", f"val acc after {EARLY_SECONDS:.0f} s:", "val acc at the end:"]
    cells = []
    for row in rows:
        if "seconds_to" not in row:
            continue
        reached = ["not reached" if v == float("inf") else f"{v:.1f}" for v in (row["seconds_to"][t] for t in targets)]
        cells.append(
            [
                row["variant"],
                cell(row["images_per_sec"]),
                f"{row['train_seconds']:.1f}",
                cell(row["early_val_acc"], "{:.3f}"),
                f"{row['val_acc']:.3f}",
                *reached,
            ]
        )
    return markdown_table([*columns, *(f"s to val acc {t}:" for t in targets)], cells)
