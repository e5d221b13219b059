"""``lit-accel predict --data.predict_dir DIR``: a folder of ordinary image files → a CSV of predictions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import config, run_cli
from lit_accel.cli import LitAccelCLI, main
from lit_accel.data import CIFAR10_CLASSES, CIFAR10DataModule
from lit_accel.data.augment import normalize
from lit_accel.data.image_folder import read_image_file
from lit_accel.models import ImageClassifier

SMOKE = config("cifar10.yaml", "smoke.yaml") + ["--trainer.enable_progress_bar", "false"]
GOOD = ["a_wide.png", "b_tall.jpg", "c_gray.png", "photos/d_alpha.png"]


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "photos").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (20, 50, 3), dtype=np.uint8)).save(root / "a_wide.png")
    Image.fromarray(rng.integers(0, 256, (97, 33, 3), dtype=np.uint8)).save(root / "b_tall.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(root / "c_gray.png")
    Image.fromarray(rng.integers(0, 256, (48, 64, 4), dtype=np.uint8)).save(root / "photos" / "d_alpha.png")
    (root / "readme.txt").write_text("not an image")
    return root


@pytest.mark.slow
def test_predict_a_folder_of_image_files_to_csv(in_tmp_dir: Path) -> None:
    LitAccelCLI(args=["fit", *SMOKE, "--trainer.enable_model_summary", "false", "--trainer.limit_train_batches", "2"])
    folder = _image_folder(in_tmp_dir / "to_classify")

    result = run_cli(
        [
            "predict",
            *SMOKE,
            "--ckpt_path",
            "best",
            "--data.predict_dir",
            str(folder),
            "--predict_writer.output_path",
            "out/predictions.csv",
        ],
        cwd=in_tmp_dir,
    )
    assert result.returncode == 0, result.stderr
    assert "skipped readme.txt: not a readable image" in result.stderr

    with open(in_tmp_dir / "out" / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "predicted", "probability", "top2", "top2_probability", "top3", "top3_probability"]
    assert [row[0] for row in rows[1:]] == sorted(GOOD)

    # The same numbers as the checkpoint's model on the documented resize rule + normalization.
    best = next((in_tmp_dir / "runs").rglob("best-*.ckpt"))
    model = ImageClassifier.load_from_checkpoint(best, map_location="cpu", weights_only=False).eval()
    images = torch.stack([read_image_file(str(folder / name)) for name in sorted(GOOD)])
    with torch.no_grad():
        expected = torch.softmax(
            model.evaluation_logits(normalize(images)), dim=-1
        )  # flip averaging, as the recipe says
    values, indices = expected.topk(3, dim=1)
    for row, top_values, top_indices in zip(rows[1:], values.tolist(), indices.tolist()):
        assert row[1::2] == [CIFAR10_CLASSES[i] for i in top_indices]
        assert [float(x) for x in row[2::2]] == pytest.approx(top_values, abs=2e-6)


def test_a_folder_without_readable_images_keeps_the_predictions_a_user_had(in_tmp_dir: Path, capsys) -> None:
    LitAccelCLI(args=["fit", *SMOKE, "--trainer.enable_model_summary", "false", "--trainer.limit_train_batches", "2"])
    folder = in_tmp_dir / "only_text"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    (folder / "list.csv").write_text("a,b\n")
    keep = in_tmp_dir / "keep.csv"
    keep.write_text("file,predicted,probability\n" + "".join(f"img{i}.png,cat,0.9\n" for i in range(10)))
    before = keep.read_bytes()

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # lit-accel's entry point, in this process
        main(
            [
                "predict",
                *SMOKE,
                "--ckpt_path",
                "best",
                "--data.predict_dir",
                str(folder),
                "--predict_writer.output_path",
                str(keep),
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "nothing was predicted: none of the files in" in err and "Traceback" not in err
    assert keep.read_bytes() == before
    assert sorted(p.name for p in in_tmp_dir.glob("keep.csv*")) == ["keep.csv"], "no temporary or part files left"


def test_predicting_a_folder_needs_only_the_checkpoint_and_the_images(
    in_tmp_dir: Path, no_network, recwarn, capsys
) -> None:
    """The recipe's own config (CIFAR-10, not synthetic) on a machine without CIFAR-10 or network:
    predict reads the checkpoint and the images, nothing else, and is not a new run."""
    LitAccelCLI(args=["fit", *SMOKE, "--trainer.enable_model_summary", "false", "--trainer.limit_train_batches", "2"])
    folder = _image_folder(in_tmp_dir / "to_classify")
    recwarn.clear()

    main(
        [
            "predict",
            *config("cifar10.yaml"),
            "--trainer.enable_progress_bar",
            "false",
            "--ckpt_path",
            "best",
            "--data.predict_dir",
            str(folder),
        ]
    )

    assert "CIFAR-10 not found" not in capsys.readouterr().err
    assert not (in_tmp_dir / "data").exists(), "CIFAR-10 was looked for"
    with open(in_tmp_dir / "predictions.csv", newline="") as f:  # the writer's default path
        assert [row[0] for row in csv.reader(f)][1:] == sorted(GOOD)
    assert sorted(p.name for p in (in_tmp_dir / "runs" / "cifar10").iterdir()) == ["version_0"], "no new run folder"
    assert not (in_tmp_dir / "config.yaml").exists()
    messages = [str(w.message) for w in recwarn]
    assert not any("dirpath has changed" in m or "callbacks used to create the checkpoint" in m for m in messages), (
        messages
    )


def _three_class_cifar_folder(root: Path) -> Path:
    """Your own data in CIFAR-10's on-disk format: 3 classes with their own names, 5 x 12 training
    images and 12 test images."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (12, 3072), dtype=np.uint8), "labels": [i % 3 for i in range(12)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["cow", "pig", "hen"]}, protocol=2))
    return root


@pytest.mark.slow
def test_a_model_trained_on_your_own_classes_names_them_in_predictions_and_exports(in_tmp_dir: Path) -> None:
    """Predicting a folder reads no training data: the names come with the checkpoint, also to
    lit-accel-export (before, CIFAR-10's names, or a refusal for 3 classes)."""
    from lit_accel.export import METADATA_NAME, export_checkpoint

    own = _three_class_cifar_folder(in_tmp_dir / "own")
    three = ["--model.num_classes", "3", "--model.net.num_classes", "3", "--data.verify_checksums", "false"]
    fit = ["--data.synthetic", "false", "--data.data_dir", str(own), "--data.val_size", "12"]
    LitAccelCLI(args=["fit", *SMOKE, *three, *fit, "--trainer.enable_model_summary", "false"])
    folder = _image_folder(in_tmp_dir / "to_classify")
    laptop = ["--data.synthetic", "false", "--data.data_dir", str(in_tmp_dir / "nothing_here")]
    main(["predict", *SMOKE, *three, *laptop, "--ckpt_path", "best", "--data.predict_dir", str(folder)])
    with open(in_tmp_dir / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert [row[0] for row in rows] == sorted(GOOD)
    assert {name for row in rows for name in row[1::2]} == {"cow", "pig", "hen"}

    best = next((in_tmp_dir / "runs").rglob("best-*.ckpt"))
    export_checkpoint(str(best), in_tmp_dir / "exported", formats=["torchscript"])
    metadata = json.loads((in_tmp_dir / "exported" / METADATA_NAME).read_text())
    assert metadata["classes"] == ["cow", "pig", "hen"]


# ------------------------------------------------------------------ the test split, one process and DDP
# The smoke config's synthetic set with a 40-image test split in batches of 16 (16 + 16 + 8; under
# 2-process DDP 20 per rank: 16 + 4), every batch predicted.
TEST_SPLIT = [
    *SMOKE,
    "--trainer.enable_model_summary",
    "false",
    "--data.synthetic_test_size",
    "40",
    "--data.eval_batch_size",
    "16",
    "--trainer.limit_predict_batches",
    "1.0",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A folder with one short run of the smoke config; returns its best checkpoint."""
    root = tmp_path_factory.mktemp("tiny_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr("sys.argv", ["lit-accel"])
        LitAccelCLI(
            args=[
                "fit",
                *TEST_SPLIT,
                "--data.synthetic_size",
                "320",
                "--data.val_size",
                "64",
                "--trainer.limit_train_batches",
                "2",
                "--trainer.limit_val_batches",
                "1",
            ]
        )
    return next(root.rglob("best-*.ckpt"))


def _check_test_split_rows(csv_path: Path, checkpoint: Path) -> None:
    """One row per test image, index = its position in the data set, with that image's label and the
    checkpoint's prediction for it."""
    data = CIFAR10DataModule(synthetic=True, synthetic_test_size=40)  # the config's seed and split
    data.setup("test")
    split = data.split_dataset("test")
    model = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False).eval()
    with torch.no_grad():
        probabilities = torch.softmax(model.evaluation_logits(normalize(split.images)), dim=-1)
    with open(csv_path, newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header[:4] == ["index", "label", "predicted", "probability"]
    assert [int(row[0]) for row in rows] == list(range(40)), "each data set index exactly once, in order"
    for row in rows:
        index, label, predicted, probability = int(row[0]), row[1], row[2], float(row[3])
        assert label == CIFAR10_CLASSES[int(split.labels[index])], row
        expected = probabilities[index]
        assert probability == pytest.approx(float(expected.max()), abs=5e-6), row
        assert probability == pytest.approx(float(expected[CIFAR10_CLASSES.index(predicted)]), abs=5e-6), row


def test_predicting_the_test_split_numbers_rows_by_data_set_index(tiny_run: Path, in_tmp_dir: Path) -> None:
    main(["predict", *TEST_SPLIT, "--ckpt_path", str(tiny_run), "--predict_writer.output_path", "test.csv"])
    _check_test_split_rows(in_tmp_dir / "test.csv", tiny_run)


@pytest.mark.slow
def test_predicting_the_test_split_under_ddp_writes_each_index_once(tiny_run: Path, tmp_path: Path) -> None:
    """2 processes (gloo, CPU) through the real CLI: each rank predicts every other image (0, 2, … and
    1, 3, …); the merged file still has each data set index once, with that image's prediction."""
    ddp = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    args = ["predict", *TEST_SPLIT, *ddp, "--ckpt_path", str(tiny_run), "--predict_writer.output_path", "ddp.csv"]
    result = run_cli(args, cwd=tmp_path, timeout=180, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 40 predictions" in result.stderr + result.stdout
    _check_test_split_rows(tmp_path / "ddp.csv", tiny_run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.csv"], "no part files left, no run folder"
