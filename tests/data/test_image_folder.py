"""Image files → 32×32 uint8 images: the resize rule, bad files, and CIFAR10DataModule's predict_dir."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_accel.data import CIFAR10DataModule
from lit_accel.data.augment import normalize
from lit_accel.data.image_folder import ImageFolderDataset, list_files, read_image_file
from lit_accel.errors import DataNotFoundError

RED, GREEN = (255, 0, 0), (0, 255, 0)


def _save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _solid(height: int, width: int, colour: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (height, width, 3)).copy()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Good images of odd sizes and formats, in a subfolder too, plus bad and hidden files."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    _save(root / "wide.png", rng.integers(0, 256, (20, 50, 3), dtype=np.uint8))
    _save(root / "tall.jpg", rng.integers(0, 256, (33, 17, 3), dtype=np.uint8))
    _save(root / "sub" / "gray.png", rng.integers(0, 256, (40, 40), dtype=np.uint8))
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 8)
    (root / ".hidden.png").write_bytes(b"ignored")
    (root / ".cache").mkdir()
    _save(root / ".cache" / "x.png", _solid(8, 8, RED))
    return root


# ---------------------------------------------------------------------------- the resize rule
def test_shorter_side_to_32_then_center_crop(tmp_path: Path) -> None:
    # 96×32 (W×H): red 32-pixel bands left and right of a green centre. The shorter side is
    # already 32, so the crop keeps exactly the green centre.
    image = _solid(32, 96, RED)
    image[:, 32:64] = GREEN
    out = read_image_file(str(_save(tmp_path / "bands.png", image)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(out, torch.tensor(GREEN, dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32))


def test_tall_images_crop_top_and_bottom_and_small_ones_grow(tmp_path: Path) -> None:
    tall = _solid(128, 64, RED)  # 64 wide → 32 wide, 128 high → 64 high; the crop keeps rows 16…47
    tall[24:104] = GREEN  # rows 12…51 once scaled: the crop is green through, with a margin for antialiasing
    assert torch.all(read_image_file(str(_save(tmp_path / "tall.png", tall)))[1] == 255)
    small = read_image_file(str(_save(tmp_path / "small.png", _solid(8, 8, (10, 20, 30)))))
    assert small.shape == (3, 32, 32)
    assert small[:, 0, 0].tolist() == [10, 20, 30] and bool((small == small[:, :1, :1]).all())


@pytest.mark.parametrize(
    ("name", "array", "expected_pixel"),
    [
        ("gray.png", np.full((32, 32), 77, dtype=np.uint8), [77, 77, 77]),
        ("alpha.png", np.dstack([_solid(32, 32, (1, 2, 3)), np.full((32, 32), 9, np.uint8)]), [1, 2, 3]),
        ("photo.bmp", _solid(32, 32, (200, 100, 50)), [200, 100, 50]),
        ("deep.png", np.full((32, 32), 30000, dtype=np.uint16), [117, 117, 117]),  # 16-bit scaled: 30000 / 256
        ("float.tif", np.full((32, 32), 0.5, dtype=np.float32), [128, 128, 128]),  # [0, 1] floats: 0.5 x 255
        ("bright.tif", np.full((32, 32), 1.5, dtype=np.float32), [255, 255, 255]),  # clipped
    ],
)
def test_any_format_becomes_rgb_uint8(tmp_path: Path, name: str, array: np.ndarray, expected_pixel: list[int]) -> None:
    out = read_image_file(str(_save(tmp_path / name, array)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert out[:, 5, 5].tolist() == expected_pixel


@pytest.mark.parametrize(
    ("name", "save_args"),
    [("palette.gif", {}), ("lossless.webp", {"lossless": True}), ("scan.tiff", {}), ("scan.tif", {})],
)
def test_gif_webp_and_tiff_files_are_read(tmp_path: Path, name: str, save_args: dict) -> None:
    out = read_image_file(str(_save(tmp_path / name, _solid(40, 64, (200, 100, 50)), **save_args)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert out[:, 16, 16].tolist() == [200, 100, 50]


def test_an_animated_gif_is_read_as_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.fromarray(_solid(32, 32, colour)) for colour in (RED, GREEN)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert read_image_file(str(path))[:, 5, 5].tolist() == list(RED)


# ---------------------------------------------------------------------------- the data set
def test_lists_files_sorted_with_subfolders_without_hidden_ones(folder: Path) -> None:
    assert list_files(str(folder)) == ["broken.png", "notes.txt", "sub/gray.png", "tall.jpg", "wide.png"]


def test_bad_files_are_reported_by_name_and_dropped(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    dataset = ImageFolderDataset(str(folder))
    with caplog.at_level(logging.WARNING, logger="lit_accel.data.image_folder"):
        items = [dataset[i] for i in range(len(dataset))]
    assert [item is None for item in items] == [True, True, False, False, False]
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 2
    assert skipped[0].startswith("skipped broken.png: not a readable image")
    assert skipped[1].startswith("skipped notes.txt: not a readable image")
    images, names = dataset.collate(items)
    assert names == ["sub/gray.png", "tall.jpg", "wide.png"]
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[2], read_image_file(str(folder / "wide.png")))


def test_links_that_lead_nowhere_are_named_like_unreadable_images(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A dangling link and a link loop are listed (reading them fails, and says so by name); a link
    to a folder and a pipe are not read, but named when left out."""
    (folder / "gone.png").symlink_to(folder / "deleted.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "linked").symlink_to(folder / "sub")
    os.mkfifo(folder / "pipe.png")
    with caplog.at_level(logging.WARNING, logger="lit_accel.data.image_folder"):
        dataset = ImageFolderDataset(str(folder))
        items = {name: dataset[i] for i, name in enumerate(dataset.files)}
    assert [name for name, item in items.items() if item is not None] == ["sub/gray.png", "tall.jpg", "wide.png"]
    skipped = sorted(r.getMessage() for r in caplog.records)
    assert [line.split(":")[0] for line in skipped] == [
        "skipped broken.png",
        "skipped gone.png",
        "skipped linked/",
        "skipped loop.png",
        "skipped notes.txt",
        "skipped pipe.png",
    ], skipped
    assert "gone.png: not a readable image (FileNotFoundError" in skipped[1]
    assert "loop.png: not a readable image" in skipped[3] and "symbolic links" in skipped[3]


@pytest.mark.parametrize("transform", [None, lambda image: image.float() / 255])
def test_a_batch_of_only_bad_files_is_empty_with_the_usual_dtype(folder: Path, transform) -> None:
    dataset = ImageFolderDataset(str(folder), transform=transform)
    images, names = dataset.collate([None, None])
    assert images.shape == (0, 3, 32, 32) and names == []
    assert images.dtype == (torch.uint8 if transform is None else torch.float32)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        ImageFolderDataset(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"image_size=0 is not allowed"):
        ImageFolderDataset(str(tmp_path), image_size=0)


# ---------------------------------------------------------------------------- the data module
def _predict_batches(datamodule: CIFAR10DataModule) -> list[tuple[torch.Tensor, list[str]]]:
    datamodule.setup("predict")
    return [datamodule.on_after_batch_transfer(batch, 0) for batch in datamodule.predict_dataloader()]


@pytest.mark.parametrize("pipeline", ["preload", "dataloader"])
def test_predict_dir_yields_normalized_images_and_file_names(folder: Path, pipeline: str) -> None:
    datamodule = CIFAR10DataModule(
        synthetic=True,
        synthetic_size=64,
        val_size=8,
        predict_dir=str(folder),
        pipeline=pipeline,
        eval_batch_size=2,
        num_workers=1 if pipeline == "dataloader" else 0,
    )
    batches = _predict_batches(datamodule)
    names = [name for _, batch_names in batches for name in batch_names]
    assert names == ["sub/gray.png", "tall.jpg", "wide.png"]
    images = torch.cat([images for images, _ in batches])
    expected = normalize(torch.stack([read_image_file(str(folder / name)) for name in names]))
    assert images.dtype == torch.float32
    torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)


def test_without_predict_dir_predict_is_the_test_split() -> None:
    datamodule = CIFAR10DataModule(
        synthetic=True, synthetic_size=64, synthetic_test_size=24, val_size=8, eval_batch_size=8
    )
    batches = _predict_batches(datamodule)
    assert sum(images.shape[0] for images, _ in batches) == 24
    assert batches[0][1].dtype == torch.long  # labels


def test_missing_or_empty_predict_dir_is_a_clear_user_error(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"data.predict_dir='.*nowhere': no such folder"):
        CIFAR10DataModule(synthetic=True, predict_dir=str(tmp_path / "nowhere")).setup("predict")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="holds no files"):
        CIFAR10DataModule(synthetic=True, predict_dir=str(tmp_path / "empty")).setup("predict")
    (tmp_path / "photo.png").write_bytes(b"")
    with pytest.raises(DataNotFoundError, match=r"predict_dir='.*photo.png' is a file .*: pass the folder that holds"):
        CIFAR10DataModule(synthetic=True, predict_dir=str(tmp_path / "photo.png")).setup("predict")


def test_predict_dir_must_name_a_folder() -> None:
    with pytest.raises(ValueError, match=r"predict_dir='  ' is not allowed"):
        CIFAR10DataModule(synthetic=True, predict_dir="  ")


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_close_to_the_full_decode(tmp_path, monkeypatch):
    """libjpeg's reduced-scale decode (Pillow's draft) for a JPEG many times the target size: asked
    for the target size, and within a few levels of decoding it whole and resizing."""
    from torchvision.transforms.v2 import functional as F

    rows = np.linspace(0, 255, 512, dtype=np.float32)
    pixels = np.stack([np.add.outer(rows, rows) / 2, np.add.outer(rows, -rows) / 2 + 128, np.tile(rows, (512, 1))], -1)
    path = tmp_path / "large.jpg"
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=95)
    drafts = []
    from PIL import JpegImagePlugin

    jpeg = JpegImagePlugin.JpegImageFile
    real_draft = jpeg.draft
    monkeypatch.setattr(jpeg, "draft", lambda self, mode, size: drafts.append(size) or real_draft(self, mode, size))
    image = read_image_file(str(path), 32)
    assert drafts == [(32, 32)]
    with Image.open(path) as opened:
        whole = F.pil_to_tensor(opened.convert("RGB"))
    expected = F.center_crop(F.resize(whole, [32], antialias=True), [32, 32])
    assert (image.int() - expected.int()).abs().float().mean() < 3.0
    png = _save(tmp_path / "large.png", pixels.clip(0, 255).astype(np.uint8))
    read_image_file(str(png), 32)
    assert drafts == [(32, 32)], "a PNG has no reduced-scale decode"
