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
from lit_accel.data.datasets import DeviceBatchLoader, TensorBatchDataset
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


def test_the_split_is_copied_to_the_device_once_and_freed_at_teardown():
    dm = _datamodule("device")
    dm.setup("fit")
    first, again = dm.train_dataloader(), dm.train_dataloader()
    assert first.images is again.images, "a reloaded loader (a new batch size) reuses the device copy"
    dm.teardown("fit")
    assert dm._device_splits == {}


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
    """Training images whose first two pixels spell their index in the data set, recorded per rank."""

    def __init__(self, folder, **kwargs) -> None:
        super().__init__(**kwargs)
        self.folder = folder
        self.seen: dict[int, list[int]] = {}

    def _load_split(self, train: bool):
        images, labels = super()._load_split(train)
        index = torch.arange(images.shape[0])
        images[:, 0, 0, 0], images[:, 0, 0, 1] = (index % 256).to(torch.uint8), (index // 256).to(torch.uint8)
        return images, labels

    def on_after_batch_transfer(self, batch, dataloader_idx):
        trainer = self.trainer
        if trainer.training:
            images = batch[0]
            ids = (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()
            self.seen.setdefault(trainer.current_epoch, []).extend(ids)
        return super().on_after_batch_transfer(batch, dataloader_idx)


class _DumpSeen(Callback):
    def on_train_end(self, trainer, pl_module):
        data = trainer.datamodule
        loader = type(trainer.train_dataloader).__name__
        (data.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps({"seen": data.seen, "loader": loader}))


@pytest.mark.slow
def test_each_ddp_rank_trains_on_its_shard_of_the_device_resident_split(tmp_path):
    """Two ddp_fork processes: each rank's batches are DistributedSampler's shard of the epoch's order
    (what the host pipeline gets from Lightning), disjoint, and reshuffled every epoch."""
    torch.set_num_threads(1)
    settings = {"synthetic": True, "synthetic_size": 264, "val_size": 64, "batch_size": 25, "augment": False}
    data = _RecordingData(tmp_path, residency="device", **settings)
    model = ImageClassifier(BatchNormCNN(width=4), optimizer=partial(torch.optim.SGD, lr=0.05))
    L.seed_everything(7)
    trainer = quiet_cpu_trainer(
        tmp_path, [_DumpSeen()], max_epochs=2, limit_val_batches=0, strategy="ddp_fork", devices=2
    )
    trainer.fit(model, data)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert {r["loader"] for r in ranks} == {"DeviceBatchLoader"}

    host = _RecordingData(tmp_path, residency="host", **settings)
    host.setup("fit")
    images = host._splits["train"][0]
    ids = (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()
    for epoch in (0, 1):
        expected = []
        for rank in (0, 1):
            sampler = DistributedSampler(TensorBatchDataset(*host._splits["train"]), 2, rank, shuffle=True, seed=7)
            sampler.set_epoch(epoch)
            expected.append([ids[i] for i in sampler])
            assert ranks[rank]["seen"][str(epoch)] == expected[rank], f"rank {rank}, epoch {epoch}"
        assert not set(expected[0]) & set(expected[1]) and len(set(expected[0]) | set(expected[1])) == 200
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"], "a new epoch reshuffles"
