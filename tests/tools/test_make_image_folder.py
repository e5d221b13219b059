"""tools/make_image_folder.py: the layout and formats it says, the same files whatever the layout or
the number of workers, and a CIFAR-format copy that holds the same pictures."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_accel.data import CIFAR10_CLASSES, make_synthetic_cifar
from lit_accel.data.cifar10 import read_cifar_folder
from tools.make_image_folder import JPEG_QUALITY, main, relative_path, write_image_folder

# 100 images, half of them in val/: with seed 0 every class has images in both splits.
IMAGES, VAL_FRACTION = 100, 0.5


def _pixels(file: Path | io.BytesIO) -> torch.Tensor:
    with Image.open(file) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _expected_paths(layout: str, format: str) -> set[str]:
    paths = set()
    for split_index, split in enumerate(("train", "val")):
        _, labels = make_synthetic_cifar(IMAGES // 2, seed=0, split=split_index)
        for index, label in enumerate(labels.tolist()):
            paths.add(relative_path(layout, split, CIFAR10_CLASSES[label], index, format))
    return paths


def test_writes_each_image_where_the_layout_says_in_the_format_it_says(tmp_path):
    """``split`` in a pool of 2 processes, ``flat`` in this one: the files each layout promises, and the
    same bytes for each image either way (an image does not depend on its layout or its worker)."""
    split, flat = tmp_path / "split", tmp_path / "flat"
    written = write_image_folder(split, IMAGES, 40, "mixed", "split", VAL_FRACTION, workers=2)
    write_image_folder(flat, IMAGES, 40, "mixed", "flat", VAL_FRACTION, workers=1)
    assert (written.train_images, written.val_images) == (50, 50)
    split_files, flat_files = _files(split), _files(flat)
    assert set(split_files) == _expected_paths("split", "mixed")
    assert set(flat_files) == _expected_paths("flat", "mixed")
    assert sorted(p.name for p in split.iterdir()) == ["train", "val"]
    assert sorted(p.name for p in (split / "val").iterdir()) == sorted(CIFAR10_CLASSES)
    assert sorted(p.name for p in flat.iterdir()) == sorted(CIFAR10_CLASSES)
    for relative, content in split_files.items():
        split_name, class_name, name = relative.split("/")
        assert flat_files[f"{class_name}/{split_name}_{name}"] == content, relative
        with Image.open(split / relative) as image:
            assert image.format == ("JPEG" if name.endswith(".jpg") else "PNG") and image.size == (40, 40)
            assert image.mode == "RGB"
    assert {n.rsplit(".")[-1] for n in split_files} == {"jpg", "png"}


def test_is_reproducible_and_the_seed_picks_the_images(tmp_path):
    """At 32 px (no noise) too: the seed picks the pictures of both splits, not only the noise."""
    write_image_folder(tmp_path / "a", IMAGES, 32, "jpeg", "split", VAL_FRACTION, seed=0, workers=1)
    write_image_folder(tmp_path / "b", IMAGES, 32, "jpeg", "split", VAL_FRACTION, seed=0, workers=1)
    first = _files(tmp_path / "a")
    assert first == _files(tmp_path / "b") and all(name.endswith(".jpg") for name in first)
    args = ["--images", str(IMAGES), "--val_fraction", str(VAL_FRACTION), "--size", "32", "--workers", "1"]
    other = main([str(tmp_path / "c"), *args, "--seed", "1"])
    assert (other.train_images, other.size, other.format) == (50, 32, "jpeg")
    second = _files(tmp_path / "c")
    for split in ("train/", "val/"):
        assert [v for k, v in first.items() if k.startswith(split)] != [
            v for k, v in second.items() if k.startswith(split)
        ], split


def test_the_cifar_format_copy_holds_the_folders_images_at_32_px(tmp_path):
    """PNG files hold exactly the copy's pixels; JPEG ones the copy's pixels as JPEG at the tool's quality."""
    written = write_image_folder(
        tmp_path / "folder", IMAGES, 32, "mixed", "split", VAL_FRACTION, workers=1, cifar_dir=tmp_path / "cifar"
    )
    assert written.cifar_folder == tmp_path / "cifar" / "cifar-10-batches-py"
    for split, train in (("train", True), ("val", False)):
        images, labels, classes = read_cifar_folder(str(tmp_path / "cifar"), train=train)
        assert tuple(classes) == CIFAR10_CLASSES and len(images) == 50
        for index in range(len(images)):
            path = tmp_path / "folder" / relative_path("split", split, classes[labels[index]], index, "mixed")
            expected = images[index]
            if path.suffix == ".jpg":  # lossy: the copy's picture through the same encoder
                encoded = io.BytesIO()
                Image.fromarray(expected.permute(1, 2, 0).numpy()).save(encoded, "JPEG", quality=JPEG_QUALITY)
                expected = _pixels(encoded)
            assert torch.equal(_pixels(path), expected), path


def test_refuses_what_it_cannot_write_with_the_argument_named(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="not an empty folder"):
        write_image_folder(tmp_path / "full", IMAGES, 32, workers=1)
    with pytest.raises(ValueError, match=r"class '\w+' gets no train image with seed 0"):
        write_image_folder(tmp_path / "few", 20, 32, workers=1)
    with pytest.raises(ValueError, match="format='gif' is not allowed"):
        write_image_folder(tmp_path / "x", IMAGES, 32, "gif")
    with pytest.raises(ValueError, match="needs at least 5 training and 1 validation image"):
        write_image_folder(tmp_path / "x", IMAGES, 32, val_fraction=0, cifar_dir=tmp_path / "c")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x"), "--images", "0"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "few").exists()
