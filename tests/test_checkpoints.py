"""LastAfterEveryValidation: last.ckpt holds the newest state, whatever the monitored metric does;
check_checkpoint on a network of another shape; find_checkpoint picks the newest run, and its best
as the run recorded it."""

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


# ------------------------------------------------------------------ find_checkpoint: best as the run recorded it
class ScriptedAccuracy(BoringModel):
    """Logs val/acc from a script, one value per epoch: the best epoch is known in advance."""

    def __init__(self, accuracies: list[float]) -> None:
        super().__init__()
        self.accuracies = accuracies

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", self.accuracies[self.current_epoch])
        return super().validation_step(batch, batch_idx)


def _fit_top_k(default_root_dir, filename: str, accuracies: list[float], logger=False) -> LastAfterEveryValidation:
    checkpoint = LastAfterEveryValidation(
        monitor="val/acc", mode="max", save_top_k=len(accuracies), save_last=True, filename=filename
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        default_root_dir=default_root_dir,
        callbacks=[checkpoint],
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=len(accuracies),
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    trainer.fit(ScriptedAccuracy(accuracies))
    return checkpoint


@pytest.mark.parametrize("filename", ["best-{epoch}", "ep{epoch}"])
def test_best_is_the_checkpoint_the_run_recorded_not_the_newest_top_k_file(tmp_path, filename):
    """save_top_k 4 keeps four files; the best (epoch 1) is neither the newest nor, with a file name
    of one's own, called best-*: the run's ModelCheckpoint record says which it is."""
    checkpoint = _fit_top_k(tmp_path, filename, [0.5, 0.9, 0.6, 0.7])
    folder = tmp_path / "checkpoints"
    assert len(list(folder.glob("*.ckpt"))) == 5  # four top-k files and last.ckpt
    best = folder / (filename.replace("{epoch}", "epoch=1") + ".ckpt")
    assert os.path.realpath(checkpoint.best_model_path) == os.path.realpath(best)
    assert find_checkpoint(str(tmp_path), "best", recursive=False) == str(best)


def test_best_from_a_relative_record_and_from_an_fsdp_folders_meta(tmp_path, monkeypatch):
    """A logger's relative save_dir makes the record relative to the training's working folder: it is
    matched from another working folder too. An FSDP checkpoint folder keeps the record in meta.pt."""
    from lightning.pytorch.loggers import CSVLogger

    monkeypatch.chdir(tmp_path)
    _fit_top_k(".", "top-{epoch}", [0.9, 0.1, 0.2], logger=CSVLogger("runs", name="exp"))
    folder = tmp_path / "runs" / "exp" / "version_0" / "checkpoints"
    monkeypatch.chdir(folder)  # resolved from elsewhere, with an absolute root
    assert find_checkpoint(str(tmp_path / "runs"), "best") == str(folder / "top-epoch=0.ckpt")

    # The same run saved as FSDP2 folders: meta.pt holds everything but the weights.
    last = folder / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    last.unlink()
    last.mkdir()
    torch.save({k: v for k, v in state.items() if k != "state_dict"}, last / "meta.pt")
    assert find_checkpoint(str(tmp_path / "runs"), "best") == str(folder / "top-epoch=0.ckpt")


def _record(path, best_model_path: str, key: str = "LastAfterEveryValidation{'monitor': 'val/acc'}") -> None:
    state = {"monitor": "val/acc", "best_model_path": best_model_path}
    torch.save({"state_dict": {}, "callbacks": {key: state}}, path)


def test_a_record_naming_a_file_outside_the_run_or_no_file_is_not_used(tmp_path):
    """The record is trusted only for a file that is there, in the run's folder; otherwise the newest
    best-*.ckpt, as before."""
    root = tmp_path / "runs"
    run = _fake_run(root, 0, "best-epoch001-acc0.8000.ckpt", when=1_000_000)
    own = root / "version_0" / "checkpoints" / "other.ckpt"
    elsewhere = tmp_path / "elsewhere" / "other.ckpt"  # the same name, in another folder
    for path in (own, elsewhere):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (500_000, 500_000))
    for recorded in (str(elsewhere), str(own.with_name("gone.ckpt")), "other.ckpt"):
        _record(run["last"], recorded)
        assert find_checkpoint(str(root), "best") == run["best"], recorded
    _record(run["last"], str(own))
    assert find_checkpoint(str(root), "best") == str(own)


def test_without_a_logger_only_the_root_checkpoints_folder_is_searched(tmp_path):
    """Lightning without a logger saves in default_root_dir/checkpoints/; another experiment's runs
    below the same folder are not this run's."""
    other = _fake_run(tmp_path / "runs" / "other", 0, "best-epoch004-acc0.9000.ckpt", when=2_000_000)
    assert find_checkpoint(str(tmp_path), "last") == other["last"]  # what a recursive search finds
    assert find_checkpoint(str(tmp_path), "last", recursive=False) is None
    assert find_checkpoint(str(tmp_path), "best", recursive=False) is None
    own = tmp_path / "checkpoints"
    own.mkdir()
    (own / "last.ckpt").write_bytes(b"x")
    os.utime(own / "last.ckpt", (1_000_000, 1_000_000))  # older than the other experiment's
    assert find_checkpoint(str(tmp_path), "last", recursive=False) == str(own / "last.ckpt")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_an_fsdp_folder_under_one_process_offers_export_only_for_serving(tmp_path):
    """The folder loads under the FSDP strategy; lit-accel-export writes serving files, not a
    checkpoint that lit-accel loads, so it is not offered as a way to load the folder."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "last.ckpt"
    dcp.save({"state_dict": {"w": torch.zeros(2)}}, checkpoint_id=folder, no_dist=True)
    torch.save({"epoch": 0}, folder / "meta.pt")
    with pytest.raises(CheckpointError) as caught:
        check_checkpoint(str(folder), ImageClassifier(LiteCNN(width=8)))
    message = str(caught.value)
    assert "add --config configs/strategy/fsdp.yaml --trainer.devices N" in message
    assert f"To serve the model outside lit-accel, 'lit-accel-export {folder} -o DIR'" in message
    assert "not checkpoints lit-accel loads" in message and "export it to one file" not in message


def test_without_a_logger_only_this_runs_hpc_checkpoints_are_last(tmp_path):
    """Lightning writes SLURM requeue checkpoints into default_root_dir for every run there; without a
    logger, only one whose ModelCheckpoint saved in default_root_dir/checkpoints/ is this run's."""

    def hpc(name: str, dirpath, when: float):
        path = tmp_path / name
        torch.save({"state_dict": {}, "callbacks": {"ModelCheckpoint{}": {"dirpath": str(dirpath)}}}, path)
        os.utime(path, (when, when))
        return str(path)

    own = hpc("hpc_ckpt_1.ckpt", tmp_path / "checkpoints", when=1_000_000)
    hpc("hpc_ckpt_2.ckpt", tmp_path / "runs" / "other" / "version_0" / "checkpoints", when=2_000_000)
    assert find_checkpoint(str(tmp_path), "last", hpc_dir=str(tmp_path), recursive=False) == own


class _Payload:
    """Unpickled without restriction, this creates the file ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("layout", ["file", "fsdp folder"])
def test_reading_the_best_record_runs_nothing_in_a_crafted_checkpoint(tmp_path, layout):
    """The record is read with weights_only: a payload in last.ckpt (or an FSDP folder's meta.pt) is
    refused unrun, and best falls back to the newest best-*.ckpt."""
    marker = tmp_path / "ran"
    root = tmp_path / "runs"
    run = _fake_run(root, 0, "best-epoch001-acc0.8000.ckpt", when=1_000_000)
    crafted = {"state_dict": {}, "callbacks": {"LastAfterEveryValidation{}": _Payload(str(marker))}}
    if layout == "file":
        torch.save(crafted, run["last"])
    else:
        os.remove(run["last"])
        os.mkdir(run["last"])
        torch.save(crafted, os.path.join(run["last"], "meta.pt"))
    assert find_checkpoint(str(root), "best") == run["best"]
    assert not marker.exists()
