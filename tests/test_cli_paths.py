"""Where the ``lit-accel`` command reads and writes: ``--ckpt_path best|last`` with and without a
logger, and every output path checked before any work (a file in the way, a read-only folder or
file: one message, exit 2)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from lightning.pytorch import Trainer

from helpers import TINY_CLI_ARGS, config
from lit_accel import cli
from lit_accel.cli import LitAccelCLI, check_output_file, check_output_folder, main
from lit_accel.errors import ConfigurationError

SMOKE = config("cifar10.yaml", "smoke.yaml") + [
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]
TINY = TINY_CLI_ARGS


def _other_experiments_run(root: Path) -> Path:
    """A newer run of another experiment below the working folder (unreadable files: used, they fail)."""
    folder = root / "runs" / "other" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    for name in ("last.ckpt", "best-epoch009-acc0.9900.ckpt"):
        (folder / name).write_bytes(b"another experiment's checkpoint")
    return folder


def test_without_a_logger_best_and_last_look_only_in_default_root_dir_checkpoints(in_tmp_dir, capsys):
    other = _other_experiments_run(in_tmp_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["test", *SMOKE, "--trainer.logger", "false", "--ckpt_path", "last"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"no 'last' checkpoint found under {in_tmp_dir / 'checkpoints'}/" in err and "Traceback" not in err, err

    fit = LitAccelCLI(args=["fit", *TINY, "--trainer.logger", "false", "--trainer.max_epochs", "2"])
    own = in_tmp_dir / "checkpoints"
    later = (own / "last.ckpt").stat().st_mtime + 10
    for path in other.iterdir():
        os.utime(path, (later, later))  # the other experiment's files are the newest
    for alias, expected in (("last", own / "last.ckpt"), ("best", fit.trainer.checkpoint_callback.best_model_path)):
        cli = LitAccelCLI(args=["test", *TINY, "--trainer.logger", "false", "--ckpt_path", alias])
        assert os.path.realpath(cli.config["test"]["ckpt_path"]) == os.path.realpath(expected), alias


def test_best_is_the_runs_recorded_best_with_a_file_name_of_ones_own(in_tmp_dir, caplog):
    """`--checkpoint.filename ep{epoch}` with three top-k files: `best` is the file the run's
    ModelCheckpoint recorded as best (there is no best-*.ckpt), and testing it warns of nothing."""
    args = ["--checkpoint.filename", "ep{epoch}", "--checkpoint.save_top_k", "3"]
    fit = LitAccelCLI(args=["fit", *TINY, *args, "--trainer.max_epochs", "3"])
    folder = in_tmp_dir / "runs" / "cifar10" / "version_0" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["ep0.ckpt", "ep1.ckpt", "ep2.ckpt", "last.ckpt"]
    with caplog.at_level(logging.WARNING, logger="lit_accel.cli"):
        test = LitAccelCLI(args=["test", *TINY, *args, "--ckpt_path", "best"])
    resolved = test.config["test"]["ckpt_path"]
    assert os.path.realpath(resolved) == os.path.realpath(fit.trainer.checkpoint_callback.best_model_path)
    assert not [r for r in caplog.records if r.name == "lit_accel.cli"], "a checkpoint was given: no warning"


# ------------------------------------------------------------- outputs checked before any work
def _read_only(monkeypatch, *paths: Path) -> None:
    """``os.access`` says "not writable" for ``paths``, as for a read-only mount: root ignores mode bits,
    so ``chmod`` cannot make a place read-only in a test run as root."""
    real_access = os.access
    refused = {os.path.abspath(p) for p in paths}

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and os.path.abspath(path) in refused:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


@pytest.mark.parametrize(
    ("make", "folder", "expected"),
    [
        (lambda root: (root / "precious.txt").write_text("keep"), "precious.txt/ck", "precious.txt is a file"),
        (lambda root: (root / "precious.txt").write_text("keep"), "precious.txt", "precious.txt is a file"),
        (lambda root: (root / "link").symlink_to(root / "gone"), "link/ck", "link is a broken symbolic link"),
        (lambda root: (root / "ro").mkdir(), "ro/new/ck", "ro is read-only for this user"),
        (lambda root: (root / "ro").mkdir(), "ro", "ro is read-only for this user"),
    ],
    ids=["inside-a-file", "is-a-file", "broken-link", "read-only-parent", "read-only"],
)
def test_an_output_folder_that_cannot_be_written_is_refused_by_name(in_tmp_dir, monkeypatch, make, folder, expected):
    make(in_tmp_dir)
    _read_only(monkeypatch, in_tmp_dir / "ro")
    with pytest.raises(ConfigurationError, match="checkpoint.dirpath") as error:
        check_output_folder(folder, "checkpoint.dirpath")
    assert expected in str(error.value)
    check_output_folder("fresh/deep/ck", "checkpoint.dirpath")  # folders that do not exist yet are fine
    check_output_folder(".", "checkpoint.dirpath")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("out", "predict_writer.output_path='out' is an existing folder: pass a file path"),
        ("notes.txt/p.csv", "notes.txt is a file"),
        ("old.csv", "predict_writer.output_path='old.csv' is a read-only file, so it is not replaced"),
        ("ro/p.csv", "ro is read-only for this user"),
    ],
    ids=["a-folder", "inside-a-file", "read-only-file", "in-a-read-only-folder"],
)
def test_an_output_file_that_cannot_be_written_is_refused_by_name(in_tmp_dir, monkeypatch, path, expected):
    (in_tmp_dir / "out").mkdir()
    (in_tmp_dir / "ro").mkdir()
    (in_tmp_dir / "notes.txt").write_text("a file")
    (in_tmp_dir / "old.csv").write_text("the user's")
    _read_only(monkeypatch, in_tmp_dir / "ro", in_tmp_dir / "old.csv")
    with pytest.raises(ConfigurationError, match="predict_writer.output_path") as error:
        check_output_file(path, "predict_writer.output_path")
    assert expected in str(error.value)
    check_output_file("new/p.csv", "predict_writer.output_path")
    check_output_file("notes.txt", "predict_writer.output_path")  # a writable file is replaced when complete


class _Reached(Exception):
    """Trainer.fit was called: every check before it had passed."""


GUARD_WITH_ITS_OWN_FILE = (
    "trainer:\n  callbacks:\n    - class_path: lit_accel.callbacks.DivergenceGuard\n"
    "      init_args:\n        checkpoint_path: div/d.ckpt\n"
)


@pytest.mark.parametrize("logger", [True, False], ids=["with-logger", "without-logger"])
def test_every_place_fit_writes_is_checked_before_training(in_tmp_dir, monkeypatch, logger):
    """Loggers' folder, both checkpoint folders, default_root_dir and a callback's own file: each is
    checked, under the setting a user would change, before Trainer.fit starts. Without a logger the
    checkpoints go to default_root_dir (the working folder unless set): it is checked."""
    checked: list[tuple[str, str]] = []
    monkeypatch.setattr(cli, "check_output_folder", lambda path, setting: checked.append((setting, path)))
    monkeypatch.setattr(cli, "check_output_file", lambda path, setting: checked.append((setting, path)))

    def fit(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(Trainer, "fit", fit)
    if logger:
        (in_tmp_dir / "guard.yaml").write_text(GUARD_WITH_ITS_OWN_FILE)
        args = ["--checkpoint.dirpath", "ck", "--step_checkpoint.dirpath", "steps", "--config", "guard.yaml"]
        args += ["--trainer.default_root_dir", "root", "--trainer.logger.init_args.save_dir", "logs"]
        expected = [
            ("checkpoint.dirpath", str(in_tmp_dir / "ck")),
            ("step_checkpoint.dirpath", str(in_tmp_dir / "steps")),
            ("trainer.callbacks (DivergenceGuard) checkpoint_path", "div/d.ckpt"),
            ("trainer.default_root_dir", "root"),
            ("trainer.logger.init_args.save_dir", os.path.join("logs", "cifar10")),
        ]
    else:
        args, expected = ["--trainer.logger", "false"], [("trainer.default_root_dir", os.getcwd())]
    with pytest.raises(_Reached):
        LitAccelCLI(args=["fit", *TINY, *args])
    assert sorted(checked) == expected


def test_a_checkpoint_folder_under_a_file_is_one_message_before_any_epoch(in_tmp_dir, capsys):
    (in_tmp_dir / "precious.txt").write_text("keep")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *TINY, "--checkpoint.dirpath", "precious.txt/ck"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"(checkpoint.dirpath) cannot be created: {in_tmp_dir / 'precious.txt'} is a file" in err, err
    assert "Traceback" not in err
    # Nothing started: no run folder (the logger makes it at fit's start), the file as it was.
    assert not (in_tmp_dir / "runs").exists()
    assert (in_tmp_dir / "precious.txt").read_text() == "keep"


def test_predictions_onto_a_read_only_file_are_refused_before_predicting(in_tmp_dir, monkeypatch, capsys):
    (in_tmp_dir / "p.csv").write_text("the user's\n")
    _read_only(monkeypatch, in_tmp_dir / "p.csv")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *SMOKE, "--predict_writer.output_path", "p.csv"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "predict_writer.output_path='p.csv' is a read-only file, so it is not replaced" in err, err
    assert "Traceback" not in err and "Predicting" not in err  # refused before the predict loop
    assert sorted(p.name for p in in_tmp_dir.iterdir()) == ["p.csv"]  # no part or temporary file
    assert (in_tmp_dir / "p.csv").read_text() == "the user's\n"
