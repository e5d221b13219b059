import pytest
import torch
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DistributedSampler

from lit_accel.data import CIFAR10DataModule
from lit_accel.data.cifar10 import read_cifar_folder
from lit_accel.errors import DataNotFoundError


def _datamodule(root, **kwargs) -> CIFAR10DataModule:
    kwargs = {"data_dir": str(root), "val_size": 50, "batch_size": 16, "download": False, **kwargs}
    return CIFAR10DataModule(**kwargs)


def test_reads_the_real_cifar10_format(cifar10_root, cifar10_checksum_patched):
    root, arrays = cifar10_root
    dm = _datamodule(root)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    train_images, train_labels = dm._splits["train"]
    val_images, val_labels = dm._splits["val"]
    assert train_images.shape == (150, 3, 32, 32) and val_images.shape == (50, 3, 32, 32)
    assert train_images.dtype == torch.uint8
    # The split is a permutation of the five training batches, pixels in NCHW order.
    everything = torch.cat([train_images, val_images])
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    order = torch.cat([order[50:], order[:50]])  # training part first, then the 50 held out
    expected = torch.from_numpy(arrays["train_images"])[order]
    assert torch.equal(everything, expected)
    assert torch.equal(torch.cat([train_labels, val_labels]), torch.as_tensor(arrays["train_labels"])[order])
    test_images, test_labels = dm._splits["test"]
    assert torch.equal(test_images, torch.from_numpy(arrays["test_images"]))
    assert dm.classes[0] == "airplane" and len(dm.classes) == 10


def test_split_is_seeded_and_identical_across_instances(cifar10_root, cifar10_checksum_patched):
    root, _ = cifar10_root
    first, second, other = _datamodule(root), _datamodule(root), _datamodule(root, seed=1)
    for dm in (first, second, other):
        dm.setup("fit")
    assert torch.equal(first._splits["val"][0], second._splits["val"][0])
    assert not torch.equal(first._splits["val"][0], other._splits["val"][0])


def test_missing_data_without_network_gives_one_clear_error(tmp_path, no_network):
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"), download=True)
    with pytest.raises(DataNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "cifar-10-python.tar.gz" in message and "--data.synthetic true" in message
    assert "download failed" in message


def test_missing_data_with_download_off(tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(DataNotFoundError, match="downloading is off"):
        dm.setup("fit")


@pytest.mark.parametrize("split", ["train", "val"])
def test_preload_and_dataloader_pipelines_agree_without_augmentation(split):
    batches = {}
    for pipeline in ("preload", "dataloader"):
        dm = CIFAR10DataModule(
            synthetic=True,
            synthetic_size=300,
            val_size=60,
            batch_size=32,
            pipeline=pipeline,
            augment=False,
            num_workers=0,
        )
        dm.setup("fit")
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        torch.manual_seed(0)  # same shuffle order for the training loaders
        images, labels = next(iter(loader))
        images, labels = dm.on_after_batch_transfer((images, labels), 0)
        batches[pipeline] = (images, labels)
    torch.testing.assert_close(batches["preload"][0], batches["dataloader"][0], rtol=0, atol=1e-6)
    assert torch.equal(batches["preload"][1], torch.as_tensor(batches["dataloader"][1]))
    assert batches["preload"][0].dtype == torch.float32


def test_training_batches_get_per_sample_augmentation_validation_does_not():
    dm = CIFAR10DataModule(synthetic=True, synthetic_size=200, val_size=40, batch_size=32, cutout=8)
    dm.setup("fit")
    same_image = dm._splits["train"][0][:1].repeat(32, 1, 1, 1)
    torch.manual_seed(0)
    augmented = dm.device_transform(same_image, train=True)
    distinct = {tuple(img.flatten()[::97].tolist()) for img in augmented}
    assert len(distinct) > 16, "each image of the batch is augmented differently"
    plain = dm.device_transform(same_image, train=False)
    assert torch.equal(plain[0], plain[-1])


def test_dataloader_pipeline_augments_per_sample():
    dm = CIFAR10DataModule(
        synthetic=True, synthetic_size=200, val_size=40, batch_size=32, pipeline="dataloader", num_workers=0, cutout=8
    )
    dm.setup("fit")
    dataset = dm.train_dataloader().dataset
    first, again = dataset[0][0], dataset[0][0]
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, again), "one sample, one epoch: one augmentation"
    dataset.images[1] = dataset.images[0]
    assert not torch.equal(first, dataset[1][0]), "another sample of the same image: another augmentation"
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[0][0]), "the next epoch: another augmentation"


@pytest.mark.parametrize("size", [8, 32])
def test_both_pipelines_cut_out_by_the_same_rule(size):
    """Also a square as large as the image (torchvision's RandomErasing, used before, erased
    nothing at 32 and kept smaller squares inside the image)."""
    args = dict(synthetic=True, synthetic_size=200, val_size=40, horizontal_flip=False, cutout=size)
    dm = CIFAR10DataModule(**args, pipeline="dataloader", num_workers=0)
    dm.setup("fit")
    dataset = dm.train_dataloader().dataset
    dataset.seed = None  # the global RNG, as the preload pipeline draws from it
    preload = CIFAR10DataModule(**args)
    preload.setup("fit")
    for index in range(8):
        torch.manual_seed(index)
        from_dataloader = dataset[index][0]
        torch.manual_seed(index)
        from_preload = preload.device_transform(preload._splits["train"][0][index : index + 1], train=True)[0]
        torch.testing.assert_close(from_dataloader, from_preload, rtol=0, atol=1e-6)
        assert (from_dataloader == 0).all(dim=0).sum() > 0


def test_batch_size_change_takes_effect_on_the_next_train_dataloader():
    dm = CIFAR10DataModule(synthetic=True, synthetic_size=200, val_size=40, batch_size=16)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))[0].shape[0] == 16
    dm.batch_size = 48
    assert next(iter(dm.train_dataloader()))[0].shape[0] == 48


@pytest.mark.parametrize("residency", ["host", "device"])
def test_resume_mid_epoch_continues_the_epochs_data_with_a_sized_schedule(tmp_path, residency):
    """WarmupDecayLR is sized from trainer.estimated_stepping_batches in configure_optimizers, which
    makes Lightning 2.6 drop the training loader's saved state on resume (Lightning issue #20550):
    the data module's own state carries the position. Resumed from step 3 of 8, the run trains on
    batches 3..7 of the epoch, as the uninterrupted run did, and ends with the same weights."""
    from functools import partial

    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from lit_accel.callbacks import RNGStateCheckpoint
    from lit_accel.models import ImageClassifier
    from lit_accel.schedules import WarmupDecayLR

    class Batches(Callback):
        def __init__(self, crash_at: int | None = None) -> None:
            self.labels, self.crash_at = [], crash_at

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.labels.append(batch[1].clone())

        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == self.crash_at:
                raise RuntimeError("crash")

    def fit(folder, batches: Batches, ckpt_path=None) -> ImageClassifier:
        L.seed_everything(0)
        model = ImageClassifier(lr_scheduler=partial(WarmupDecayLR, warmup_fraction=0.25))
        data = CIFAR10DataModule(synthetic=True, synthetic_size=640, val_size=128, batch_size=64, residency=residency)
        checkpoints = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=3, save_top_k=-1)
        trainer = L.Trainer(
            accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=folder, callbacks=[checkpoints, RNGStateCheckpoint(), batches],
        )  # fmt: skip
        trainer.fit(model, data, ckpt_path=ckpt_path)
        assert trainer.global_step == 8
        return model

    whole = Batches()
    expected = fit(tmp_path / "whole", whole)
    with pytest.raises(RuntimeError, match="crash"):
        fit(tmp_path / "crashed", Batches(crash_at=4))
    resumed = Batches()
    model = fit(tmp_path / "crashed", resumed, ckpt_path=tmp_path / "crashed" / "step=3.ckpt")
    assert len(whole.labels) == 8 and len(resumed.labels) == 5
    for i, labels in enumerate(resumed.labels, start=3):
        assert torch.equal(labels, whole.labels[i]), f"batch {i} of the epoch"
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected.state_dict()[name]), name


def test_the_dataloader_pipeline_resumes_a_later_epoch_with_the_same_augmented_batches(tmp_path):
    """Two epochs of 5 batches, one worker, resumed at batch 2 of the second: the same images
    (crops, flips, cutout) and weights as the uninterrupted run. Before, the resumed epoch's augmentations came
    from other random draws, and with workers its order was the first epoch's (prefetched before
    Lightning's set_epoch)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from lit_accel.callbacks import RNGStateCheckpoint
    from lit_accel.models import ImageClassifier, LiteCNN

    class Batches(Callback):
        def __init__(self, crash_at: int | None = None) -> None:
            self.images, self.crash_at = [], crash_at

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.images.append(batch[0].clone())

        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == self.crash_at:
                raise RuntimeError("crash")

    def fit(folder, batches: Batches, ckpt_path=None) -> ImageClassifier:
        L.seed_everything(0)
        model = ImageClassifier(LiteCNN(width=4))
        data = CIFAR10DataModule(
            synthetic=True, synthetic_size=384, val_size=64, batch_size=64, pipeline="dataloader",
            num_workers=1, random_crop=True, cutout=8,
        )  # fmt: skip
        checkpoints = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=7, save_top_k=-1)
        trainer = L.Trainer(
            accelerator="cpu", max_epochs=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=folder, callbacks=[checkpoints, RNGStateCheckpoint(), batches],
        )  # fmt: skip
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model

    whole = Batches()
    expected = fit(tmp_path / "whole", whole)
    with pytest.raises(RuntimeError, match="crash"):
        fit(tmp_path / "crashed", Batches(crash_at=8))
    resumed = Batches()
    model = fit(tmp_path / "crashed", resumed, ckpt_path=tmp_path / "crashed" / "step=7.ckpt")
    assert len(whole.images) == 10 and len(resumed.images) == 3
    for i, images in enumerate(resumed.images, start=7):
        assert torch.equal(images, whole.images[i]), f"batch {i - 5} of the second epoch"
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected.state_dict()[name]), name


def test_the_dataloader_pipelines_augmentations_do_not_depend_on_the_number_of_workers():
    def first_batches(num_workers: int) -> list[torch.Tensor]:
        data = CIFAR10DataModule(
            synthetic=True, synthetic_size=192, val_size=64, batch_size=32, pipeline="dataloader",
            num_workers=num_workers, random_crop=True, cutout=8,
        )  # fmt: skip
        data.setup("fit")
        return [images for images, _ in data.train_dataloader()]

    without, with_two = first_batches(0), first_batches(2)
    assert len(without) == 4 and all(torch.equal(a, b) for a, b in zip(without, with_two))


def test_lightning_distributed_sampler_gives_disjoint_reshuffled_shards():
    """The preload loader survives Lightning's sampler injection with DistributedSampler semantics."""
    dm = CIFAR10DataModule(synthetic=True, synthetic_size=264, val_size=64, batch_size=25)
    dm.setup("fit")
    loader = dm.train_dataloader()
    images, labels = dm._splits["train"]

    def shard(rank: int, epoch: int) -> list[int]:
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=42)
        sampler.set_epoch(epoch)
        distributed = _update_dataloader(loader, sampler)
        seen = []
        for batch_images, _ in distributed:
            assert batch_images.dtype == torch.uint8 and batch_images.ndim == 4
            # identify each image by its position in the split
            seen += [int((images == img).all(dim=(1, 2, 3)).nonzero()[0]) for img in batch_images]
        return seen

    rank0, rank1 = shard(0, epoch=0), shard(1, epoch=0)
    assert len(rank0) == len(rank1) == 100
    assert not set(rank0) & set(rank1) and len(set(rank0) | set(rank1)) == 200
    assert shard(0, epoch=1) != rank0, "a new epoch reshuffles"


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_size": -1}, "val_size"),
        ({"val_size": 50_000}, "val_size"),
        ({"synthetic": True, "synthetic_size": 100, "val_size": 100}, "val_size"),
        ({"pipeline": "fast"}, "pipeline"),
        ({"cutout": 40}, "cutout"),
        ({"num_workers": -1}, "num_workers"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
        ({"residency": "gpu"}, "residency"),
        ({"residency": "device", "pipeline": "dataloader"}, "residency"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}=.* is not allowed"):
        CIFAR10DataModule(**kwargs)


@pytest.mark.parametrize("verify_checksums", [True, False])
def test_val_size_larger_than_the_data_found(verify_checksums, cifar10_root, cifar10_checksum_patched):
    root, _ = cifar10_root
    dm = _datamodule(root, val_size=300, verify_checksums=verify_checksums)
    with pytest.raises(ValueError, match="fewer than the 200 training images found"):
        dm.setup("fit")


def test_own_data_may_hold_more_than_cifar10s_training_images():
    """CIFAR-10's 50,000 bound the validation split only for CIFAR-10 itself."""
    assert CIFAR10DataModule(verify_checksums=False, val_size=50_000).val_size == 50_000


# ------------------------------------------------------------- own images in CIFAR-10's format
def test_own_cifar_format_folder_loads_without_checksums_the_same_as_torchvision(
    cifar10_root, cifar10_checksum_patched
):
    root, arrays = cifar10_root
    checked, unchecked = _datamodule(root), _datamodule(root, verify_checksums=False)
    for dm in (checked, unchecked):
        dm.setup("fit")
        dm.setup("test")
    for split in ("train", "val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(checked._splits[split], unchecked._splits[split])), split
    assert unchecked.classes == checked.classes


def test_own_folder_needs_no_patch_to_load(cifar10_root):
    """Without the fixture's checksum patch: verify_checksums=False reads the files as they are."""
    root, arrays = cifar10_root
    dm = _datamodule(root, verify_checksums=False)
    dm.prepare_data()  # no download attempt and no checksum check
    dm.setup("test")
    assert torch.equal(dm._splits["test"][0], torch.from_numpy(arrays["test_images"]))


def test_files_that_are_not_official_cifar10_say_how_to_load_them(cifar10_root):
    root, _ = cifar10_root
    with pytest.raises(DataNotFoundError, match="not the official CIFAR-10.*--data.verify_checksums false"):
        _datamodule(root).setup("fit")


class _Payload:
    """Unpickling this creates the file named by ``marker``: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_data_file_is_refused_before_it_runs_code(cifar10_root, tmp_path):
    import pickle
    import shutil

    source, _ = cifar10_root
    root = tmp_path / "data"
    shutil.copytree(source, root)
    marker = tmp_path / "payload-ran"
    with open(root / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": _Payload(str(marker)), "labels": []}, f, protocol=2)
    with pytest.raises(DataNotFoundError, match=r"format: data_batch_3: UnpicklingError") as error:
        _datamodule(root, verify_checksums=False).setup("fit")
    assert "refused to load" in str(error.value)
    assert not marker.exists(), "the payload ran"


def test_a_folder_with_mismatched_labels_is_one_clear_error(cifar10_root, tmp_path):
    import pickle
    import shutil

    source, _ = cifar10_root
    root = tmp_path / "data"
    shutil.copytree(source, root)
    batch = root / "cifar-10-batches-py" / "test_batch"
    entry = pickle.loads(batch.read_bytes(), encoding="latin1")
    entry["labels"] = entry["labels"][:-1]
    batch.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DataNotFoundError, match="test_batch has 39 labels for 40 images"):
        _datamodule(root, verify_checksums=False).setup("test")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda entry: entry.update(labels=[12] + entry["labels"][1:]), "has label 12, outside 0..9"),
        (lambda entry: entry.update(data=entry["data"].astype("int64")), "'data' must be a uint8 array"),
        (lambda entry: entry.update(data=entry["data"].astype(object)), "'data' must be a uint8 array"),
        (lambda entry: entry.update(labels=[str(x) for x in entry["labels"]]), "'labels' must be a list of ints"),
    ],
    ids=["label-out-of-range", "int64-data", "object-data", "string-labels"],
)
@pytest.mark.parametrize("protocol", [4, 5])
def test_a_malformed_batch_is_one_clear_error(change, message, protocol, cifar10_root, tmp_path):
    import pickle
    import shutil

    source, _ = cifar10_root
    root = tmp_path / "data"
    shutil.copytree(source, root)
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    entry = pickle.loads(batch.read_bytes(), encoding="latin1")
    change(entry)
    batch.write_bytes(pickle.dumps(entry, protocol=protocol))
    with pytest.raises(DataNotFoundError, match=message):
        _datamodule(root, verify_checksums=False).setup("fit")


def test_own_files_pickled_with_the_highest_protocol_are_read(cifar10_root, tmp_path):
    """Protocol 5 (pickle.HIGHEST_PROTOCOL, what a plain pickle.dump writes from Python 3.14 on)
    stores numpy arrays for numpy's _frombuffer: read, not refused as a crafted file."""
    import pickle
    import shutil

    source, arrays = cifar10_root
    root = tmp_path / "data"
    shutil.copytree(source, root)
    for path in (root / "cifar-10-batches-py").iterdir():
        entry = pickle.loads(path.read_bytes(), encoding="latin1")
        path.write_bytes(pickle.dumps(entry, protocol=5))
    images, labels, classes = read_cifar_folder(str(root), train=True)
    assert torch.equal(images, torch.from_numpy(arrays["train_images"]))
    assert labels.tolist() == arrays["train_labels"].tolist() and classes[0] == "airplane"


@pytest.mark.parametrize("precision", ["64-true", "16-true"])
def test_a_true_precision_gets_its_float_dtype_from_the_preload_pipeline(tmp_path, precision):
    """Lightning converts float inputs before the transfer; the preloaded images are uint8 until after it."""
    from helpers import quiet_cpu_trainer
    from lit_accel.models import ImageClassifier, LiteCNN

    data = CIFAR10DataModule(synthetic=True, synthetic_size=64, val_size=16, batch_size=16, synthetic_test_size=16)
    model = ImageClassifier(LiteCNN(width=4))
    trainer = quiet_cpu_trainer(tmp_path, precision=precision, max_steps=2, limit_val_batches=1)
    trainer.fit(model, data)
    trainer.test(model, data, verbose=False)
    assert trainer.global_step == 2 and next(model.parameters()).dtype == {"64-true": torch.float64}.get(
        precision, torch.float16
    )
