"""LastAfterEveryValidation: last.ckpt holds the newest state, whatever the monitored metric does;
check_checkpoint on a network of another shape; find_checkpoint picks the newest run."""

import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from lit_accel.checkpoints import LastAfterEveryValidation, check_checkpoint, find_checkpoint
from lit_accel.errors import CheckpointError
from lit_accel.models import ImageClassifier, LiteCNN


class FlatAccuracy(BoringModel):
    """Logs the same val/acc every epoch: only the first validation is a new best."""

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", 0.5)
        return super().validation_step(batch, batch_idx)


def _fit(tmp_path, **trainer_kwargs) -> dict:
    checkpoint = LastAfterEveryValidation(
        dirpath=tmp_path, monitor="val/acc", mode="max", save_top_k=1, save_last=True, enable_version_counter=False
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=4,
        limit_val_batches=2,
        **trainer_kwargs,
    )
    trainer.fit(FlatAccuracy())
    return {"final_step": trainer.global_step, "last": torch.load(tmp_path / "last.ckpt", weights_only=False)}


def test_last_follows_validations_that_do_not_improve(tmp_path):
    run = _fit(tmp_path, max_epochs=3)
    assert run["last"]["global_step"] == run["final_step"] == 12  # not 4, the step of the only best


def test_last_is_the_final_state_when_fit_ends_between_validations(tmp_path):
    run = _fit(tmp_path, max_steps=6, val_check_interval=4)
    assert run["last"]["global_step"] == run["final_step"] == 6


# ------------------------------------------------------------------ check_checkpoint: same class, other width
def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def test_the_same_network_at_another_width_names_the_weight_and_the_runs_config(tmp_path):
    """A width-16 LiteCNN checkpoint for a width-8 LiteCNN: same weight names, other shapes."""
    run = tmp_path / "runs" / "cifar10" / "version_3"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")  # LightningCLI's copy of the run's config
    path = run / "checkpoints" / "last.ckpt"
    trained, configured = ImageClassifier(LiteCNN(width=16)), ImageClassifier(LiteCNN(width=8))
    torch.save({"state_dict": trained.state_dict()}, path)
    found, expected = _shapes(trained), _shapes(configured)
    assert found.keys() == expected.keys()
    mismatched = sorted(name for name in expected if found[name] != expected[name])

    with pytest.raises(CheckpointError) as caught:
        check_checkpoint(str(path), configured)
    message = str(caught.value)
    first = mismatched[0]
    assert f"{len(mismatched)} of other shapes (e.g. {first}: {found[first]} vs {expected[first]})" in message
    assert "missing" not in message and "unknown" not in message
    assert f"--config {run / 'config.yaml'}" in message, message

    check_checkpoint(str(path), ImageClassifier(LiteCNN(width=16)))  # the width it was trained with passes


def test_a_checkpoint_outside_a_run_folder_says_where_the_config_lies(tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save({"state_dict": ImageClassifier(LiteCNN(width=16)).state_dict()}, path)
    (tmp_path / "config.yaml").write_text("model: {}\n")  # not the checkpoint's run: not offered
    with pytest.raises(CheckpointError, match=r"of other shapes \(e\.g\. net\.") as caught:
        check_checkpoint(str(path), ImageClassifier(LiteCNN(width=8)))
    assert "its run folder holds config.yaml (--config runs/<name>/version_<n>/config.yaml)" in str(caught.value)


# ------------------------------------------------------------------ find_checkpoint: the newest of two runs
def _fake_run(root, version: int, best: str, when: float) -> dict[str, str]:
    folder = root / f"version_{version}" / "checkpoints"
    folder.mkdir(parents=True)
    files = {"last": str(folder / "last.ckpt"), "best": str(folder / best)}
    for path in files.values():
        with open(path, "wb") as f:
            f.write(b"checkpoint")
        os.utime(path, (when, when))
    return files


def test_best_and_last_are_the_newest_runs_files(tmp_path):
    """version_1 ran after version_0: its files are the ones --ckpt_path best|last means, even though
    version_0's best score was higher and its folder sorts first."""
    root = tmp_path / "runs" / "cifar10"
    old = _fake_run(root, 0, "best-epoch004-acc0.9000.ckpt", when=1_000_000)
    new = _fake_run(root, 1, "best-epoch000-acc0.5000.ckpt", when=2_000_000)
    assert find_checkpoint(str(root), "last") == new["last"]
    assert find_checkpoint(str(root), "best") == new["best"]
    # Resumed later, the older run is the newest again: "newest" is when a checkpoint was written.
    os.utime(old["last"], (3_000_000, 3_000_000))
    assert find_checkpoint(str(root), "last") == old["last"]
    assert find_checkpoint(str(root), "best") == new["best"]
