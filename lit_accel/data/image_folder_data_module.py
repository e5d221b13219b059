"""A folder of image files in torchvision's ``ImageFolder`` layout, decoded once and served preloaded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_accel.data.image_cache import IMAGE_EXTENSIONS, DecodedImages, image_entries, load_or_decode
from lit_accel.data.preloaded import PreloadedImageDataModule, check_argument
from lit_accel.errors import DataNotFoundError

__all__ = ["CACHE_FOLDER", "FolderLayout", "ImageFolderDataModule", "find_layout"]

CACHE_FOLDER = ".lit_accel_cache"  # inside the data's root unless cache_dir says otherwise
SPLIT_FOLDERS = ("train", "val", "test")


@dataclass(frozen=True)
class FolderLayout:
    """Where each split's class folders are: ``folders["train"]`` always; ``"val"`` / ``"test"`` when
    the root has those sub-folders. ``split_by_fraction``: the root holds the class folders itself."""

    classes: tuple[str, ...]
    folders: dict[str, str]
    split_by_fraction: bool


def _class_folders(folder: str, setting: str, two_or_more: bool = True) -> tuple[str, ...]:
    """The sorted class folder names in ``folder`` (hidden ones left out), or one clear message."""
    if not os.path.exists(folder):
        raise DataNotFoundError(f"{setting}: no such folder ({os.path.abspath(folder)}).")
    if not os.path.isdir(folder):
        raise DataNotFoundError(
            f"{setting}: {os.path.abspath(folder)} is a file, not a folder: it must hold one folder per class."
        )
    names = sorted(entry.name for entry in os.scandir(folder) if not entry.name.startswith("."))
    classes = tuple(name for name in names if os.path.isdir(os.path.join(folder, name)))
    loose = [name for name in names if name not in classes and name.lower().endswith(IMAGE_EXTENSIONS)]
    if loose:
        raise DataNotFoundError(
            f"{setting}: {os.path.abspath(folder)} holds image files directly ({', '.join(loose[:3])}"
            f"{', ...' if len(loose) > 3 else ''}): put them in one folder per class (e.g. cat/, dog/), the "
            "folder's name being the class."
        )
    if not classes:
        raise DataNotFoundError(
            f"{setting}: {os.path.abspath(folder)} holds no class folders: put the images in one folder per class "
            "(e.g. cat/, dog/), or train/, val/ and test/ folders that each hold those class folders."
        )
    if two_or_more and len(classes) < 2:
        raise DataNotFoundError(
            f"{setting}: {os.path.abspath(folder)} holds a single class folder ({classes[0]}/): a classifier needs "
            "2 or more classes, one folder each."
        )
    return classes


def find_layout(root: str) -> FolderLayout:
    """How ``root`` is laid out: ``train/`` (+ optional ``val/``, ``test/``) of class folders, or the
    class folders themselves. Class names are the sorted folder names, as for torchvision's ImageFolder.

    Raises:
        DataNotFoundError: ``root`` (or ``train/``, ``val/``, ``test/``) missing or a file, image files
            where class folders belong, fewer than 2 classes, or ``val/``/``test/`` classes that differ
            from ``train/``'s.
    """
    if not os.path.isdir(root):
        what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise DataNotFoundError(
            f"data.root={root!r} {what} ({os.path.abspath(root)}): pass the folder that holds one folder of images "
            "per class, or train/ (and optionally val/, test/) folders of class folders."
        )
    train = os.path.join(root, "train")
    if not os.path.lexists(train):
        classes = _class_folders(root, "data.root")
        return FolderLayout(classes, {"train": root}, split_by_fraction=True)
    classes = _class_folders(train, "data.root train/")
    folders = {"train": train}
    for split in ("val", "test"):
        folder = os.path.join(root, split)
        if not os.path.lexists(folder):
            continue
        found = _class_folders(folder, f"data.root {split}/", two_or_more=False)  # compared with train/ below
        files = [name for name in classes if name not in found and os.path.isfile(os.path.join(folder, name))]
        if files:
            raise DataNotFoundError(
                f"data.root {split}/{files[0]} is a file, not a folder: {split}/ needs the class folders of train/ "
                f"({', '.join(classes)}), each holding that class's images."
            )
        if found != classes:
            missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            raise DataNotFoundError(
                f"data.root {split}/ has other class folders than train/ (missing: {', '.join(missing) or 'none'}; "
                f"not in train/: {', '.join(extra) or 'none'}): give {split}/ the same class folders as train/ "
                f"({', '.join(classes)}), or remove {split}/."
            )
        folders[split] = folder
    return FolderLayout(classes, folders, split_by_fraction=False)


class ImageFolderDataModule(PreloadedImageDataModule):
    """Your own images, one folder per class (torchvision's ``ImageFolder`` layout), decoded once.

    Layout of ``root``: either ``train/`` with one folder per class, plus optional ``val/`` and
    ``test/`` with the same class folders; or the class folders directly in ``root``. A split
    without its own folder is taken from the training images by a seeded random draw of
    ``val_fraction`` / ``test_fraction`` of them (the same on every rank and every run with the same
    ``seed``). Class names are the sorted folder names, as torchvision's ImageFolder gives them;
    the model saves them in its checkpoints. Files: JPEG, PNG, WebP, BMP, TIFF and GIF (its first
    frame), in any mode, below each class folder (subfolders included; hidden files and other
    extensions are left out).

    Decoding: each image is decoded **once**, scaled so its shorter side is ``image_size`` pixels and
    centre-cropped to ``image_size``×``image_size`` (the rule of
    :func:`~lit_accel.data.image_folder.read_image_file`, as ``lit-accel predict`` reads images),
    by ``decode_workers`` processes with a progress bar, into one uint8 tensor per split
    (``N·3·S·S`` bytes: 20,000 images at 64 px take 246 MB, at 32 px 61 MB). Each split is cached in
    ``cache_dir`` (default ``<root>/.lit_accel_cache/``) as ``<split>.pt``: the next run loads it
    without decoding, unless a file was added, removed or changed (size or modification time), the
    class folders or ``image_size`` changed, or the cache is damaged or from another version; then
    it is decoded again and a log line says why. Under DDP the local rank 0 decodes
    (``prepare_data``) and every rank loads the cache.

    The splits are then served like CIFAR-10's (:class:`~lit_accel.data.CIFAR10DataModule`, whose
    pipeline arguments are the same): preloaded on the host or the training device with per-sample
    augmentation there, or by the DataLoader pipeline; sharded under DDP, resumable mid-epoch.
    Images are normalized with CIFAR-10's channel statistics.

    Args:
        root: the data folder (layout above).
        image_size: side of the square images the network sees, in pixels (e.g. 32, 64, 96, 128).
        val_fraction: without ``val/``, the fraction of the training images held out for validation
            (0: no validation).
        test_fraction: without ``test/``, the fraction of the training images held out for testing
            (0: no test split). Test with the ``seed`` and fractions you trained with: others draw
            other images, some of them trained on.
        cache_dir: where the decoded splits are cached (null: ``<root>/.lit_accel_cache/``).
        decode_workers: processes that decode image files (0: this process; null: one per CPU core,
            at most 8).
        skip_unreadable: leave out files that are not readable images, with one warning listing
            them, instead of stopping at the first one.
        batch_size: training images per batch on each device.
        eval_batch_size: images per batch for validation, test and predict (default: ``batch_size``).
        pipeline: ``"preload"`` or ``"dataloader"``.
        residency: where the preload pipeline holds the splits: ``"host"`` or ``"device"``.
        augment: master switch for training augmentation.
        random_crop: pad by ``crop_padding`` pixels and crop back to ``image_size`` at a random offset.
        crop_padding: the padding of ``random_crop``, in pixels.
        horizontal_flip: mirror half of the images.
        cutout: side of the square cut out of each training image, in pixels (0: off).
        seed: seeds the validation and test draws.
        num_workers: DataLoader worker processes (``"dataloader"`` pipeline and ``predict_dir``).
        pin_memory: page-locked host memory for faster copies to a GPU.
        persistent_workers: keep workers alive between epochs (``"dataloader"`` only).
        prefetch_factor: batches each worker loads ahead (``"dataloader"`` only).
        drop_last: drop the last, smaller training batch of each epoch.
        predict_dir: a folder of image files to predict on instead of the test split (read at
            ``image_size``).

    Raises:
        ValueError: for an argument outside its allowed range.
        DataNotFoundError: (at setup) a missing root, a file where a folder belongs, fewer than two
            classes, an empty class folder, class folders that differ between ``train/`` and
            ``val/``/``test/``, an unreadable image (unless ``skip_unreadable``).
        ConfigurationError: the cache cannot be written (pass ``cache_dir``).

    Example::

        data:
          class_path: lit_accel.ImageFolderDataModule
          init_args:
            root: photos/
            image_size: 64
            val_fraction: 0.1
    """

    def __init__(
        self,
        root: str = "images/",
        image_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        cache_dir: str | None = None,
        decode_workers: int | None = None,
        skip_unreadable: bool = False,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        pipeline: Literal["preload", "dataloader"] = "preload",
        residency: Literal["host", "device"] = "host",
        augment: bool = True,
        random_crop: bool = True,
        crop_padding: int = 4,
        horizontal_flip: bool = True,
        cutout: int = 0,
        seed: int = 0,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        prefetch_factor: int | None = 2,
        drop_last: bool = False,
        predict_dir: str | None = None,
    ) -> None:
        super().__init__(
            image_size=image_size,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            pipeline=pipeline,
            residency=residency,
            augment=augment,
            random_crop=random_crop,
            crop_padding=crop_padding,
            horizontal_flip=horizontal_flip,
            cutout=cutout,
            seed=seed,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            prefetch_factor=prefetch_factor,
            drop_last=drop_last,
            predict_dir=predict_dir,
        )
        check_argument(isinstance(root, str) and root.strip() != "", "root", root, "the folder of images")
        check_argument(0 <= val_fraction < 1, "val_fraction", val_fraction, "a fraction in [0, 1)")
        check_argument(0 <= test_fraction < 1, "test_fraction", test_fraction, "a fraction in [0, 1)")
        check_argument(
            val_fraction + test_fraction < 1,
            "test_fraction",
            test_fraction,
            f"a fraction below 1 - val_fraction = {1 - val_fraction:g} (leave images to train on)",
        )
        check_argument(
            decode_workers is None or decode_workers >= 0, "decode_workers", decode_workers, "0 or more, or null"
        )
        check_argument(
            cache_dir is None or (isinstance(cache_dir, str) and cache_dir.strip() != ""),
            "cache_dir",
            cache_dir,
            "a folder for the decoded images, or null for <root>/.lit_accel_cache",
        )
        self.save_hyperparameters()
        self.root = root
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.cache_dir = cache_dir
        self.decode_workers = min(8, os.cpu_count() or 1) if decode_workers is None else decode_workers
        self.skip_unreadable = skip_unreadable
        self.layout: FolderLayout | None = None
        # Decoded in prepare_data, kept for setup in the same process (rank 0 reads each cache once).
        self._decoded: dict[str, DecodedImages] = {}

    def cache_path(self, split: str) -> str:
        """The cache file of a split folder: ``<cache_dir>/<split>.pt`` (``all.pt`` for class
        folders directly under ``root``)."""
        folder = self.cache_dir if self.cache_dir is not None else os.path.join(self.root, CACHE_FOLDER)
        return os.path.join(folder, f"{split}.pt")

    @override
    def prepare_data(self) -> None:
        """Decode every split folder into its cache (Lightning calls this on local rank 0 only)."""
        if self.predicting_a_folder():
            return
        layout = find_layout(self.root)
        for split in layout.folders:
            self._decoded[split] = self._decode(layout, split)

    def _decode(self, layout: FolderLayout, split: str) -> DecodedImages:
        if split in self._decoded:
            return self._decoded[split]
        folder = layout.folders[split]
        entries = image_entries(folder, layout.classes)
        name = "all" if layout.split_by_fraction else split
        empty = [c for c in layout.classes if not any(e.name.startswith(f"{c}/") for e in entries)]
        if empty:
            raise DataNotFoundError(
                f"the class folder {os.path.join(folder, empty[0])} holds no image files ("
                f"{', '.join(ext.lstrip('.') for ext in IMAGE_EXTENSIONS)}): put its images there, or remove the "
                "folder if it is no class."
            )
        return load_or_decode(
            folder,
            entries,
            layout.classes,
            self.image_size,
            self.cache_path(name),
            self.decode_workers,
            self.skip_unreadable,
            what=f"{os.path.abspath(folder)} ({name})",
        )

    @override
    def setup(self, stage: str) -> None:
        """Load the splits a stage needs from the caches (decoding what is missing); ``"predict"``
        with a ``predict_dir`` opens only that folder, at ``image_size``."""
        if stage == "predict" and self.predict_dir is not None:
            self.open_predict_folder()
            if self.layout is None:  # not read: the model's checkpoint names the classes it learnt
                self.classes = None
            return
        if self.layout is None:
            self.layout = find_layout(self.root)
            self.classes = self.layout.classes
        if "train" not in self._splits:
            self._load_splits(self.layout)
        if stage in ("test", "predict") and "test" not in self._splits:
            raise DataNotFoundError(
                f"no test images in {self.root}: add test/ (class folders like train/'s), or set "
                "--data.test_fraction above 0."
            )
        self._decoded.clear()  # the splits hold what is needed

    def _load_splits(self, layout: FolderLayout) -> None:
        train = self._decode(layout, "train")
        images, labels = train.images, train.labels
        drawn = [split for split in ("val", "test") if split not in layout.folders]  # taken from train
        counts = {split: self._held_out(split, images.shape[0]) for split in drawn}
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(self.seed))
        start = 0
        for split in drawn:
            index = order[start : start + counts[split]]
            start += counts[split]
            if counts[split] > 0 or split == "val":  # val_fraction 0: an empty split, no validation
                self._splits[split] = (images[index], labels[index])
        rest = order[start:]
        if rest.numel() == 0:
            raise DataNotFoundError(f"no training images are left in {self.root} after the validation and test draws.")
        self._splits["train"] = (images, labels) if start == 0 else (images[rest], labels[rest])
        for split in ("val", "test"):
            if split in layout.folders:
                decoded = self._decode(layout, split)
                self._splits[split] = (decoded.images, decoded.labels)
        sizes = ", ".join(f"{name} {self._splits[name][0].shape[0]}" for name in SPLIT_FOLDERS if name in self._splits)
        rank_zero_info(f"{self.root}: {len(layout.classes)} classes, {sizes} images at {self.image_size} px")

    def _held_out(self, split: str, total: int) -> int:
        fraction = self.val_fraction if split == "val" else self.test_fraction
        return 0 if fraction == 0 else max(1, round(fraction * total))
