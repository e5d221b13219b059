"""LastAfterEveryValidation: last.ckpt holds the newest state, whatever the monitored metric does;
check_checkpoint on a network of another shape; find_checkpoint picks the newest run, and its best
as the run recorded it."""

import errno
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from helpers import TINY_CLI_ARGS, config
from lit_accel.checkpoints import (
    AtomicCheckpointIO,
    LastAfterEveryValidation,
    check_checkpoint,
    find_checkpoint,
    read_checkpoint,
    run_checkpoints,
    save_atomically,
)
from lit_accel.cli import LitAccelCLI, main
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


def test_best_of_two_runs_that_each_recorded_one_is_the_newer_runs(tmp_path):
    """Each run's last.ckpt records its own best, named so that no best-*.ckpt fallback can answer:
    the newer run's record decides, whichever run folder sorts first."""
    root = tmp_path / "runs"
    runs = {}
    for version, when in ((0, 2_000_000), (1, 1_000_000)):  # version_0 ran last (a resumed run)
        folder = root / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        best = folder / f"top-run{version}.ckpt"
        best.write_bytes(b"x")
        _record(folder / "last.ckpt", str(best))
        for path in (best, folder / "last.ckpt"):
            os.utime(path, (when, when))
        runs[version] = str(best)
    assert find_checkpoint(str(root), "best") == runs[0]
    os.utime(root / "version_1" / "checkpoints" / "last.ckpt", (3_000_000, 3_000_000))
    assert find_checkpoint(str(root), "best") == runs[1]


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


# ------------------------------------------------------------------ atomic saves: a kill, a full disk
TESTS_DIR = Path(__file__).resolve().parent
STEP_SAVES = [
    "--trainer.limit_train_batches",
    "2",
    "--trainer.num_sanity_val_steps",
    "0",
    "--step_checkpoint.every_n_train_steps",
    "1",
]


def _last(root: Path) -> Path:
    return root / "runs" / "cifar10" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.mark.skipif(
    not os.path.isdir("/dev/shm"), reason="needs a tmpfs at /dev/shm for a TMPDIR on another filesystem"
)
def test_a_kill_while_last_ckpt_is_put_in_place_leaves_the_previous_one_readable(tmp_path):
    """TMPDIR on tmpfs, as on many clusters: a save that stages its file there must copy it into
    place, and a SIGKILL during that copy truncates last.ckpt. The run is killed at the moment its
    second last.ckpt is put in place (faults.KillAtCheckpointMove); the first stays readable."""
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        assert os.stat(shm).st_dev != os.stat(tmp_path).st_dev, "TMPDIR must be on another filesystem"
        # A fresh interpreter, not os.fork(): a fork of a process whose torch thread pool is
        # running can deadlock in the child.
        child = (
            "import sys; from helpers import TINY_CLI_ARGS; from lit_accel.cli import LitAccelCLI; "
            "LitAccelCLI(args=['fit', *TINY_CLI_ARGS, *sys.argv[1:]]); sys.exit(1)"  # exit 1: the kill never came
        )
        kill = ["--trainer.callbacks+=faults.KillAtCheckpointMove", "--trainer.callbacks.save", "2"]
        env = {**os.environ, "TMPDIR": str(shm), "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), *sys.path])}
        done = subprocess.run(
            [sys.executable, "-c", child, *STEP_SAVES, *kill], cwd=tmp_path, env=env, capture_output=True, timeout=240
        )
        assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
        staged = list(shm.iterdir())
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    assert read_checkpoint(str(_last(tmp_path)))["global_step"] == 1
    assert staged == [], "nothing is staged in TMPDIR"


@pytest.fixture(scope="module")
def full_disk_run(tmp_path_factory) -> dict:
    """A fit whose disk fills up while its second last.ckpt is written (os.write raises ENOSPC
    for that file's temporary copy); the first last.ckpt is written normally."""
    root = tmp_path_factory.mktemp("full_disk")
    real_open, real_write = os.open, os.write
    failing: set[int] = set()

    def tracking_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if os.path.basename(os.fspath(path)).startswith(".last.ckpt.") and _last(root).exists():
            failing.add(fd)
        return fd

    def full_write(fd, data):
        if fd in failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(sys, "argv", ["lit-accel"])
        patch.setattr(os, "open", tracking_open)
        patch.setattr(os, "write", full_write)
        stderr = io.StringIO()
        patch.setattr(sys, "stderr", stderr)
        try:
            main(["fit", *TINY_CLI_ARGS, *STEP_SAVES])
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
    return {"code": code, "stderr": stderr.getvalue(), "root": root, "failed_writes": len(failing)}


def test_a_full_disk_mid_run_is_one_message_and_keeps_the_previous_checkpoint(full_disk_run):
    last = _last(full_disk_run["root"])
    assert full_disk_run["failed_writes"] == 1
    assert full_disk_run["code"] == 2, full_disk_run["stderr"][-3000:]
    errors = [line for line in full_disk_run["stderr"].splitlines() if line.startswith("lit-accel: error:")]
    assert errors == [
        f"lit-accel: error: checkpoint {last} could not be saved (ENOSPC: No space left on device); the previous "
        f"last.ckpt, if any, is unchanged. Free space or fix the permissions of {last.parent} (or choose another "
        "--checkpoint.dirpath), then run the same command with --ckpt_path last to resume."
    ]
    assert "Traceback" not in full_disk_run["stderr"]
    assert read_checkpoint(str(last))["global_step"] == 1
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"], "the temporary file is removed"


# ------------------------------------------------------------------ --ckpt_path last when last.ckpt is unreadable
def test_last_falls_back_to_the_newest_readable_checkpoint_of_the_run(
    full_disk_run, tmp_path, monkeypatch, caplog, capsys
):
    folder = _last(tmp_path).parent
    folder.mkdir(parents=True)
    older, newer = folder / "best-epoch000-acc0.1000.ckpt", folder / "step-2.ckpt"
    shutil.copy(_last(full_disk_run["root"]), older)
    newer.write_bytes(b"")  # newer, unreadable too
    (folder / "last.ckpt").write_bytes(b"")  # what a kill during a cross-filesystem copy left
    for when, path in ((1_000_000, older), (2_000_000, newer), (3_000_000, folder / "last.ckpt")):
        os.utime(path, (when, when))
    other_run = _last(tmp_path).parents[1].with_name("version_1") / "checkpoints"
    other_run.mkdir(parents=True)
    shutil.copy(older, other_run / "other.ckpt")
    os.utime(other_run / "other.ckpt", (500_000, 500_000))  # readable, but another run's
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lit_accel.cli"):
        cli = LitAccelCLI(args=["test", *TINY_CLI_ARGS, "--ckpt_path", "last"])
    warned = [r.getMessage() for r in caplog.records if r.name == "lit_accel.cli"]
    assert warned == [
        f"--ckpt_path last: {os.path.relpath(folder / 'last.ckpt')} cannot be read (ValueError: not a torch checkpoint "
        f"archive); using {older} instead, the newest readable checkpoint of the same run."
    ]
    assert cli.config_init["test"]["ckpt_path"] == str(older)

    older.write_bytes(b"")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["test", *TINY_CLI_ARGS, "--ckpt_path", "last"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    assert "No other checkpoint of that run (runs/cifar10/version_0/checkpoints) can be read either." in err, err


def test_the_run_of_an_unreadable_hpc_checkpoint_is_the_experiments_newest(tmp_path):
    """SLURM's hpc_ckpt_<n>.ckpt lies in default_root_dir; when it cannot be read, which run wrote it
    cannot be read either: the other candidates are the experiment's hpc files and newest run's files."""
    root = tmp_path / "runs"
    old = _fake_run(root, 0, "best-a.ckpt", when=1_000_000)
    new = _fake_run(root, 1, "best-b.ckpt", when=2_000_000)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"")
    assert set(run_checkpoints(str(hpc), str(root), hpc_dir=str(tmp_path))) == set(new.values())
    assert run_checkpoints(new["last"], str(root), hpc_dir=str(tmp_path)) == [new["best"]]
    assert old["last"] not in run_checkpoints(str(hpc), str(root), hpc_dir=str(tmp_path))


def test_a_save_replaces_the_file_whole_and_clears_what_a_killed_save_of_it_left(tmp_path):
    target = tmp_path / "last.ckpt"
    save_atomically({"state_dict": {"w": torch.ones(1)}}, target)
    stale = tmp_path / ".last.ckpt.0badc0de.partial"  # a save killed before its rename
    stale.write_bytes(b"half a checkpoint")
    another = tmp_path / ".best.ckpt.0badc0de.partial"  # another file's: not this save's to remove
    another.write_bytes(b"x")
    save_atomically({"state_dict": {"w": torch.zeros(1)}}, target)
    assert torch.equal(read_checkpoint(str(target))["state_dict"]["w"], torch.zeros(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [another.name, "last.ckpt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask, "permissions as a plain open() would give"


@pytest.mark.parametrize("strategy", ["ddp.yaml", "fsdp.yaml"])
def test_the_cli_saves_atomically_under_every_cpu_strategy(strategy, tmp_path, monkeypatch):
    """The kill and full-disk tests above run one process; DDP and FSDP2 save through their own
    strategy objects (FSDP2 only when consolidating: its folder checkpoints bypass CheckpointIO)."""
    monkeypatch.chdir(tmp_path)
    args = [*TINY_CLI_ARGS, *config(f"strategy/{strategy}"), "--trainer.devices", "2"]
    cli = LitAccelCLI(args=args, run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# --------------------------------------------- FSDP2 folder checkpoints: staged, then swapped in
def _folder_strategy(monkeypatch, write):
    """An FSDP2Strategy of one process whose distributed save is ``write(folder)`` (no process group)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lit_accel.strategies import FSDP2Strategy

    monkeypatch.setattr(ModelParallelStrategy, "save_checkpoint", lambda self, ckpt, path, opts=None: write(Path(path)))
    strategy = FSDP2Strategy()
    monkeypatch.setattr(strategy, "broadcast", lambda obj, src=0: obj)
    monkeypatch.setattr(strategy, "barrier", lambda name=None: None)
    return strategy


def _shards(folder: Path, step: int, complete: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__0_0.distcp").write_text(f"step {step}")
    if not complete:
        raise KeyboardInterrupt("killed while writing the shards")
    (folder / "meta.pt").write_text(f"step {step}")


def test_a_folder_checkpoint_killed_while_written_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "last.ckpt"
    _folder_strategy(monkeypatch, lambda path: _shards(path, 1)).save_checkpoint({}, target)
    assert (target / "meta.pt").read_text() == "step 1"
    with pytest.raises(KeyboardInterrupt):
        _folder_strategy(monkeypatch, lambda path: _shards(path, 2, complete=False)).save_checkpoint({}, target)
    assert sorted(p.name for p in target.iterdir()) == ["__0_0.distcp", "meta.pt"]
    assert {p.read_text() for p in target.iterdir()} == {"step 1"}
    _folder_strategy(monkeypatch, lambda path: _shards(path, 3)).save_checkpoint({}, target)
    assert {p.read_text() for p in target.iterdir()} == {"step 3"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"], "no staging or old folder is left"


def test_a_swap_cut_between_its_renames_still_resolves_last(tmp_path, monkeypatch):
    """Killed after the old folder was moved aside and before the new one was put in place: the
    folder aside is complete, and --ckpt_path last finds it."""
    from lit_accel.strategies import swap_into_place

    run = tmp_path / "runs" / "exp" / "version_0" / "checkpoints"
    _shards(run / "last.ckpt", 1)
    _shards(run / ".last.ckpt.partial", 2)
    real_replace = os.replace
    calls = []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        swap_into_place(run / ".last.ckpt.partial", run / "last.ckpt")
    assert not (run / "last.ckpt").exists()
    assert find_checkpoint(str(tmp_path / "runs"), "last") == str(run / ".last.ckpt.old")
