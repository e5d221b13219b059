"""``lit-accel COMMAND``: one entry point for fit, validate, test, predict, tune and export.

The commands themselves are tested in their own modules (test_cli, test_tune, test_export); here,
that each is reached with its arguments and its exit status, and that a wrong command is one message.
"""

from __future__ import annotations

import gc
import re
import runpy
import sys

import pytest

from lit_accel.commands import COMMANDS, main


def _exit_status(args: list[str]) -> int | str | None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


def test_help_lists_every_command(capsys):
    assert _exit_status(["--help"]) == 0
    listed = re.findall(r"^ {4}(\w+) ", capsys.readouterr().out, flags=re.MULTILINE)  # not wrapped help lines
    assert listed == ["fit", "validate", "test", "predict", "tune", "export"] == list(COMMANDS)


def test_python_dash_m_lit_accel_is_the_command(monkeypatch, capsys):
    """``python -m lit_accel`` (torchrun -m lit_accel) runs the same main, with tune and export, and
    like the ``lit-accel`` script (``commands.run``) first freezes what the imports created out of
    the garbage collector's walks."""
    frozen = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(len(capsys.readouterr().out)))
    monkeypatch.setattr(sys, "argv", ["lit_accel", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("lit_accel", run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "    tune " in out and "    export " in out
    assert frozen == [0], "frozen once, before the command printed anything"


@pytest.mark.parametrize("args", [[], ["fitt", "--config", "x.yaml"]], ids=["none", "misspelled"])
def test_a_missing_or_unknown_command_is_one_message_and_exit_2(args, capsys):
    assert _exit_status(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: lit-accel") and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("lit-accel: error: ")
    assert "use one of fit, validate, test, predict, tune, export" in err
    assert ("'fitt'" in err) is bool(args)


@pytest.mark.parametrize(
    "args",
    [
        ["fit", "--config", "a.yaml", "--trainer.max_epochs", "1"],
        ["validate", "--ckpt_path", "best"],
        ["test"],
        ["predict", "--data.predict_dir", "images"],
        ["--print_config", "fit"],  # LightningCLI's options before the subcommand
    ],
    ids=lambda args: args[0],
)
def test_lightning_commands_go_to_lightningcli_with_every_argument(args, monkeypatch):
    seen = []
    monkeypatch.setattr("lit_accel.cli.main", seen.append)
    main(args)
    assert seen == [args]


@pytest.mark.parametrize("status", [0, 2, 130, 143])
def test_tune_gets_its_arguments_and_its_exit_status_is_the_commands(status, monkeypatch):
    seen = []
    monkeypatch.setattr("lit_accel.tune.main", lambda argv: seen.append(argv) or status)
    assert _exit_status(["tune", "--config", "a.yaml", "--budget_s", "60"]) == status
    assert seen == [["--config", "a.yaml", "--budget_s", "60"]]


def test_tune_with_a_bad_argument_is_tunes_one_message(capsys):
    assert _exit_status(["tune", "--budget_s", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lit-accel tune: error: --budget_s=0.0 is not allowed") and len(err.splitlines()) == 1


def test_export_of_a_missing_checkpoint_is_exports_one_message(tmp_path, capsys):
    missing = tmp_path / "none.ckpt"
    assert _exit_status(["export", str(missing), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lit-accel-export: error: checkpoint '{missing}' not found") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
