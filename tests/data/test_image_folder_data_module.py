"""ImageFolderDataModule: layouts, splits, class names, formats, the decoded-image cache, bad input."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lit_accel.data.image_cache as image_cache
from helpers import FIGURES_OFF_ARGS, config, run_cli
from lit_accel import ImageFolderDataModule
from lit_accel.cli import LitAccelCLI
from lit_accel.data.image_cache import CACHE_FORMAT, save_atomically
from lit_accel.data.image_folder import read_image_file
from lit_accel.errors import ConfigurationError, DataNotFoundError

# Every format the module reads, each in another mode (read_image_file converts any to RGB).
FORMATS = [("jpg", "RGB"), ("png", "RGBA"), ("webp", "RGB"), ("bmp", "L"), ("tiff", "CMYK"), ("gif", "P")]


def write_images(folder: Path, classes=("cat", "dog", "fox"), per_class: int = 6, seed: int = 0) -> list[Path]:
    """``per_class`` real image files of odd sizes in each ``folder/<class>/``, one of each format."""
    rng = np.random.default_rng(seed)
    paths = []
    for c, name in enumerate(classes):
        for i in range(per_class):
            extension, mode = FORMATS[i % len(FORMATS)]
            pixels = rng.integers(0, 256, (36 + i, 44 + c, 3), dtype=np.uint8)
            path = folder / name / f"{i:02d}.{extension}"
            path.parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels).convert(mode)
            if extension == "gif":  # two frames: the first one is the image
                image.save(path, save_all=True, append_images=[Image.new("P", image.size, 7)])
            else:
                image.save(path)
            paths.append(path)
    return paths


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    """Class folders directly under the root: 3 classes × 6 images, every format."""
    root = tmp_path / "flat"
    write_images(root)
    (root / "cat" / "notes.txt").write_text("not an image: left out by its extension")
    return root


def _module(root: Path, **kwargs) -> ImageFolderDataModule:
    kwargs = {"root": str(root), "decode_workers": 0, "batch_size": 4, **kwargs}
    return ImageFolderDataModule(**kwargs)


def _decoding_forbidden(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(image_cache, "read_image_file", refuse)


# ------------------------------------------------------------------------- layouts and splits
def test_class_folders_under_the_root_are_split_by_seeded_fractions(flat):
    dm = _module(flat, val_fraction=0.2, test_fraction=0.2)
    dm.setup("fit")
    assert dm.classes == ("cat", "dog", "fox") and dm.image_size == 32
    sizes = {split: dm._splits[split][0].shape[0] for split in ("train", "val", "test")}
    assert sizes == {"train": 10, "val": 4, "test": 4}
    # Disjoint and together every image: identify each image by its pixels.
    everything = torch.cat([dm._splits[s][0] for s in ("train", "val", "test")]).flatten(1)
    assert torch.unique(everything, dim=0).shape[0] == 18
    again, other = _module(flat, val_fraction=0.2, test_fraction=0.2), _module(flat, val_fraction=0.2, seed=1)
    again.setup("fit")
    other.setup("fit")
    assert torch.equal(again._splits["val"][0], dm._splits["val"][0]), "the same seed, the same split"
    assert not torch.equal(other._splits["val"][0], dm._splits["val"][0])


def test_train_val_test_folders_and_sorted_class_names(tmp_path):
    for split, count in (("train", 4), ("val", 2), ("test", 1)):
        write_images(tmp_path / split, classes=("zebra", "ant"), per_class=count, seed=len(split))
    dm = _module(tmp_path, val_fraction=0.5)  # unused: val/ is there
    dm.setup("fit")
    dm.setup("test")
    assert dm.classes == ("ant", "zebra"), "sorted folder names, as torchvision's ImageFolder"
    assert {s: dm._splits[s][0].shape[0] for s in ("train", "val", "test")} == {"train": 8, "val": 4, "test": 2}
    expected = read_image_file(str(tmp_path / "val" / "zebra" / "01.png"), 32)
    assert torch.equal(dm._splits["val"][0][3], expected) and dm._splits["val"][1].tolist() == [0, 0, 1, 1]
    assert sorted(p.name for p in (tmp_path / ".lit_accel_cache").iterdir()) == ["test.pt", "train.pt", "val.pt"]


@pytest.mark.parametrize("image_size", [32, 48])
def test_every_format_and_mode_is_decoded_by_the_predict_rule(flat, image_size):
    dm = _module(flat, val_fraction=0.0, image_size=image_size)
    dm.setup("fit")
    images, labels = dm._splits["train"]
    assert images.shape == (18, 3, image_size, image_size) and images.dtype == torch.uint8
    files = sorted(p for p in flat.rglob("*") if p.suffix != ".txt" and p.is_file() and ".lit_accel" not in str(p))
    decoded = torch.stack([read_image_file(str(path), image_size) for path in files])
    # The training split is shuffled only for val/test draws; with none, the sorted file order.
    assert torch.equal(images, decoded)
    assert labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert dm._splits["val"][0].shape[0] == 0, "val_fraction 0: no validation"


def test_random_crop_and_cutout_follow_image_size(flat):
    dm = _module(flat, image_size=40, pipeline="dataloader", num_workers=0, random_crop=True, cutout=40)
    dm.setup("fit")
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape[-2:] == (40, 40)
    preload = _module(flat, image_size=40, random_crop=True)
    preload.setup("fit")
    assert preload.device_transform(preload._splits["train"][0], train=True).shape[-2:] == (40, 40)
    with pytest.raises(ValueError, match="cutout=41 is not allowed: use 0 \\(off\\) to 40 pixels"):
        _module(flat, image_size=40, cutout=41)


def test_predict_dir_is_read_at_the_image_size_set_before_setup(flat, tmp_path):
    write_images(tmp_path / "new", classes=("x",), per_class=2)
    dm = _module(flat, predict_dir=str(tmp_path / "new"))
    dm.image_size = 48  # as the CLI sets it from the checkpoint
    dm.setup("predict")
    images, names = next(iter(dm.predict_dataloader()))
    assert images.shape == (2, 3, 48, 48) and names == ["x/00.jpg", "x/01.png"]
    assert dm.classes is None and not (flat / ".lit_accel_cache").exists(), "the training folder is not read"


# ------------------------------------------------------------------------------------ the cache
def test_a_second_setup_loads_the_cache_without_decoding(flat, monkeypatch, caplog):
    first = _module(flat)
    first.setup("fit")
    _decoding_forbidden(monkeypatch)
    second = _module(flat)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        second.setup("fit")
    assert torch.equal(second._splits["train"][0], first._splits["train"][0])
    assert "decoding" not in caplog.text


def test_a_changed_folder_rebuilds_and_says_how_many_files_changed(flat, caplog):
    _module(flat).setup("fit")
    (flat / "dog" / "00.jpg").unlink()
    Image.new("RGB", (40, 40), (0, 255, 0)).save(flat / "dog" / "99.png")
    changed = flat / "cat" / "01.png"
    Image.new("RGB", (50, 40), (255, 0, 0)).save(changed)
    os.utime(changed, ns=(1, 1))  # a new modification time, whatever the clock's resolution
    dm = _module(flat, val_fraction=0.0)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert "3 files changed (1 added, 1 removed, 1 modified)" in caplog.text
    index = sorted(p.name for p in (flat / "cat").iterdir() if p.suffix != ".txt").index("01.png")
    assert torch.equal(dm._splits["train"][0][index], read_image_file(str(changed), 32))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _module(flat, image_size=40).setup("fit")
    assert "image_size changed (32 -> 40 px)" in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "other-version", "not-a-cache"])
def test_a_damaged_or_foreign_cache_is_rebuilt_with_one_warning(flat, damage, caplog):
    _module(flat).setup("fit")
    cache = flat / ".lit_accel_cache" / "all.pt"
    good = cache.read_bytes()
    if damage == "truncated":  # as a kill during a non-atomic write would leave it
        cache.write_bytes(good[: len(good) // 2])
    elif damage == "other-version":
        content = torch.load(cache, weights_only=True)
        content["format"] = CACHE_FORMAT + 1
        content["images"] = torch.zeros_like(content["images"])  # would be silently wrong if used
        torch.save(content, cache)
    else:
        torch.save({"format": CACHE_FORMAT, "images": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)}, cache)
    dm = _module(flat)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "decoding the images again" in warnings[0].getMessage()
    assert {"truncated": "cannot be read", "other-version": "another version", "not-a-cache": "damaged"}[
        damage
    ] in warnings[0].getMessage()
    assert cache.read_bytes() != b"" and torch.load(cache, weights_only=True)["format"] == CACHE_FORMAT
    fresh = _module(flat)
    fresh.setup("fit")
    assert torch.equal(dm._splits["train"][0], fresh._splits["train"][0])
    assert dm._splits["train"][0].float().std() > 10, "real pixels, not the planted zeros"


def test_the_cache_is_written_beside_its_name_and_renamed_into_place(tmp_path, monkeypatch):
    target = tmp_path / "c.pt"
    save_atomically({"format": 0}, str(target))
    seen = []

    def interrupted(source, destination):
        seen.append(Path(source))
        raise KeyboardInterrupt  # a kill before the rename

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_atomically({"format": 1, "images": torch.zeros(1000)}, str(target))
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".c.pt.") and seen[0].suffix == ".partial"
    assert torch.load(target, weights_only=True) == {"format": 0}, "the old file is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"], "no temporary file left"


def test_decoding_in_worker_processes_gives_the_same_tensor(flat, tmp_path, monkeypatch):
    one = _module(flat, cache_dir=str(tmp_path / "a"))
    one.setup("fit")
    monkeypatch.setattr(image_cache, "_DECODE_CHUNK_FILES", 4)  # several chunks, the last one short
    pool = _module(flat, cache_dir=str(tmp_path / "b"), decode_workers=2)
    pool.setup("fit")
    assert torch.equal(one._splits["train"][0], pool._splits["train"][0])
    assert (tmp_path / "b" / "all.pt").is_file() and not (flat / ".lit_accel_cache").exists()


def test_decoding_tasks_hold_up_to_128_files_and_about_4_mb_of_pixels():
    assert [image_cache.decode_chunk_files(size) for size in (32, 64, 128, 256, 4096)] == [128, 128, 85, 21, 1]


def test_a_read_only_cache_folder_names_cache_dir(flat, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(flat) else real_access(path, mode))
    with pytest.raises(ConfigurationError, match=r"read-only for this user\): pass --data.cache_dir DIR"):
        _module(flat).setup("fit")


# ------------------------------------------------------------------------------------ bad input
def test_an_unreadable_image_is_named_or_skipped_with_one_warning(flat, caplog):
    (flat / "dog" / "03.bmp").write_bytes(b"BM" + b"junk" * 10)
    jpeg = (flat / "fox" / "00.jpg").read_bytes()
    (flat / "fox" / "00.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # truncated
    with pytest.raises(DataNotFoundError) as error:
        _module(flat).setup("fit")
    message = str(error.value)
    assert str(flat / "dog" / "03.bmp") in message and "--data.skip_unreadable true" in message
    assert "\n" not in message
    dm = _module(flat, skip_unreadable=True, val_fraction=0.0)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 unreadable image files" in warnings[0]
    assert "dog/03.bmp" in warnings[0] and "fox/00.jpg" in warnings[0]
    assert dm._splits["train"][0].shape[0] == 16
    with pytest.raises(DataNotFoundError, match="dog/03.bmp is not a readable image"):
        _module(flat).setup("fit")  # the cache made with skipping is not used silently without it


def _bad(root: Path, case: str) -> Path:
    if case == "root-is-a-file":
        root.parent.mkdir(parents=True, exist_ok=True)
        root.write_text("x")
    elif case == "missing-root":
        pass
    elif case == "no-class-folders":
        root.mkdir(parents=True)
        (root / "readme.txt").write_text("x")
    elif case == "images-in-the-root":
        write_images(root)
        Image.new("RGB", (8, 8)).save(root / "loose.png")
    elif case == "single-class":
        write_images(root, classes=("cat",))
    elif case == "empty-class-folder":
        write_images(root)
        (root / "emu").mkdir()
        (root / "emu" / "notes.txt").write_text("no image")
    elif case == "train-is-a-file":
        root.mkdir(parents=True)
        (root / "train").write_text("x")
    elif case == "class-is-a-file":
        write_images(root / "train", classes=("cat", "dog"))
        write_images(root / "val", classes=("cat",))
        (root / "val" / "dog").write_text("x")
    elif case == "other-classes-in-val":
        write_images(root / "train", classes=("cat", "dog"))
        write_images(root / "val", classes=("cat", "cow"))
    return root


BAD_INPUT = {
    "root-is-a-file": "is a file, not a folder",
    "missing-root": "does not exist",
    "no-class-folders": "holds no class folders",
    "images-in-the-root": r"holds image files directly \(loose.png\): put them in one folder per class",
    "single-class": r"holds a single class folder \(cat/\): a classifier needs 2 or more classes",
    "empty-class-folder": "emu holds no image files",
    "train-is-a-file": "train/: .* is a file, not a folder",
    "class-is-a-file": "val/dog is a file, not a folder",
    "other-classes-in-val": r"val/ has other class folders than train/ \(missing: dog; not in train/: cow\)",
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_message(tmp_path, case):
    root = _bad(tmp_path / "data", case)
    with pytest.raises(DataNotFoundError, match=BAD_INPUT[case]) as error:
        _module(root).setup("fit")
    assert "\n" not in str(error.value)


def test_a_test_stage_without_test_images_says_how_to_get_some(flat):
    with pytest.raises(DataNotFoundError, match="add test/ .*--data.test_fraction above 0"):
        _module(flat).setup("test")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "test_fraction"),
        ({"decode_workers": -1}, "decode_workers"),
        ({"image_size": 4}, "image_size"),
        ({"root": ""}, "root"),
        ({"cache_dir": " "}, "cache_dir"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}=.* is not allowed"):
        ImageFolderDataModule(**kwargs)


# --------------------------------------------------------------------------- through the CLI
TESTS_DIR = Path(__file__).resolve().parents[1]  # faults.py, loaded by class path
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *FIGURES_OFF_ARGS]
TINY = ["--data.batch_size", "4", "--data.decode_workers", "0", "--data.val_fraction", "0.2"]
TINY += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]


def _weights(cli: LitAccelCLI) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}


def test_the_image_folder_config_trains_the_recipe_on_a_folder(in_tmp_dir):
    """configs/image_folder.yaml: the recipe (its callbacks, network, schedule) on a folder at 32 px;
    the checkpoint names the folder's classes."""
    write_images(in_tmp_dir / "photos")
    cli = LitAccelCLI(args=["fit", *config("image_folder.yaml"), *QUIET, *TINY, "--data.root", "photos"])
    assert cli.trainer.state.finished and torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    assert type(cli.datamodule).__name__ == "ImageFolderDataModule" and type(cli.model.net).__name__ == "LiteCNN"
    assert {"ThroughputMeter", "DivergenceGuard"} <= {type(c).__name__ for c in cli.trainer.callbacks}
    assert cli.datamodule.random_crop is False, "the recipe's data choices"
    last = in_tmp_dir / "runs" / "cifar10" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["class_names"] == ["cat", "dog", "fox"]
    assert (in_tmp_dir / "photos" / ".lit_accel_cache" / "all.pt").is_file()


# `--data ImageFolderDataModule` on the default recipe at 64 px with the recipe's LiteCNN, then predict
# and export of that checkpoint at its size: tests/test_image_sizes.py (its fixture).


def test_a_run_resumed_after_a_crash_ends_exactly_like_an_uninterrupted_one(tmp_path, monkeypatch):
    """2 epochs of 4 batches; the crashed run's last.ckpt is mid-epoch 1 (step 6): the resumed run
    trains on the rest of that epoch's batches and ends with the same weights to the bit."""
    write_images(tmp_path / "photos")
    run = ["fit", *config("image_folder.yaml"), *QUIET, *TINY, "--data.root", str(tmp_path / "photos")]
    run += [
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_train_batches",
        "4",
        "--step_checkpoint.every_n_train_steps",
        "3",
    ]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    uninterrupted = LitAccelCLI(args=run)
    assert uninterrupted.trainer.global_step == 8
    monkeypatch.chdir(tmp_path / "b")
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    with pytest.raises(RuntimeError, match="injected crash at step 7"):
        LitAccelCLI(args=[*run, "--trainer.callbacks+=faults.CrashAtStep", "--trainer.callbacks.step", "7"])
    last = tmp_path / "b" / "runs" / "cifar10" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 6
    resumed = LitAccelCLI(args=[*run, "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 8
    expected = _weights(uninterrupted)
    for name, value in _weights(resumed).items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.slow
def test_two_process_ddp_decodes_once_and_trains(tmp_path):
    """Local rank 0 decodes in prepare_data; both ranks load the cache in setup and train."""
    write_images(tmp_path / "photos")
    ddp = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    args = ["fit", *config("image_folder.yaml"), *QUIET, *TINY, "--data.root", "photos", *ddp]
    result = run_cli(args, cwd=tmp_path, timeout=240, env={"OMP_NUM_THREADS": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert output.count("decoding 18 images") == 1, output[-3000:]
    assert (tmp_path / "runs" / "cifar10" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_bad_input_through_the_cli_is_one_message_and_exit_2(in_tmp_dir, capsys):
    from lit_accel.cli import main

    write_images(in_tmp_dir / "photos", classes=("cat",))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config("image_folder.yaml"), *QUIET, *TINY, "--data.root", "photos"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lit-accel: error: data.root:") and "a classifier needs 2 or more classes" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
