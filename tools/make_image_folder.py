"""Write a folder of generated image files in torchvision's ``ImageFolder`` layout, seeded and offline.

So that ``lit-accel fit`` on a folder of images, and ``python -m tools.bench image_folder``, run
without a download. The pictures are lit_accel's synthetic set (:func:`lit_accel.data.make_synthetic_cifar`,
learnable: ten classes of glyphs), scaled from 32 to ``--size`` pixels (bicubic) with seeded per-pixel
noise on top (standard deviation ``NOISE``, in 0-255 units), so that the files compress and decode
like photos rather than like smooth upscaled drawings. At 32 px nothing is scaled or added: the
files hold the synthetic set's pixels exactly.

Usage::

    python -m tools.make_image_folder /tmp/folder64 --images 20000 --size 64 --format jpeg
    python -m tools.make_image_folder /tmp/folder32 --images 20000 --size 32 --cifar_dir /tmp/cifar32

Layouts (``--layout``), class folders named as CIFAR-10's classes (``airplane`` … ``truck``):

- ``split``: ``OUT/train/<class>/000000.jpg`` … and ``OUT/val/<class>/…`` (``--val_fraction`` of the images).
- ``flat``: the same images in ``OUT/<class>/train_000000.jpg``, ``OUT/<class>/val_000000.jpg``: the
  class folders directly under ``OUT``, for a data module that splits by a seeded fraction.

A file's number is its position in its split (``train`` or ``val``), the same position as in the
synthetic set and in the CIFAR-format copy. Formats (``--format``): ``jpeg`` (quality
``JPEG_QUALITY``), ``png``, or ``mixed`` (even numbers JPEG, odd numbers PNG).

``--cifar_dir DIR`` also writes the same images at 32 px in CIFAR-10's on-disk format
(``DIR/cifar-10-batches-py``: the training images in ``data_batch_1`` … ``5``, the validation
images in ``test_batch``), with :func:`tools.synthetic_cifar_folder.write_cifar_folder`: the
start-up comparison of the benchmark reads the same pictures both ways.

Encoding runs in a pool of ``--workers`` processes (default: one per core): 20,000 images in
about a minute on 2 cores, most of it generating the synthetic set.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMATS = ("jpeg", "png", "mixed")
LAYOUTS = ("split", "flat")
SPLITS = ("train", "val")
JPEG_QUALITY = 90  # Pillow's default is 75; cameras and exports write 85-95
NOISE = 6.0  # per-pixel noise above or below 32 px (standard deviation, 0-255 units)
_CHUNK = 256  # images per task sent to an encoding worker


@dataclass(frozen=True)
class Written:
    """What :func:`write_image_folder` wrote."""

    root: Path
    train_images: int
    val_images: int
    size: int
    format: str
    layout: str
    cifar_folder: Path | None
    seconds: float


def extension(format: str, index: int) -> str:
    """The file extension of image ``index`` in ``format`` (``mixed``: even JPEG, odd PNG)."""
    if format == "mixed":
        return ".jpg" if index % 2 == 0 else ".png"
    return ".jpg" if format == "jpeg" else ".png"


def relative_path(layout: str, split: str, class_name: str, index: int, format: str) -> str:
    """Where image ``index`` of ``split`` goes, relative to the folder's root."""
    name = f"{index:06d}{extension(format, index)}"
    if layout == "split":
        return f"{split}/{class_name}/{name}"
    return f"{class_name}/{split}_{name}"


def split_sizes(images: int, val_fraction: float) -> tuple[int, int]:
    """``(training, validation)`` image counts: ``val_fraction`` of ``images`` rounded, the rest for training."""
    val = round(images * val_fraction)
    return images - val, val


def render(picture: np.ndarray, size: int, seed: int, split: int, index: int) -> np.ndarray:
    """One image as written: uint8 ``(size, size, 3)`` from the synthetic set's uint8 ``(32, 32, 3)``.

    At 32 px the picture itself; otherwise scaled (bicubic) with noise seeded by
    ``(seed, split, index)``, so an image does not depend on which worker writes it.
    """
    from PIL import Image

    if size == picture.shape[0]:
        return picture
    scaled = np.asarray(Image.fromarray(picture).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    noise = np.random.default_rng([seed, split, index]).normal(0.0, NOISE, scaled.shape)
    return np.clip(np.rint(scaled + noise), 0, 255).astype(np.uint8)


def _write_chunk(task: tuple[list[tuple[str, int, int]], np.ndarray, int, int, str]) -> int:
    """Worker: render and save a chunk of images; returns how many it wrote."""
    from PIL import Image

    items, pictures, size, seed, root = task
    for (relative, split, index), picture in zip(items, pictures):
        path = os.path.join(root, relative)
        image = Image.fromarray(render(picture, size, seed, split, index))
        if path.endswith(".jpg"):
            image.save(path, "JPEG", quality=JPEG_QUALITY)
        else:
            image.save(path, "PNG")
    return len(items)


def write_image_folder(
    out: Path,
    images: int,
    size: int = 64,
    format: str = "jpeg",
    layout: str = "split",
    val_fraction: float = 0.1,
    seed: int = 0,
    workers: int | None = None,
    cifar_dir: Path | None = None,
) -> Written:
    """Write ``images`` generated images of ``size``×``size`` pixels to ``out`` (see the module's docstring).

    Args:
        out: a new or empty folder.
        images: how many, training and validation together.
        size: pixels per side.
        format: ``jpeg``, ``png`` or ``mixed``.
        layout: ``split`` (``train/`` and ``val/``) or ``flat`` (class folders directly under ``out``).
        val_fraction: the share of the images in the validation split (0 for none).
        seed: picks the data set (as :func:`lit_accel.data.make_synthetic_cifar`) and the noise.
        workers: encoding processes (default: one per core; 1: in this process).
        cifar_dir: also write the same images at 32 px in CIFAR-10's on-disk format there.

    Raises:
        ValueError: a bad argument, ``out`` not empty, or a class left without an image in a split
            (too few images: use more, or another seed).
    """
    from lit_accel.data import CIFAR10_CLASSES, make_synthetic_cifar
    from tools.synthetic_cifar_folder import write_cifar_folder

    started = time.perf_counter()
    check_arguments(images, size, format, layout, val_fraction, workers)
    train_count, val_count = split_sizes(images, val_fraction)
    if cifar_dir is not None and (val_count < 1 or train_count < 5):
        raise ValueError(
            f"--cifar_dir with {train_count} training and {val_count} validation images: CIFAR-10's format "
            "needs at least 5 training and 1 validation image (raise --images or --val_fraction)"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} is not an empty folder: give a new or empty one (its files would mix in)")
    sets = {"train": make_synthetic_cifar(train_count, seed=seed, split=0)}
    if val_count:
        sets["val"] = make_synthetic_cifar(val_count, seed=seed, split=1)
    for split, (_, labels) in sets.items():
        counts = labels.bincount(minlength=len(CIFAR10_CLASSES))
        if not bool(counts.all()):
            missing = CIFAR10_CLASSES[int((counts == 0).nonzero()[0])]
            raise ValueError(
                f"--images {images}: class {missing!r} gets no {split} image with seed {seed}; "
                "use more images (or another --seed)"
            )
    folders = [f"{split}/{name}" if layout == "split" else name for split in sets for name in CIFAR10_CLASSES]
    for folder in folders:
        (out / folder).mkdir(parents=True, exist_ok=True)
    tasks = []
    for split_index, (split, (pictures, labels)) in enumerate(sets.items()):
        hwc = pictures.permute(0, 2, 3, 1).contiguous().numpy()
        items = [
            (relative_path(layout, split, CIFAR10_CLASSES[int(label)], index, format), split_index, index)
            for index, label in enumerate(labels.tolist())
        ]
        for start in range(0, len(items), _CHUNK):
            stop = start + _CHUNK
            tasks.append((items[start:stop], hwc[start:stop], size, seed, str(out)))
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        for task in tasks:
            _write_chunk(task)
    else:
        # spawn, not fork: this process has run torch's thread pool (libgomp does not survive a fork)
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_chunk, tasks):  # a worker's error re-raises here
                pass
    cifar_folder = None
    if cifar_dir is not None:
        cifar_folder = write_cifar_folder(cifar_dir, *sets["train"], *sets["val"])
    return Written(out, train_count, val_count, size, format, layout, cifar_folder, time.perf_counter() - started)


def check_arguments(
    images: int, size: int, format: str, layout: str, val_fraction: float, workers: int | None = None
) -> None:
    """Raises ValueError naming the first argument :func:`write_image_folder` cannot take."""
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ValueError(f"images={images!r} is not allowed: use a positive number of images")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size={size!r} is not allowed: use a positive number of pixels")
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not allowed: use one of {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not allowed: use one of {', '.join(LAYOUTS)}")
    if not (isinstance(val_fraction, (int, float)) and math.isfinite(val_fraction) and 0 <= val_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction!r} is not allowed: use a number from 0 up to (not incl.) 1")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers={workers!r} is not allowed: use a positive number of processes")


def main(argv: list[str] | None = None) -> Written:
    parser = argparse.ArgumentParser(
        prog="python -m tools.make_image_folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, help="the folder to write (new or empty)")
    parser.add_argument("--images", type=int, default=20_000, help="how many, training and validation together")
    parser.add_argument("--size", type=int, default=64, help="pixels per side")
    parser.add_argument("--format", default="jpeg", choices=FORMATS)
    parser.add_argument("--layout", default="split", choices=LAYOUTS)
    parser.add_argument("--val_fraction", type=float, default=0.1, help="share of the images in val (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="picks the data set (its class glyphs) and the noise")
    parser.add_argument("--workers", type=int, help="encoding processes (default: one per core)")
    parser.add_argument("--cifar_dir", type=Path, help="also write the same images at 32 px in CIFAR-10's format")
    args = parser.parse_args(argv)
    try:
        written = write_image_folder(
            args.out,
            args.images,
            args.size,
            args.format,
            args.layout,
            args.val_fraction,
            args.seed,
            args.workers,
            args.cifar_dir,
        )
    except ValueError as error:
        parser.error(str(error))
    copy = f"; CIFAR-format copy in {written.cifar_folder}" if written.cifar_folder else ""
    print(
        f"{written.root}: {written.train_images} training + {written.val_images} validation images, "
        f"{written.size}x{written.size} {written.format}, layout {written.layout}, "
        f"in {written.seconds:.1f} s{copy}"
    )
    return written


if __name__ == "__main__":
    main()
