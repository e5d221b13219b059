"""A network trained on 64-pixel images: its checkpoint says so, and ``predict`` and ``lit-accel-export``
use that size (and its class names) without being told."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import FIGURES_OFF_ARGS, TINY_CLI_ARGS, config
from lit_accel.checkpoints import read_checkpoint
from lit_accel.cli import LitAccelCLI, evaluation_image_size, main
from lit_accel.data import CIFAR10DataModule
from lit_accel.data.augment import normalize
from lit_accel.data.image_folder import read_image_file
from lit_accel.errors import ConfigurationError
from lit_accel.export import METADATA_NAME, PT2_NAME, TORCHSCRIPT_NAME, export_checkpoint
from lit_accel.models import ImageClassifier

SIZE = 64
CLASSES = ("cow", "hen", "pig")  # sorted: ImageFolderDataModule names classes as torchvision does
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
# Your own data: the class names come with the checkpoint, no training data is read.
OWN_DATA = ["--data.synthetic", "false", "--data.verify_checksums", "false", "--data.data_dir", "nothing_here"]
PREDICT = ["predict", *config("cifar10.yaml", "smoke.yaml"), *QUIET, *OWN_DATA]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The recipe (LiteCNN) fitted through the real CLI for 2 steps on a folder of 64-px images of
    three classes (``--data ImageFolderDataModule``): the chain a user runs."""
    root = tmp_path_factory.mktemp("fit64")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / "photos" / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (70 + i, 80, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "photos" / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    data = ["--data", "ImageFolderDataModule", "--data.root", str(root / "photos"), "--data.image_size", str(SIZE)]
    data += ["--data.decode_workers", "0", "--data.batch_size", "4", "--data.val_fraction", "0.2"]
    three = ["--model.num_classes", "3", "--model.net.num_classes", "3"]
    where = ["--trainer.logger", "false", "--trainer.default_root_dir", str(root)]
    where += ["--step_checkpoint.dirpath", str(root)]
    steps = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    cli = LitAccelCLI(args=["fit", *data, *QUIET, *three, *where, *steps, *FIGURES_OFF_ARGS])
    assert cli.datamodule.split_dataset("train")[0][0].shape == (3, SIZE, SIZE)
    path = root / "size64.ckpt"
    cli.trainer.save_checkpoint(path)
    return path


def _photos(root: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    root.mkdir()
    paths = []
    for name, shape in (("a.png", (90, 120, 3)), ("b.jpg", (64, 64, 3)), ("c.png", (200, 70, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name)
        paths.append(root / name)
    return paths


def _expected(checkpoint: Path, images: torch.Tensor) -> torch.Tensor:
    model = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False).eval()
    with torch.no_grad():
        return torch.softmax(model.evaluation_logits(normalize(images)), dim=-1)


def test_the_checkpoint_records_the_training_image_size_and_class_names(checkpoint: Path) -> None:
    contents = read_checkpoint(str(checkpoint))
    assert contents["image_size"] == SIZE
    assert contents["class_names"] == list(CLASSES)


def test_predict_reads_a_folder_at_the_checkpoints_image_size(checkpoint: Path, in_tmp_dir: Path) -> None:
    photos = _photos(in_tmp_dir / "photos")
    main([*PREDICT, "--ckpt_path", str(checkpoint), "--data.predict_dir", "photos"])
    with open(in_tmp_dir / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert [row[0] for row in rows] == [p.name for p in photos]
    expected = _expected(checkpoint, torch.stack([read_image_file(str(p), SIZE) for p in photos]))
    at_32 = _expected(checkpoint, torch.stack([read_image_file(str(p), 32) for p in photos]))
    assert not torch.allclose(expected, at_32, atol=1e-4), "the sizes must be told apart"
    for row, probabilities in zip(rows, expected):
        assert row[1] == CLASSES[int(probabilities.argmax())]
        assert float(row[2]) == pytest.approx(float(probabilities.max()), abs=5e-6)


def test_export_takes_images_of_the_checkpoints_size(checkpoint: Path, tmp_path: Path) -> None:
    written = export_checkpoint(str(checkpoint), tmp_path / "out")
    metadata = json.loads((tmp_path / "out" / METADATA_NAME).read_text())
    assert metadata["input"]["shape"] == ["N", 3, SIZE, SIZE]
    assert f"{SIZE}x{SIZE}" in metadata["input"]["layout"]
    assert metadata["classes"] == list(CLASSES)
    images = torch.randint(0, 256, (5, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    expected = _expected(checkpoint, images)
    pt2 = torch.export.load(str(written["pt2"])).module()
    script = torch.jit.load(str(written["torchscript"]))
    assert {written["pt2"].name, written["torchscript"].name} == {PT2_NAME, TORCHSCRIPT_NAME}
    with torch.no_grad():
        torch.testing.assert_close(pt2(images), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(script(images), expected, atol=1e-5, rtol=0)


def test_a_predict_size_other_than_the_checkpoints_is_refused() -> None:
    assert evaluation_image_size(SIZE, None) == SIZE == evaluation_image_size(SIZE, SIZE)
    with pytest.raises(
        ConfigurationError, match=r"data.image_size=32 but the checkpoint's network was trained on 64×64"
    ):
        evaluation_image_size(SIZE, 32)


class SizedCIFAR10(CIFAR10DataModule):
    """A data module whose image size is an argument (``--data.image_size``), as an image-folder one's is."""

    sizes_at_setup: list[int] = []  # the CLI builds the instance: what its setup saw is kept here

    def __init__(self, image_size: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image_size = image_size

    def setup(self, stage: str) -> None:
        type(self).sizes_at_setup.append(self.image_size)
        super().setup(stage)


@pytest.mark.parametrize(("given", "refused"), [("64", False), ("32", True)])
def test_predict_sets_any_data_modules_image_size_to_the_checkpoints_and_refuses_another(
    checkpoint: Path, in_tmp_dir: Path, monkeypatch, capsys, given: str, refused: bool
) -> None:
    """``--data.image_size 32`` is refused although 32 is the data module's default: given is given.
    (Not given, the checkpoint's size is used: the CIFAR-10 module's test above.)"""
    monkeypatch.setattr("lit_accel.cli.CIFAR10DataModule", SizedCIFAR10)
    monkeypatch.setattr(SizedCIFAR10, "sizes_at_setup", [])
    _photos(in_tmp_dir / "photos")
    args = [*PREDICT, "--ckpt_path", str(checkpoint), "--data.predict_dir", "photos", "--data.image_size", given]
    if refused:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        assert "data.image_size=32 but the checkpoint's network was trained on 64×64 images" in capsys.readouterr().err
        assert not (in_tmp_dir / "predictions.csv").exists()
    else:
        main(args)
        assert SizedCIFAR10.sizes_at_setup == [SIZE]
        assert (in_tmp_dir / "predictions.csv").is_file()


def test_validate_reads_the_folder_at_the_checkpoints_image_size(checkpoint: Path, in_tmp_dir: Path) -> None:
    """``lit-accel validate --config image_folder`` of the 64-px checkpoint on its folder, without
    ``--data.image_size`` (the module's default is 32, and the config leaves it out so as not to
    give it): the folder is decoded at 64 px."""
    data = [*config("image_folder.yaml"), "--data.root", str(checkpoint.parent / "photos")]
    data += ["--data.decode_workers", "0", "--data.batch_size", "4", "--data.val_fraction", "0.2"]
    cli = LitAccelCLI(args=["validate", *data, *QUIET, "--trainer.logger", "false", "--ckpt_path", str(checkpoint)])
    assert cli.datamodule.image_size == SIZE
    assert cli.datamodule.split_dataset("val")[0][0].shape == (3, SIZE, SIZE)
    assert "val/acc" in cli.trainer.callback_metrics


def test_cifar10_says_its_images_are_not_the_checkpoints_size(in_tmp_dir: Path, caplog) -> None:
    """CIFAR-10's splits stay 32×32: testing a network trained at 64 px on them says so."""
    fit = LitAccelCLI(args=["fit", *TINY_CLI_ARGS, "--trainer.logger", "false", "--trainer.max_epochs", "1"])
    checkpoint = in_tmp_dir / "at64.ckpt"
    fit.trainer.save_checkpoint(checkpoint)
    contents = torch.load(checkpoint, weights_only=False)
    assert contents["image_size"] == 32
    torch.save({**contents, "image_size": SIZE}, checkpoint)
    LitAccelCLI(args=["validate", *TINY_CLI_ARGS, "--trainer.logger", "false", "--ckpt_path", str(checkpoint)])
    assert "trained on 64×64 images, but CIFAR-10's are 32×32: validate runs on them as they are" in caplog.text


def test_predict_of_an_fsdp_checkpoint_folder_reads_its_image_size_from_meta_pt(in_tmp_dir: Path, monkeypatch) -> None:
    """An FSDP2 checkpoint is a folder: its non-tensor entries, ``image_size`` among them, are in
    Lightning's ``meta.pt`` (a real 2-process FSDP fit on 64-px files wrote ``image_size: 64`` there).
    Loading its shards takes a sharded strategy in two processes: the command is stopped where it
    would start (``before_predict``), and what is checked is the size its data module was given."""
    folder = in_tmp_dir / "last.ckpt"
    folder.mkdir()
    torch.save({"epoch": 0, "image_size": SIZE, "class_names": list(CLASSES)}, folder / "meta.pt")
    sizes = []

    class Started(Exception):
        pass

    def started(cli: LitAccelCLI) -> None:
        sizes.append(cli.datamodule.image_size)
        raise Started

    monkeypatch.setattr(LitAccelCLI, "before_predict", started)
    _photos(in_tmp_dir / "photos")
    data = ["--data", "ImageFolderDataModule", "--data.root", "photos", "--data.predict_dir", "photos"]
    with pytest.raises(Started):
        LitAccelCLI(args=["predict", *config("cifar10.yaml"), *QUIET, *data, "--ckpt_path", str(folder)])
    assert sizes == [SIZE]
