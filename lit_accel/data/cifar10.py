"""CIFAR-10 as a LightningDataModule, with a fast preloaded pipeline and a classic DataLoader one."""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any, Literal

import torch
from torch import Tensor
from typing_extensions import override

from lit_accel.data.preloaded import PreloadedImageDataModule, check_argument
from lit_accel.data.synthetic import make_synthetic_cifar
from lit_accel.errors import DataNotFoundError

__all__ = ["CIFAR10DataModule", "CIFAR10_CLASSES", "read_cifar_folder"]

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR10_TRAIN_SIZE = 50_000


class CIFAR10DataModule(PreloadedImageDataModule):
    """CIFAR-10 (or a synthetic stand-in) for training, validation, testing and prediction.

    Data: the 50,000 official training images are split once into training and validation sets by a
    seeded permutation (the same on every rank); the test set is the official 10,000. The files are
    fetched and checksummed by torchvision into ``data_dir``. Batches are
    ``(images, labels)``; after the transfer to the device, images are float32, normalized with
    CIFAR-10's channel mean and std.

    Pipelines (``pipeline``):

    * ``"preload"`` (default): each split is held once as a uint8 tensor; a batch is one tensor
      gather (no per-sample ``__getitem__``, no PIL), moved to the device as uint8, and then
      normalized and augmented *per sample* as a whole batch on the training device
      (:meth:`on_after_batch_transfer`). Runs in the main process (no workers needed). Under
      DDP/FSDP Lightning's ``DistributedSampler`` gives each rank a disjoint shard, reshuffled every
      epoch from the seed.
    * ``"dataloader"``: per-sample torchvision ``transforms.v2`` in DataLoader worker processes
      (``num_workers``, ``pin_memory``, ``persistent_workers``, ``prefetch_factor``). Each
      training sample's random draws are seeded by (the run's seed, epoch, index): the same
      augmentations with any number of workers, and a run resumed mid-epoch continues exactly.

    Residency of the preloaded splits (``residency``):

    * ``"host"`` (default): in host memory; each batch is gathered there and copied to the device.
    * ``"device"``: each split (training, validation, test) is copied once, as uint8, to the
      training device when its loader is first built (CIFAR-10: 150 MB); batches are cut there by
      an index tensor (:class:`~lit_accel.data.datasets.DeviceBatchLoader`), so a step makes no
      host-to-device copy and no host sync. The order is the host pipeline's, batch for batch: one
      seeded permutation per epoch and, under DDP/FSDP, this rank's shard of it with
      ``DistributedSampler``'s semantics (disjoint shards, reshuffled every epoch). Each rank holds
      the whole split, not only its shard: the per-epoch reshuffle across ranks needs every image
      (150 MB per GPU for CIFAR-10). ``Trainer(use_distributed_sampler=False)`` and
      ``overfit_batches`` act as on the host pipeline (every rank the whole order; a fixed order).
      Resumes mid-epoch like the host pipeline. On a CPU the device is host memory: nothing
      changes but the code path. Prediction keeps the host path.

    With augmentation off both pipelines yield the same normalized tensors; with it on, both draw
    from the same distributions (the same crop, flip and cutout rules; cutout centres the square
    anywhere, so it may be clipped at the border, as in DeVries & Taylor).

    The images are 32×32: ``image_size`` is 32 (the network's input size; setting it before
    ``setup("predict")`` reads ``predict_dir`` images at another size).

    Changing the batch size: ``batch_size`` is a public attribute read each time
    :meth:`train_dataloader` is called. A new value takes effect when Lightning rebuilds the
    training DataLoader: at the next epoch with ``Trainer(reload_dataloaders_every_n_epochs=1)``,
    or when a callback (lit_accel's ``DynamicBatchLR``) asks for a reload.

    Args:
        data_dir: where CIFAR-10 is found or downloaded to (``cifar-10-batches-py/`` inside it).
        batch_size: training images per batch on each device.
        eval_batch_size: images per batch for validation, test and predict (default: ``batch_size``).
        val_size: training images held out for validation (0 turns validation off).
        pipeline: ``"preload"`` or ``"dataloader"``.
        residency: where the preload pipeline holds the splits: ``"host"`` or ``"device"``.
        synthetic: use the seeded synthetic data set instead of CIFAR-10 (offline use).
        synthetic_size: with ``synthetic``, images in the training set before the validation split.
        synthetic_test_size: with ``synthetic``, images in the test set.
        augment: master switch for training augmentation.
        random_crop: pad by ``crop_padding`` pixels and crop back to 32×32 at a random offset.
        crop_padding: the padding of ``random_crop``, in pixels.
        horizontal_flip: mirror half of the images.
        cutout: side of the square cut out of each training image, in pixels (0: off).
        download: try to download CIFAR-10 when it is not in ``data_dir``.
        verify_checksums: check the files against the official CIFAR-10 checksums (torchvision),
            which also makes torchvision's unrestricted unpickling of them safe. ``false`` trains
            on your own images in CIFAR-10's on-disk format (``cifar-10-batches-py/``: five
            training batches, ``test_batch``, ``batches.meta``): the files are then read by a
            restricted unpickler that admits lists, dicts, strings, numbers and numpy arrays and
            refuses everything else, so a crafted file cannot run code.
        seed: seeds the validation split and the synthetic data. The training order follows the
            run's seed (``seed_everything``), on one device as under DDP.
        num_workers: DataLoader worker processes (``"dataloader"`` pipeline only).
        pin_memory: page-locked host memory for faster copies to a GPU.
        persistent_workers: keep workers alive between epochs (``"dataloader"`` only).
        prefetch_factor: batches each worker loads ahead (``"dataloader"`` only).
        drop_last: drop the last, smaller training batch of each epoch.
        predict_dir: a folder of image files (PNG, JPEG, …, any size; subfolders included) to
            predict on instead of the test split. Each image is scaled so its shorter side is 32
            pixels and center-cropped to 32×32 (:mod:`lit_accel.data.image_folder`); files that are
            not readable images are logged by name and skipped. Predict batches are then
            ``(images, file names)``, decoded in ``num_workers`` worker processes.

    Raises:
        ValueError: for an argument outside its allowed range.
        DataNotFoundError: if CIFAR-10 is missing and cannot be downloaded, or ``predict_dir`` is
            not a folder or holds no files.

    Example::

        data:
          batch_size: 256
          pipeline: preload
          synthetic: false
    """

    def __init__(
        self,
        data_dir: str = "data/",
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        val_size: int = 5000,
        pipeline: Literal["preload", "dataloader"] = "preload",
        residency: Literal["host", "device"] = "host",
        synthetic: bool = False,
        synthetic_size: int = 50_000,
        synthetic_test_size: int = 10_000,
        augment: bool = True,
        random_crop: bool = True,
        crop_padding: int = 4,
        horizontal_flip: bool = True,
        cutout: int = 0,
        download: bool = True,
        verify_checksums: bool = True,
        seed: int = 0,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        prefetch_factor: int | None = 2,
        drop_last: bool = False,
        predict_dir: str | None = None,
    ) -> None:
        super().__init__(
            image_size=32,
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
        check_argument(val_size >= 0, "val_size", val_size, "0 or more images")
        check_argument(synthetic_size >= 1, "synthetic_size", synthetic_size, "a positive number of images")
        check_argument(
            synthetic_test_size >= 1, "synthetic_test_size", synthetic_test_size, "a positive number of images"
        )
        if synthetic or verify_checksums:  # sizes known now; your own files' count is checked in setup
            train_pool = synthetic_size if synthetic else _CIFAR10_TRAIN_SIZE
            check_argument(
                val_size < train_pool,
                "val_size",
                val_size,
                f"fewer than the {train_pool} training images (leave some to train on)",
            )
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.val_size = val_size
        self.synthetic = synthetic
        self.synthetic_size = synthetic_size
        self.synthetic_test_size = synthetic_test_size
        self.download = download
        self.verify_checksums = verify_checksums
        # None: not known (a predict_dir of a model trained on your own data; the checkpoint names them)
        self.classes = CIFAR10_CLASSES

    # ----------------------------------------------------------------------------------- loading
    @override
    def prepare_data(self) -> None:
        """Download CIFAR-10 once per node (Lightning calls this on local rank 0 only).

        Predicting a ``predict_dir`` needs only those images: CIFAR-10 is then neither looked for
        nor downloaded.
        """
        if self.synthetic or not self.verify_checksums or self.predicting_a_folder():
            return
        # one archive holds both splits, and torchvision checks every file of both here
        self._load_cifar(train=True, download=self.download)

    @override
    def setup(self, stage: str) -> None:
        """Load the splits a stage needs; every rank builds the identical split. ``"predict"`` with a
        ``predict_dir`` opens only that folder."""
        if stage in ("fit", "validate") and "train" not in self._splits:
            images, labels = self._load_split(train=True)
            check_argument(
                self.val_size < images.shape[0],
                "val_size",
                self.val_size,
                f"fewer than the {images.shape[0]} training images found (leave some to train on)",
            )
            order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(self.seed))
            val_index, train_index = order[: self.val_size], order[self.val_size :]
            self._splits["train"] = (images[train_index], labels[train_index])
            self._splits["val"] = (images[val_index], labels[val_index])
        if stage == "predict" and self.predict_dir is not None:
            self.open_predict_folder()
            if not (self.synthetic or self.verify_checksums) and "train" not in self._splits:
                # Your own data, not read here: CIFAR-10's names would be a guess. The model's
                # checkpoint carries the names it was trained with (ImageClassifier.class_names).
                self.classes = None
        elif stage in ("test", "predict") and "test" not in self._splits:
            self._splits["test"] = self._load_split(train=False)

    def _load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        if self.synthetic:
            size = self.synthetic_size if train else self.synthetic_test_size
            return make_synthetic_cifar(size, seed=self.seed, split=0 if train else 1)
        if not self.verify_checksums:
            images, labels, classes = read_cifar_folder(self.data_dir, train=train)
            self.classes = classes
            return images, labels
        dataset = self._load_cifar(train=train, download=False)
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # NHWC → NCHW uint8
        labels = torch.as_tensor(dataset.targets, dtype=torch.long)
        self.classes = tuple(dataset.classes)
        return images, labels

    def _load_cifar(self, train: bool, download: bool) -> Any:
        from torchvision.datasets import CIFAR10

        try:
            return CIFAR10(self.data_dir, train=train, download=download)
        except Exception as err:  # urllib, socket, tarfile and torchvision's own RuntimeError
            raise DataNotFoundError(_missing_data_message(self.data_dir, download, err)) from err


def _missing_data_message(data_dir: str, download: bool, err: Exception) -> str:
    where = os.path.abspath(os.path.join(data_dir, "cifar-10-batches-py"))
    expected = [*_TRAIN_FILES, "test_batch", "batches.meta"]
    if all(os.path.isfile(os.path.join(where, name)) for name in expected):
        # torchvision found every file but not the official checksums (and a download, if it
        # tried one, did not help).
        return (
            f"The files in {where} are not the official CIFAR-10 (their checksums differ). If they are your own "
            f"images in CIFAR-10's format, add --data.verify_checksums false (they are then read by a restricted "
            f"loader that admits only data). If they should be CIFAR-10, delete the folder and run again to "
            f"download it afresh."
        )
    if os.path.isdir(where) and not isinstance(err, RuntimeError):
        # The files are there but do not parse: a partial extraction or a damaged download.
        return (
            f"CIFAR-10 in {where} could not be read ({type(err).__name__}: {err}): the files look "
            f"damaged. Delete that folder and run again to download it afresh, or put a fresh "
            f"cifar-10-python.tar.gz in {os.path.abspath(data_dir)}."
        )
    tried = "and the download failed (no network?)" if download else "and downloading is off (data.download: false)"
    return (
        f"CIFAR-10 not found in {where} {tried}: {type(err).__name__}: {err}.\n"
        f"Put cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/ folder) in "
        f"{os.path.abspath(data_dir)} and run again, or use the synthetic data set (offline) with "
        f"--data.synthetic true."
    )


_CIFAR_FOLDER = "cifar-10-batches-py"
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
# What CIFAR-10's pickles (Python 2 cPickle, or protocol 2 from Python 3) need besides plain
# containers: numpy arrays and dtypes, and bytes as Python 3 writes them in protocol 2. Protocol 5
# (pickle.HIGHEST_PROTOCOL) stores an array's bytes for _frombuffer, which cannot make an object
# array ("cannot create an OBJECT array from memory buffer"): it builds data only.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles containers, strings, numbers and numpy arrays; any other global is refused."""

    @override
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: CIFAR-format files hold only data")
        return super().find_class(module, name)


def _read_pickle(path: str) -> Any:
    with open(path, "rb") as f:
        return _DataOnlyUnpickler(f, encoding="latin1").load()


def read_cifar_folder(data_dir: str, train: bool) -> tuple[Tensor, Tensor, tuple[str, ...]]:
    """Read one split of a folder in CIFAR-10's on-disk format, without checksums but safely.

    The layout torchvision reads: ``data_dir/cifar-10-batches-py/`` with ``data_batch_1`` …
    ``data_batch_5`` (training), ``test_batch`` and ``batches.meta``, each a pickled dict whose
    ``data`` is a uint8 numpy array ``(N, 3072)`` (red, green, blue planes, row by row),
    ``labels`` a list of ints in ``0 … len(label_names) - 1``, and ``label_names`` (in the meta
    file) the class names.

    Returns:
        uint8 images ``(N, 3, 32, 32)``, int64 labels ``(N,)`` and the class names.

    Raises:
        DataNotFoundError: if a file is missing, or is not such a pickle (a file that asks for
            anything but data is refused before it can run code).
    """
    import numpy as np

    folder = os.path.join(data_dir, _CIFAR_FOLDER)
    names = [*_TRAIN_FILES] if train else ["test_batch"]
    parts, labels = [], []
    reading = "batches.meta"  # named in the message when it cannot be read
    try:
        meta = _read_pickle(os.path.join(folder, reading))
        classes = tuple(str(c) for c in meta["label_names"])
        for name in names:
            reading = name
            entry = _read_pickle(os.path.join(folder, name))
            data = entry["data"]
            # exactly a uint8 (N, 3072) array: an object array could nest lists without end
            if type(data) is not np.ndarray or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise ValueError(f"{name}: 'data' must be a uint8 array of shape (N, 3072)")
            batch_labels = entry["labels"]
            if not isinstance(batch_labels, list) or not all(type(label) is int for label in batch_labels):
                raise ValueError(f"{name}: 'labels' must be a list of ints")
            if len(batch_labels) != len(data):
                raise ValueError(f"{name} has {len(batch_labels)} labels for {len(data)} images")
            outside = [label for label in batch_labels if not 0 <= label < len(classes)]
            if outside:
                raise ValueError(
                    f"{name} has label {outside[0]}, outside 0..{len(classes) - 1} "
                    f"(batches.meta names {len(classes)} classes)"
                )
            parts.append(data.reshape(-1, 3, 32, 32))
            labels += batch_labels
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
        raise DataNotFoundError(
            f"{os.path.abspath(folder)} is not a readable folder in CIFAR-10's format: {reading}: "
            f"{type(err).__name__}: {err}. "
            f"It needs {', '.join(_TRAIN_FILES)}, test_batch and batches.meta, each a pickled dict of "
            f"'data' (a uint8 numpy array, N x 3072) and 'labels' (a list of ints in 0..classes-1), and "
            f"'label_names' in batches.meta."
        ) from None
    images = torch.from_numpy(np.concatenate(parts)).contiguous()
    return images, torch.as_tensor(labels, dtype=torch.long), classes
