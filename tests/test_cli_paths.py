"""Where the ``lit-accel`` command reads and writes: ``--ckpt_path best|last`` with and without a
logger, and output paths that cannot be written (refused before any work, in one message)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from helpers import TINY_CLI_ARGS, config
from lit_accel.cli import LitAccelCLI, main

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


@pytest.mark.parametrize("inside_a_file", [False, True], ids=["existing-folder", "inside-a-file"])
def test_a_predictions_path_that_cannot_be_written_is_one_message_before_predicting(in_tmp_dir, capsys, inside_a_file):
    if inside_a_file:
        (in_tmp_dir / "notes.txt").write_text("a file")
        output, expected = "notes.txt/p.csv", f"{in_tmp_dir / 'notes.txt'} is a file"
    else:
        (in_tmp_dir / "out").mkdir()
        output, expected = "out", "predict_writer.output_path='out' is an existing folder: pass a file path"
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *SMOKE, "--predict_writer.output_path", output])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "predict_writer.output_path" in err and "Traceback" not in err, err
    assert "Predicting" not in err  # refused before the predict loop: no part or temporary file either
    assert sorted(p.name for p in in_tmp_dir.iterdir()) == (["notes.txt"] if inside_a_file else ["out"])


def test_a_default_root_dir_that_is_a_file_is_named_when_the_logger_is_off(in_tmp_dir, capsys):
    (in_tmp_dir / "afile").write_text("a file")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *SMOKE, "--trainer.logger", "false", "--trainer.default_root_dir", "afile"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{in_tmp_dir / 'afile'} is a file" in err and "Pass a path in trainer.default_root_dir" in err, err
    assert "save_dir" not in err and "Traceback" not in err
