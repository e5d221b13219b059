"""Map-style datasets over in-memory uint8 image tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from typing_extensions import override

__all__ = [
    "DeviceBatchLoader",
    "EpochPosition",
    "EpochSeededRandomSampler",
    "ResumableDataLoader",
    "TensorBatchDataset",
    "TransformedTensorDataset",
    "pass_batch_through",
    "sample_seed",
]


class TensorBatchDataset(Dataset):
    """Images and labels held as tensors; the DataLoader fetches a whole batch with one index.

    ``DataLoader`` calls ``__getitems__`` with the sampler's list of indices for a batch, so a batch
    is a single tensor gather instead of ``batch_size`` ``__getitem__`` calls and a collation (about
    7–10 % of SeedCNN's training time on 2 CPU cores). Use it with
    ``collate_fn=pass_batch_through``. Samplers, including the ``DistributedSampler`` that Lightning
    injects, work unchanged.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in length")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    @override
    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.images[index], self.labels[index]


def pass_batch_through(batch: Any) -> Any:
    """A ``collate_fn`` for datasets whose ``__getitems__`` already returns a batch."""
    return batch


class TransformedTensorDataset(Dataset):
    """uint8 ``(N, 3, H, W)`` images with a per-sample torchvision transform (the classic pipeline).

    With a ``seed``, the random draws of sample ``i``'s transform in epoch ``e`` come from a
    generator seeded with ``(seed, e, i)``, whatever process fetches it and whatever it fetched
    before: the same augmentations with any number of workers, and a resumed epoch gets those of
    the uninterrupted run (its skipped batches and worker seeds change nothing). The epoch is
    shared memory, so workers see :meth:`set_epoch` (:class:`ResumableDataLoader` calls it).

    Args:
        images: the split's images.
        labels: its labels.
        transform: applied to each ``(3, H, W)`` image, or None.
        seed: seeds each sample's draws as above; None: the transform draws from the process's
            global RNG.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        transform: Callable[[Tensor], Tensor] | None = None,
        seed: int | None = None,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in length")
        self.images = images
        self.labels = labels
        self.transform = transform
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return self.images.shape[0]

    @override
    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        """A batch's samples (the DataLoader's batched fetch), for its default ``collate_fn``."""
        if self.transform is None or self.seed is None:
            return [self._item(index) for index in indices]
        epoch = int(self._epoch)
        # The transforms draw from the global RNG: a forked one, seeded per sample, leaves the
        # process's own stream (dropout, the next batch) untouched. One fork per batch: forking
        # costs about as much as a transform's draws (python -m tools.bench sample_seed).
        with torch.random.fork_rng(devices=[]):
            return [self._item(index, sample_seed(self.seed, epoch, int(index))) for index in indices]

    def _item(self, index: int, seed: int | None = None) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            if seed is not None:
                # The CPU generator alone: torch.manual_seed also seeds every accelerator, 100x slower.
                torch.default_generator.manual_seed(seed)
            image = self.transform(image)
        return image, int(self.labels[index])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One 63-bit seed per ``(seed, epoch, index)``, apart for any two of them (a bijective mix)."""
    value = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (1 << 64)
    value = ((value ^ (value >> 31)) * 0xD6E8FEB86659FD93) % (1 << 64)  # splitmix64's finaliser
    return (value ^ (value >> 32)) >> 1


class EpochSeededRandomSampler(RandomSampler):
    """A new random order every epoch, fixed by ``(seed, epoch)``: DistributedSampler's semantics
    on one process.

    Lightning calls :meth:`set_epoch` at the start of each epoch, so epoch ``e`` has the same order
    in a run and in a run resumed from a checkpoint. Under DDP Lightning replaces this sampler with
    a ``DistributedSampler`` (it is a ``RandomSampler``, so Lightning knows to shuffle).
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @override
    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


@dataclass
class EpochPosition:
    """Training batches done in the current epoch, shared by a data module and its loader.

    The data module counts a batch when it reaches the device (``on_after_batch_transfer``), that
    is when the training step uses it; a count kept by the loader would include the batch that
    Lightning prefetches.
    """

    done: int = 0
    epoch_finished: bool = False
    skip: int = 0


class ResumableDataLoader(DataLoader):
    """A DataLoader that continues an interrupted epoch where a checkpoint left it.

    Lightning saves ``state_dict()`` in every checkpoint and calls ``load_state_dict()`` when a
    run resumes; the next iteration then skips the batches the interrupted run had already trained
    on, so no sample is seen twice or missed (the order is reproducible: see
    :class:`EpochSeededRandomSampler`; under DDP, ``DistributedSampler`` with ``set_epoch``).
    Skipped batches are fetched and dropped, which is cheap for in-memory data.

    Args:
        *args: as for ``DataLoader``.
        position: the shared :class:`EpochPosition` its data module updates.
        **kwargs: as for ``DataLoader``.
    """

    def __init__(self, *args: Any, position: EpochPosition, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = position

    # A generator around DataLoader's iterator, not the _BaseDataLoaderIter torch's stub promises.
    @override
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # see the line above
        skip, self.position.skip = self.position.skip, 0
        skip = skip if 0 < skip < len(self) else 0
        self.position.done, self.position.epoch_finished = skip, False
        return self._skip_then_yield(skip)

    def _skip_then_yield(self, skip: int) -> Iterator[Any]:
        # Lazily, DataLoader's own iterator included: a resumed run's Lightning calls iter() before
        # the sampler's set_epoch, and workers would prefetch from the previous epoch's order.
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(int(getattr(self.sampler, "epoch", 0)))
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator)
        yield from iterator

    def state_dict(self) -> dict[str, int]:
        done = 0 if self.position.epoch_finished else self.position.done
        return {"batches_done": done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        done = int(state_dict.get("batches_done", 0))
        self.position.skip = done if 0 < done < len(self) else 0


class DeviceBatchLoader:
    """Batches cut from tensors held on the training device: no copy and no host sync per batch.

    The split is copied to the device once (by the caller); every epoch the sampler's order is
    turned into one index tensor, copied to the device once, and each batch is two ``index_select``
    calls on the device. With the samplers the DataLoader pipeline gets (:class:`EpochSeededRandomSampler`
    on one process, ``DistributedSampler`` under DDP/FSDP, built here because Lightning injects
    samplers only into ``DataLoader`` objects), the batches are exactly those of the host-resident
    pipeline, in the same order. Lightning calls ``sampler.set_epoch`` at each epoch (it looks for
    a ``sampler`` attribute on any loader) and saves ``state_dict`` in checkpoints; a resumed epoch
    skips the batches already trained on by starting at their offset (nothing is fetched).

    Args:
        images: the split's images, already on the device (uint8 ``(N, C, H, W)``).
        labels: its labels, on the same device.
        batch_size: images per batch.
        sampler: gives each epoch's indices into the split (an order, or this rank's shard of one).
        drop_last: leave out the last batch when it is smaller than ``batch_size``.
        position: the :class:`EpochPosition` its data module counts trained batches in (training
            loaders); ``None`` for evaluation loaders.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        sampler: Sampler[int],
        drop_last: bool = False,
        position: EpochPosition | None = None,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in length")
        if images.device != labels.device:
            raise ValueError(f"images ({images.device}) and labels ({labels.device}) are on different devices")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is not allowed: use a positive number of images")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.sampler = sampler
        # What Lightning reads off a loader with a sampler (whether it shuffles), as from a
        # DataLoader built with sampler= and batch_size=... minus the batch sampler it never uses.
        self.batch_sampler = None
        self.drop_last = drop_last
        self.position = position

    def __len__(self) -> int:
        samples = len(self.sampler)  # type: ignore[arg-type]  # every sampler used here is Sized
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # Everything happens at the first batch: Lightning calls iter() once on a loader that is not
        # a DataLoader only to check that it is iterable, and creates the real iterator before it
        # calls set_epoch.
        skip = 0
        if self.position is not None:
            skip, self.position.skip = self.position.skip, 0
            skip = skip if 0 < skip < len(self) else 0
            self.position.done, self.position.epoch_finished = skip, False
        order = torch.as_tensor(list(self.sampler), dtype=torch.long).to(self.images.device, non_blocking=True)
        for batch in range(skip, len(self)):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield self.images.index_select(0, index), self.labels.index_select(0, index)

    def state_dict(self) -> dict[str, int]:
        position = self.position
        done = 0 if position is None or position.epoch_finished else position.done
        return {"batches_done": done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if self.position is not None:
            done = int(state_dict.get("batches_done", 0))
            self.position.skip = done if 0 < done < len(self) else 0
