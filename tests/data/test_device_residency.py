"""``residency: device``: the preloaded splits held on the training device (here the CPU, the same code
path a GPU takes), with the host pipeline's batches, resume position and DDP shards."""

import json
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DistributedSampler

from helpers import quiet_cpu_trainer
from lit_accel.data import CIFAR10DataModule
from lit_accel.data.datasets import DeviceBatchLoader, EpochSeededRandomSampler, TensorBatchDataset
from lit_accel.models import BatchNormCNN, ImageClassifier


def _datamodule(residency: str, **kwargs) -> CIFAR10DataModule:
    settings = {"synthetic": True, "synthetic_size": 300, "val_size": 60, "batch_size": 32, "residency": residency}
    return CIFAR10DataModule(**{**settings, **kwargs})


def _epoch(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch) if hasattr(loader.sampler, "set_epoch") else None
    return list(loader)


@pytest.mark.parametrize("split", ["train", "val"])
def test_device_residency_yields_the_host_pipelines_batches(split):
    """Batch for batch, epoch after epoch, the same uint8 images and labels as the host pipeline."""
    loaders = {}
    for residency in ("host", "device"):
        dm = _datamodule(residency, drop_last=split == "train")
        dm.setup("fit")
        loaders[residency] = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    assert isinstance(loaders["device"], DeviceBatchLoader) and not isinstance(loaders["host"], DeviceBatchLoader)
    assert len(loaders["device"]) == len(loaders["host"])
    epochs = (0, 1) if split == "train" else (0,)
    for epoch in epochs:
        host, device = _epoch(loaders["host"], epoch), _epoch(loaders["device"], epoch)
        assert len(host) == len(device) == len(loaders["host"])
        for (host_images, host_labels), (device_images, device_labels) in zip(host, device):
            assert device_images.dtype == torch.uint8
            assert torch.equal(host_images, device_images) and torch.equal(host_labels, device_labels)
    if split == "train":
        assert not torch.equal(_epoch(loaders["device"], 0)[0][1], _epoch(loaders["device"], 1)[0][1])


class _CountedCopies(torch.Tensor):
    """A tensor that counts its ``.to()`` calls (on a CPU, ``.to("cpu")`` returns the same tensor)."""

    copies = 0

    def to(self, *args, **kwargs):
        _CountedCopies.copies += 1
        return super().to(*args, **kwargs)


def test_the_split_is_copied_to_the_device_once_and_dropped_at_teardown():
    dm = _datamodule("device")
    dm.setup("fit")
    images, labels = dm._splits["train"]
    dm._splits["train"] = (images.as_subclass(_CountedCopies), labels)
    _CountedCopies.copies = 0
    first, again = dm.train_dataloader(), dm.train_dataloader()
    assert _CountedCopies.copies == 1, "a reloaded loader (a new batch size) reuses the device copy"
    assert first.images is again.images
    dm.teardown("fit")
    assert dm._device_splits == {}
    dm.train_dataloader()
    assert _CountedCopies.copies == 2, "after teardown a new stage copies the split again"


def test_a_resumed_epoch_starts_at_the_saved_batch_without_fetching_the_others():
    loaders = {}
    for residency in ("host", "device"):
        dm = _datamodule(residency)
        dm.setup("fit")
        loaders[residency] = dm.train_dataloader()
        loaders[residency].load_state_dict({"batches_done": 3})
    host, device = list(loaders["host"]), list(loaders["device"])
    assert len(device) == len(loaders["device"]) - 3
    for (host_images, _), (device_images, _) in zip(host, device):
        assert torch.equal(host_images, device_images)
    unstarted = loaders["device"]
    unstarted.load_state_dict({"batches_done": 2})
    iter(unstarted)  # Lightning's iterability check on a loader that is not a DataLoader
    assert len(list(unstarted)) == len(unstarted) - 2, "an iterator never started does not use up the position"


def test_a_fit_trains_exactly_as_with_the_host_pipeline(tmp_path):
    """Same batches, same augmentation draws (torch's generator on the device), same weights."""

    def fit(residency: str) -> dict[str, torch.Tensor]:
        L.seed_everything(0)
        model = ImageClassifier(BatchNormCNN(width=4), optimizer=partial(torch.optim.SGD, lr=0.05))
        data = _datamodule(residency, random_crop=True, cutout=8)
        quiet_cpu_trainer(tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=1).fit(model, data)
        return model.state_dict()

    reference = fit("host")
    trained = fit("device")
    for name, value in reference.items():
        assert torch.equal(trained[name], value), name


class _RecordingData(CIFAR10DataModule):
    """Images whose first two pixels spell their index in the data set; the indices of every batch
    are recorded per stage and epoch ("train 0", "val 0", ...)."""

    def __init__(self, folder, **kwargs) -> None:
        super().__init__(**kwargs)
        self.folder = folder
        self.seen: dict[str, list[int]] = {}

    def _load_split(self, train: bool):
        images, labels = super()._load_split(train)
        index = torch.arange(images.shape[0])
        images[:, 0, 0, 0], images[:, 0, 0, 1] = (index % 256).to(torch.uint8), (index // 256).to(torch.uint8)
        return images, labels

    def on_after_batch_transfer(self, batch, dataloader_idx):
        trainer = self.trainer
        if not trainer.sanity_checking:
            ids = _ids(batch[0])
            stage = "train" if trainer.training else "val"
            self.seen.setdefault(f"{stage} {trainer.current_epoch}", []).extend(ids)
        return super().on_after_batch_transfer(batch, dataloader_idx)


def _ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()


class _DumpSeen(Callback):
    def on_train_end(self, trainer, pl_module):
        data = trainer.datamodule
        loader = type(trainer.train_dataloader).__name__
        (data.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps({"seen": data.seen, "loader": loader}))


@pytest.mark.slow
@pytest.mark.parametrize("distributed_sampler", [True, False])
def test_each_ddp_rank_gets_what_the_host_pipeline_would_give_it(tmp_path, distributed_sampler):
    """Two ddp_fork processes, 203 training images in batches of 25 with drop_last, 64 validation
    images. With Lightning's distributed sampler (the default): each rank trains on
    DistributedSampler's shard of the epoch's order (padded to 102 each, 4 whole batches), disjoint
    and reshuffled every epoch, and validates on its sequential shard. With
    ``use_distributed_sampler=False``: as on the host pipeline, every rank the whole order."""
    torch.set_num_threads(1)
    settings = {
        "synthetic": True,
        "synthetic_size": 267,
        "val_size": 64,
        "batch_size": 25,
        "augment": False,
        "drop_last": True,
    }
    data = _RecordingData(tmp_path, residency="device", **settings)
    model = ImageClassifier(BatchNormCNN(width=4), optimizer=partial(torch.optim.SGD, lr=0.05))
    L.seed_everything(7)
    trainer = quiet_cpu_trainer(
        tmp_path,
        [_DumpSeen()],
        max_epochs=2,
        num_sanity_val_steps=0,
        strategy="ddp_fork",
        devices=2,
        use_distributed_sampler=distributed_sampler,
    )
    trainer.fit(model, data)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text())["seen"] for rank in (0, 1)]

    host = _RecordingData(tmp_path, residency="host", **settings)
    host.setup("fit")
    train_ids, val_ids = _ids(host._splits["train"][0]), _ids(host._splits["val"][0])
    for epoch in (0, 1):
        for rank in (0, 1):
            if distributed_sampler:
                order = DistributedSampler(TensorBatchDataset(*host._splits["train"]), 2, rank, shuffle=True, seed=7)
                order.set_epoch(epoch)
                val = DistributedSampler(TensorBatchDataset(*host._splits["val"]), 2, rank, shuffle=False)
            else:
                order = EpochSeededRandomSampler(host._splits["train"][0], seed=7)
                order.set_epoch(epoch)
                val = range(64)
            expected = [train_ids[i] for i in order]
            expected = expected[: len(expected) // 25 * 25]  # drop_last
            assert ranks[rank][f"train {epoch}"] == expected, f"rank {rank}, epoch {epoch}"
            assert ranks[rank][f"val {epoch}"] == [val_ids[i] for i in val], f"rank {rank}, epoch {epoch}"
    per_rank = [set(ranks[rank]["train 0"]) for rank in (0, 1)]
    if distributed_sampler:
        assert len(ranks[0]["train 0"]) == 100 and not per_rank[0] & per_rank[1]
    else:
        assert len(ranks[0]["train 0"]) == 200 and per_rank[0] == per_rank[1]
    assert ranks[0]["train 0"] != ranks[0]["train 1"], "a new epoch reshuffles"


def test_overfit_batches_takes_the_same_fixed_batches_as_the_host_pipeline(tmp_path):
    seen = {}
    for residency in ("host", "device"):
        data = _RecordingData(tmp_path, residency=residency, synthetic=True, synthetic_size=300, val_size=60)
        model = ImageClassifier(BatchNormCNN(width=4), optimizer=partial(torch.optim.SGD, lr=0.05))
        quiet_cpu_trainer(tmp_path, max_epochs=2, overfit_batches=2, num_sanity_val_steps=0).fit(model, data)
        seen[residency] = data.seen
    assert seen["device"] == seen["host"]
    assert seen["device"]["train 0"] == seen["device"]["train 1"], "the same batches every epoch"
