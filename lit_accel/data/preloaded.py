"""The input pipelines every lit_accel data module shares: uint8 splits held in memory, served by the
preload pipeline (host or device residency, per-sample augmentation on the device) or by the
DataLoader pipeline, resumable mid-epoch, and a folder of image files to predict on."""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler
from typing_extensions import override

from lit_accel.data.augment import CIFAR10_MEAN, CIFAR10_STD, cutout, normalize, random_crop, random_flip
from lit_accel.data.datasets import (
    DeviceBatchLoader,
    EpochPosition,
    EpochSeededRandomSampler,
    ResumableDataLoader,
    TensorBatchDataset,
    TransformedTensorDataset,
    pass_batch_through,
)
from lit_accel.data.image_folder import ImageFolderDataset
from lit_accel.errors import ConfigurationError, DataNotFoundError

__all__ = ["PreloadedImageDataModule", "check_argument", "open_image_folder", "run_seed"]


class PreloadedImageDataModule(LightningDataModule):
    """Base of lit_accel's data modules: subclasses load uint8 splits, this class serves them.

    A subclass's :meth:`setup` puts each split it loads in ``self._splits[name]`` as
    ``(images uint8 (N, 3, S, S), labels int64 (N,))`` for ``"train"``, ``"val"`` and ``"test"``,
    sets ``self.classes`` and calls :meth:`open_predict_folder` for ``setup("predict")`` with a
    ``predict_dir``. Everything else is here: the two pipelines, the residency of the splits, the
    device-side normalization and augmentation, the training position saved in checkpoints (exact
    mid-epoch resume) and the prediction folder. See :class:`~lit_accel.data.CIFAR10DataModule` for
    what each pipeline and residency does; the arguments below mean the same in every subclass.

    Args:
        image_size: side of the square images, in pixels (the splits' ``S``; predict_dir images are
            read at this size, also when it is set after construction, before ``setup("predict")``).
        batch_size: training images per batch on each device.
        eval_batch_size: images per batch for validation, test and predict (default: ``batch_size``).
        pipeline: ``"preload"`` or ``"dataloader"``.
        residency: where the preload pipeline holds the splits: ``"host"`` or ``"device"``.
        augment: master switch for training augmentation.
        random_crop: pad by ``crop_padding`` pixels and crop back to ``image_size`` at a random offset.
        crop_padding: the padding of ``random_crop``, in pixels.
        horizontal_flip: mirror half of the images.
        cutout: side of the square cut out of each training image, in pixels (0: off).
        seed: seeds the data set's own splits.
        num_workers: DataLoader worker processes (``"dataloader"`` pipeline, and predict_dir decoding).
        pin_memory: page-locked host memory for faster copies to a GPU.
        persistent_workers: keep workers alive between epochs (``"dataloader"`` only).
        prefetch_factor: batches each worker loads ahead (``"dataloader"`` only).
        drop_last: drop the last, smaller training batch of each epoch.
        predict_dir: a folder of image files to predict on instead of the test split.

    Raises:
        ValueError: for an argument outside its allowed range.
    """

    def __init__(
        self,
        image_size: int = 32,
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
        super().__init__()
        check_argument(
            isinstance(image_size, int) and image_size >= 8, "image_size", image_size, "a side of 8 pixels or more"
        )
        check_argument(batch_size >= 1, "batch_size", batch_size, "a positive number of images")
        check_argument(
            eval_batch_size is None or eval_batch_size >= 1,
            "eval_batch_size",
            eval_batch_size,
            "a positive number or null",
        )
        check_argument(pipeline in ("preload", "dataloader"), "pipeline", pipeline, "'preload' or 'dataloader'")
        check_argument(residency in ("host", "device"), "residency", residency, "'host' or 'device'")
        check_argument(
            residency == "host" or pipeline == "preload",
            "residency",
            residency,
            "'host' with pipeline 'dataloader' (its workers transform images on the host), or pipeline 'preload'",
        )
        check_argument(0 <= crop_padding <= 16, "crop_padding", crop_padding, "0 to 16 pixels")
        check_argument(0 <= cutout <= image_size, "cutout", cutout, f"0 (off) to {image_size} pixels")
        check_argument(num_workers >= 0, "num_workers", num_workers, "0 or more")
        check_argument(
            prefetch_factor is None or prefetch_factor >= 1,
            "prefetch_factor",
            prefetch_factor,
            "a positive number or null",
        )
        check_argument(
            predict_dir is None or (isinstance(predict_dir, str) and predict_dir.strip() != ""),
            "predict_dir",
            predict_dir,
            "a folder of image files, or null to predict on the test split",
        )
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.pipeline = pipeline
        self.residency = residency
        self.augment = augment
        self.random_crop = random_crop
        self.crop_padding = crop_padding
        self.horizontal_flip = horizontal_flip
        self.cutout = cutout
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self.drop_last = drop_last
        self.predict_dir = predict_dir
        self._predict_folder: ImageFolderDataset | None = None
        # None: not known (e.g. a predict_dir of a model trained on other data; the checkpoint names them)
        self.classes: tuple[str, ...] | None = None
        self._splits: dict[str, tuple[Tensor, Tensor]] = {}
        # residency "device": the splits' copies on the training device, by split name
        self._device_splits: dict[str, tuple[Tensor, Tensor]] = {}
        self._train_position = EpochPosition()

    def open_predict_folder(self) -> None:
        """Open ``predict_dir`` for ``setup("predict")``, its images read at ``image_size``.

        Raises:
            DataNotFoundError: if ``predict_dir`` is not a folder or holds no files.
        """
        if self.predict_dir is None:
            raise RuntimeError("no predict_dir to open")
        self._predict_folder = open_image_folder(self.predict_dir, self._image_folder_transform(), self.image_size)

    def predicting_a_folder(self) -> bool:
        """Whether this is a ``predict`` run on ``predict_dir`` (no split is needed then)."""
        trainer = self.trainer
        return self.predict_dir is not None and trainer is not None and trainer.state.fn == TrainerFn.PREDICTING

    # ------------------------------------------------------------------------------- dataloaders
    @override
    def train_dataloader(self) -> DataLoader | DeviceBatchLoader:
        """Shuffled by ``(seed, epoch)`` and resumable mid-epoch (see :class:`ResumableDataLoader`)."""
        return self._dataloader("train", self.batch_size, shuffle=True, drop_last=self.drop_last)

    @override
    def val_dataloader(self) -> DataLoader | DeviceBatchLoader:
        return self._dataloader("val", self.eval_batch_size or self.batch_size, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader | DeviceBatchLoader:
        return self._dataloader("test", self.eval_batch_size or self.batch_size, shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        if self.predict_dir is None:
            return self._dataloader("test", self.eval_batch_size or self.batch_size, shuffle=False, host=True)
        if self._predict_folder is None:
            raise RuntimeError("the predict folder is not opened: call setup('predict') first")
        workers = self.num_workers
        return DataLoader(
            self._predict_folder,
            batch_size=self.eval_batch_size or self.batch_size,
            shuffle=False,
            collate_fn=self._predict_folder.collate,
            num_workers=workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )

    def _image_folder_transform(self) -> Any:
        # Preload: uint8 to the device, normalized there by on_after_batch_transfer, like the splits.
        return None if self.pipeline == "preload" else self._per_sample_transform(train=False)

    def _dataloader(
        self, split: str, batch_size: int, shuffle: bool, drop_last: bool = False, host: bool = False
    ) -> Any:
        if split not in self._splits:
            raise RuntimeError(f"the {split!r} split is not loaded: call setup() for its stage first")
        if self.pipeline == "preload" and self.residency == "device" and not host:
            return self._device_loader(split, batch_size, shuffle, drop_last)
        images, labels = self._splits[split]
        if self.pipeline == "preload":
            dataset: TensorBatchDataset | TransformedTensorDataset = TensorBatchDataset(images, labels)
            options: dict[str, Any] = {"collate_fn": pass_batch_through}
        else:
            train = split == "train"
            # Per-sample seeds (seed_everything's): the same augmentations with any number of
            # workers, and in a resumed epoch (see TransformedTensorDataset).
            seed = run_seed() if train else None
            dataset = TransformedTensorDataset(images, labels, self._per_sample_transform(train=train), seed=seed)
            workers = self.num_workers
            options = {
                "num_workers": workers,
                "persistent_workers": self.persistent_workers and workers > 0,
                "prefetch_factor": self.prefetch_factor if workers > 0 else None,
            }
        # Own generators: creating an iterator then draws no number from torch's global RNG, so
        # validation passes and resumes leave the training randomness (augmentation, dropout)
        # exactly as in an uninterrupted run.
        options.update(batch_size=batch_size, drop_last=drop_last, pin_memory=self.pin_memory)
        options["generator"] = torch.Generator().manual_seed(self.seed)
        if not shuffle:
            return DataLoader(dataset, **options)
        # The run's seed (seed_everything), as Lightning's DistributedSampler uses under DDP.
        sampler = EpochSeededRandomSampler(dataset, seed=run_seed())
        return ResumableDataLoader(dataset, sampler=sampler, position=self._train_position, **options)

    def _device_loader(self, split: str, batch_size: int, shuffle: bool, drop_last: bool) -> DeviceBatchLoader:
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if split not in self._device_splits or self._device_splits[split][0].device != device:
            images, labels = self._splits[split]
            self._device_splits[split] = (images.to(device), labels.to(device))
        images, labels = self._device_splits[split]
        # The samplers the host pipeline ends up with. Lightning replaces samplers only in DataLoader
        # objects: with overfit_batches a sequential one, under DDP/FSDP (unless the Trainer's
        # use_distributed_sampler is off) a DistributedSampler; here the same choices, same arguments.
        seed = run_seed()
        shard = trainer.distributed_sampler_kwargs if trainer is not None else None
        if trainer is not None and not trainer._accelerator_connector.use_distributed_sampler:
            shard = None  # listed in lit_accel/lightning_compat.py
        if trainer is not None and getattr(trainer, "overfit_batches", 0) > 0:  # set by a connector, undeclared
            shuffle = False
        host_split = TensorBatchDataset(*self._splits[split])
        sampler: Sampler[int]
        if shard and int(shard.get("num_replicas", 1)) > 1:
            sampler = DistributedSampler(host_split, shuffle=shuffle, seed=seed, **shard)
        elif shuffle:
            sampler = EpochSeededRandomSampler(host_split, seed=seed)
        else:
            sampler = SequentialSampler(host_split)
        position = self._train_position if split == "train" else None
        return DeviceBatchLoader(images, labels, batch_size, sampler, drop_last=drop_last, position=position)

    @override
    def teardown(self, stage: str) -> None:
        """Drop this data module's device copies of the splits (residency ``"device"``) when a stage
        ends; the memory is freed once the Trainer's loaders, which hold them too, are gone."""
        self._device_splits.clear()

    def _per_sample_transform(self, train: bool) -> Any:
        from torchvision.transforms import v2

        steps: list[Any] = []
        if train and self.augment:
            if self.random_crop and self.crop_padding > 0:
                steps.append(v2.RandomCrop(self.image_size, padding=self.crop_padding))
            if self.horizontal_flip:
                steps.append(v2.RandomHorizontalFlip())
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        if train and self.augment and self.cutout > 0:
            steps.append(_CutoutOneImage(self.cutout))
        return v2.Compose(steps)

    # ------------------------------------------------------------------- device-side transforms
    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count training batches (for mid-epoch resume); preload pipeline: normalize and augment.

        The float images are then in the dtype of a ``*-true`` precision (``64-true``: float64,
        ``16-true``: float16), as Lightning's ``precision_plugin.convert_input`` makes every float
        input; Lightning calls that before the transfer, when the preloaded images are still uint8.
        """
        trainer = self.trainer
        training = trainer is not None and trainer.training
        if trainer is not None and training:
            self._count_training_batch(trainer)
        if self.pipeline != "preload":
            return batch
        images, labels = batch
        images = self.device_transform(images, train=training)
        if trainer is not None:
            images = trainer.precision_plugin.convert_input(images)
        return images, labels

    @override
    def state_dict(self) -> dict[str, Any]:
        """The training epoch's position (batches done), saved in every checkpoint.

        The training loader saves it too, but Lightning (2.6) drops a loader's saved state when
        ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``, as ImageClassifier
        does to size WarmupDecayLR (Lightning issue #20550): a run resumed mid-epoch would start the
        epoch's data over. The data module's state is restored before any loader is built.
        """
        position = self._train_position
        return {"batches_done": 0 if position.epoch_finished else position.done}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        trainer = self.trainer
        if trainer is None or trainer.state.fn == TrainerFn.FITTING:
            self._train_position.skip = int(state_dict.get("batches_done", 0))

    def _count_training_batch(self, trainer: Trainer) -> None:
        position = self._train_position
        position.done += 1
        limit = trainer.num_training_batches
        position.epoch_finished = position.done >= limit

    def device_transform(self, images: Tensor, train: bool) -> Tensor:
        """uint8 batch → normalized float32 batch, with per-sample augmentation when ``train``."""
        if train and self.augment:
            if self.random_crop:
                images = random_crop(images, self.crop_padding)
            if self.horizontal_flip:
                images = random_flip(images)
        images = normalize(images)
        if train and self.augment and self.cutout > 0:
            images = cutout(images, self.cutout)
        return images

    def split_dataset(self, split: str) -> Dataset:
        """The raw uint8 ``(images, labels)`` of a loaded split, e.g. for inspection."""
        return TensorBatchDataset(*self._splits[split])


def check_argument(ok: bool, name: str, value: object, allowed: str) -> None:
    """Raise a :class:`ConfigurationError` (a ``ValueError``) naming the argument, its value and what
    is allowed, unless ``ok``: the CLI prints it as one message."""
    if not ok:
        raise ConfigurationError(f"{name}={value!r} is not allowed: use {allowed}")


def open_image_folder(folder: str, transform: Any, image_size: int) -> ImageFolderDataset:
    """``data.predict_dir`` as a data set, or one clear message for a file, a missing or an empty folder."""
    if os.path.isfile(folder):
        raise DataNotFoundError(
            f"data.predict_dir={folder!r} is a file ({os.path.abspath(folder)}): pass the folder that holds the "
            f"images to classify, e.g. {os.path.dirname(os.path.abspath(folder))}."
        )
    if not os.path.isdir(folder):
        raise DataNotFoundError(
            f"data.predict_dir={folder!r}: no such folder ({os.path.abspath(folder)}). "
            f"Pass the folder that holds the image files to classify."
        )
    dataset = ImageFolderDataset(folder, transform=transform, image_size=image_size)
    if len(dataset) == 0:
        raise DataNotFoundError(
            f"data.predict_dir={folder!r}: the folder holds no files ({os.path.abspath(folder)}). "
            f"Put the PNG/JPEG images to classify there."
        )
    return dataset


def run_seed() -> int:
    """The run's seed (``seed_everything`` sets it), as Lightning's DistributedSampler takes it; 0 without one."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class _CutoutOneImage:
    """:func:`~lit_accel.data.augment.cutout` on one ``(C, H, W)`` image: the DataLoader pipeline
    cuts out what the preload pipeline does (torchvision's ``RandomErasing`` keeps the square inside
    the image, and erases nothing at all for a square as large as the image)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Tensor) -> Tensor:
        return cutout(image[None], self.size)[0]
