"""Write lit_accel's synthetic data set as a folder in CIFAR-10's on-disk format.

So that everything that reads a CIFAR-format folder (``--data.data_dir DIR --data.verify_checksums
false``, ``python -m tools.bench recipe --data_dir DIR``) can be run offline, and timed as
it is on real files: the data is loaded from disk instead of being generated in every process.

Usage::

    python -m tools.synthetic_cifar_folder /tmp/synthetic-cifar          # 50,000 train + 10,000 test
    python -m tools.bench recipe --data_dir /tmp/synthetic-cifar

Layout written: ``DIR/cifar-10-batches-py/data_batch_1`` … ``data_batch_5``, ``test_batch``,
``batches.meta``, each a pickled dict as in the official archive (``data``: uint8 ``(N, 3072)``, the
red, green and blue planes row by row; ``labels``; ``label_names`` in the meta file).
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

from torch import Tensor

from lit_accel.data import CIFAR10_CLASSES, make_synthetic_cifar

BATCHES = 5


def write_folder(out: Path, train_size: int = 50_000, test_size: int = 10_000, seed: int = 0) -> Path:
    """Write the synthetic set (``seed``) to ``out/cifar-10-batches-py``; returns that folder."""
    images, labels = make_synthetic_cifar(train_size, seed=seed, split=0)
    test_images, test_labels = make_synthetic_cifar(test_size, seed=seed, split=1)
    return write_cifar_folder(out, images, labels, test_images, test_labels)


def write_cifar_folder(out: Path, images: Tensor, labels: Tensor, test_images: Tensor, test_labels: Tensor) -> Path:
    """Write uint8 ``(N, 3, 32, 32)`` images and their labels (CIFAR-10's classes) to
    ``out/cifar-10-batches-py`` in CIFAR-10's on-disk format; returns that folder.

    Raises:
        ValueError: fewer than 5 training images (one per batch file) or no test image, or an image
            that is not 3×32×32.
    """
    if len(images) < BATCHES or len(test_images) < 1:
        raise ValueError(
            f"{len(images)} training and {len(test_images)} test images: CIFAR-10's format needs at least "
            f"{BATCHES} training images (one per batch file) and 1 test image"
        )
    if tuple(images.shape[1:]) != (3, 32, 32) or tuple(test_images.shape[1:]) != (3, 32, 32):
        raise ValueError(f"images of shape {tuple(images.shape[1:])}: CIFAR-10's format holds 3×32×32 images")
    folder = out / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_size = len(images)
    bounds = [round(i * train_size / BATCHES) for i in range(BATCHES + 1)]
    for i in range(BATCHES):
        part = slice(bounds[i], bounds[i + 1])
        _dump(folder / f"data_batch_{i + 1}", images[part], labels[part], f"training batch {i + 1} of {BATCHES}")
    _dump(folder / "test_batch", test_images, test_labels, "testing batch 1 of 1")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(
            {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": bounds[1], "num_vis": 3072}, f, protocol=4
        )
    return folder


def _dump(path: Path, images: Tensor, labels: Tensor, name: str) -> None:
    entry = {
        "batch_label": name,
        "labels": labels.tolist(),
        "data": images.reshape(len(images), -1).numpy(),
        "filenames": [f"synthetic_{i:05d}.png" for i in range(len(images))],
    }
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the folder to create (cifar-10-batches-py/ goes inside)")
    parser.add_argument("--train_size", type=int, default=50_000)
    parser.add_argument("--test_size", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0, help="picks the data set (its class glyphs)")
    args = parser.parse_args(argv)
    if args.train_size < BATCHES or args.test_size < 1:
        parser.error(f"--train_size must be at least {BATCHES} and --test_size at least 1")
    print(write_folder(args.out, args.train_size, args.test_size, args.seed))


if __name__ == "__main__":
    main()
