"""Checkpoints are downloaded and shared: no file or folder may run code when lit-accel reads it.

Each crafted checkpoint carries a payload that creates a marker file when unpickled without
restriction. The tests first show that torch's own reader does run it (so the payload is real),
then that every lit-accel path refuses the checkpoint with one message and the marker never
appears.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from helpers import config
from lit_accel.checkpoints import check_import_paths, verify_distributed_checkpoint
from lit_accel.cli import LitAccelCLI
from lit_accel.cli import main as cli_main
from lit_accel.errors import CheckpointError
from lit_accel.export import main as export_main

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SMOKE = [*config("cifar10.yaml", "smoke.yaml"), *QUIET]


class Payload:
    """Unpickled without restriction, this creates the file ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory) -> Path:
    """``last.ckpt`` of a tiny finished ``lit-accel fit`` run."""
    root = tmp_path_factory.mktemp("fit")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr("sys.argv", ["lit-accel"])
        LitAccelCLI(args=["fit", *SMOKE, "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"])
    return root / "runs" / "cifar10" / "version_0" / "checkpoints" / "last.ckpt"


def _as_folder(checkpoint: Path, folder: Path, extra: dict | None = None) -> Path:
    """The checkpoint in the layout ModelParallelStrategy (configs/strategy/fsdp.yaml) writes: the
    weights and ``extra`` items as distributed-checkpoint shards, everything else in meta.pt."""
    import torch.distributed.checkpoint as dcp

    full = torch.load(checkpoint, map_location="cpu", weights_only=True)
    dcp.save({"state_dict": full.pop("state_dict"), **(extra or {})}, checkpoint_id=folder, no_dist=True)
    full.pop("optimizer_states", None)
    torch.save(full, folder / "meta.pt")
    return folder


def _crafted(kind: str, checkpoint: Path, tmp_path: Path, marker: Path) -> Path:
    folder = tmp_path / "last.ckpt"
    if kind == "shard item":  # a non-tensor item of a .distcp shard
        return _as_folder(checkpoint, folder, extra={"extra_state": Payload(str(marker))})
    _as_folder(checkpoint, folder)
    if kind == ".metadata":
        (folder / ".metadata").write_bytes(pickle.dumps(Payload(str(marker))))
    elif kind == "meta.pt":
        torch.save({"epoch": 0, "anything": Payload(str(marker))}, folder / "meta.pt")
    return folder


KINDS = [".metadata", "shard item", "meta.pt"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_payloads_are_real(kind, checkpoint_file, tmp_path):
    """Without lit-accel's check, reading the crafted folder runs the payload."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    marker = tmp_path / "ran"
    folder = _crafted(kind, checkpoint_file, tmp_path, marker)
    try:
        if kind == "meta.pt":
            torch.load(folder / "meta.pt", weights_only=False)  # how an older Lightning or torch read it
        else:
            _load_distributed_checkpoint(folder)
    except BaseException:  # noqa: BLE001 - a crafted .metadata is no index: the load fails (CheckpointException), after the payload ran
        pass
    assert marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_export_refuses_a_crafted_folder_without_running_it(kind, checkpoint_file, tmp_path, capsys):
    marker = tmp_path / "ran"
    folder = _crafted(kind, checkpoint_file, tmp_path, marker)
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(folder), "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "holds Python objects other than checkpoint data" in err and "nothing in it was run" in err
    assert "Traceback" not in err and "weights_only" not in err
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "out").exists(), "nothing is written for a refused checkpoint"


@pytest.mark.parametrize("kind", KINDS)
def test_the_check_admits_a_real_folder_and_refuses_each_crafted_one(kind, checkpoint_file, tmp_path):
    verify_distributed_checkpoint(str(_as_folder(checkpoint_file, tmp_path / "real")))
    marker = tmp_path / "ran"
    with pytest.raises(CheckpointError, match=f"refused.*|{kind}"):
        verify_distributed_checkpoint(str(_crafted(kind, checkpoint_file, tmp_path, marker)))
    assert not marker.exists()


def test_a_shard_item_stored_outside_the_folder_is_refused(checkpoint_file, tmp_path):
    """The item points at a real, readable file outside the folder (a copy of its own shard): only
    the where-check refuses it; the read itself would succeed."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    folder = _as_folder(checkpoint_file, tmp_path / "last.ckpt", extra={"note": "hello"})
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    moved = 0
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata):
            shutil.copy(folder / info.relative_path, tmp_path / "elsewhere.distcp")
            info.relative_path = "../elsewhere.distcp"
            moved += 1
    assert moved == 1
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="item note is stored outside the folder"):
        verify_distributed_checkpoint(str(folder))


def test_fit_and_test_refuse_a_crafted_folder_before_anything_loads(checkpoint_file, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "ran"
    folder = _crafted("shard item", checkpoint_file, tmp_path, marker)
    monkeypatch.chdir(tmp_path)
    for command in ("test", "fit"):
        with pytest.raises(SystemExit) as exit_info:
            cli_main([command, *SMOKE, "--ckpt_path", str(folder)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "holds Python objects other than checkpoint data" in err and "Traceback" not in err
    assert not marker.exists()


def test_a_real_folder_under_a_single_process_strategy_says_how_to_load_it(
    checkpoint_file, tmp_path, monkeypatch, capsys
):
    folder = _as_folder(checkpoint_file, tmp_path / "last.ckpt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["test", *SMOKE, "--ckpt_path", str(folder)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "only the FSDP strategy loads" in err and "configs/strategy/fsdp.yaml" in err and "lit-accel-export" in err
    assert "Traceback" not in err and "IsADirectoryError" not in err


def test_fsdp_test_refuses_a_crafted_folder_before_any_rank_starts(checkpoint_file, tmp_path, monkeypatch, capsys):
    """Under FSDP2 every rank loads the folder: the check runs before the ranks are launched, so
    none of them ever reads it (the run itself would launch them: here it fails the test)."""
    from functools import wraps

    from lightning.pytorch import Trainer

    @wraps(Trainer.test)  # the CLI reads its options from the signature
    def no_run(*args, **kwargs):
        raise AssertionError("the ranks were launched before the checkpoint was checked")

    monkeypatch.setattr(Trainer, "test", no_run)
    marker = tmp_path / "ran"
    folder = _crafted(".metadata", checkpoint_file, tmp_path, marker)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["test", *SMOKE, *config("strategy/fsdp.yaml"), "--trainer.devices", "2", "--ckpt_path", str(folder)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "holds Python objects other than checkpoint data" in err and "Traceback" not in err
    assert not marker.exists()


def test_a_crafted_checkpoint_file_is_refused_without_advice_to_trust_it(
    checkpoint_file, tmp_path, monkeypatch, capsys
):
    marker = tmp_path / "ran"
    contents = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
    contents["hyper_parameters"]["extra"] = Payload(str(marker))
    crafted = tmp_path / "crafted.ckpt"
    torch.save(contents, crafted)
    monkeypatch.chdir(tmp_path)
    for run in (
        lambda: cli_main(["test", *SMOKE, "--ckpt_path", str(crafted)]),
        lambda: export_main([str(crafted), "-o", "out"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "holds Python objects other than tensors and plain data" in err, err
        assert "weights_only" not in err and "will likely succeed" not in err
    assert not marker.exists()


def test_an_alias_never_picks_a_folder_that_is_not_a_checkpoint(checkpoint_file, tmp_path, monkeypatch, capsys):
    """``--ckpt_path last`` matches ``last.ckpt`` under runs/: a planted folder of that name is
    checked like any other and refused; the real run's file stays usable."""
    run = tmp_path / "runs" / "cifar10" / "version_0" / "checkpoints"
    run.mkdir(parents=True)
    shutil.copy(checkpoint_file, run / "last.ckpt")
    planted = tmp_path / "runs" / "cifar10" / "version_1" / "checkpoints" / "last.ckpt"
    planted.mkdir(parents=True)
    (planted / ".metadata").write_bytes(pickle.dumps(Payload(str(tmp_path / "ran"))))
    newer = (run / "last.ckpt").stat().st_mtime + 10
    os.utime(planted, (newer, newer))  # the planted one is the newest run's
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        cli_main(["test", *SMOKE, "--ckpt_path", "last"])
    assert "holds Python objects other than checkpoint data" in capsys.readouterr().err
    assert not (tmp_path / "ran").exists()


# ------------------------------------------------------------------ a checkpoint never picks code to import
@pytest.fixture
def marker_module(tmp_path, monkeypatch):
    """A module on the path (name, marker file) whose import creates the marker; it re-exports
    LiteCNN and AdamW, so a run that imported it could go on."""
    name = f"lit_accel_marker_{os.getpid()}"
    folder = tmp_path / "site"
    folder.mkdir()
    marker = tmp_path / "imported"
    (folder / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from lit_accel.models import LiteCNN\n"
        "from torch.optim import AdamW as Opt\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    yield name, marker
    sys.modules.pop(name, None)


def _naming(checkpoint: Path, folder: Path, key: str, value) -> Path:
    """The checkpoint with ``hyper_parameters[key]`` set to ``value`` (a class path dict or a string)."""
    contents = torch.load(checkpoint, map_location="cpu", weights_only=True)
    contents["hyper_parameters"][key] = value
    crafted = folder / f"names-{key}.ckpt"
    torch.save(contents, crafted)
    return crafted


CRAFTED_NAMES = {
    "test": ("net", lambda m: {"class_path": f"{m}.LiteCNN", "init_args": {"width": 16}}, "net.class_path"),
    "fit": ("optimizer", lambda m: {"class_path": f"{m}.Opt", "init_args": {"lr": 0.004}}, "optimizer.class_path"),
    "predict": ("net", lambda m: f"{m}.LiteCNN", "net"),  # a plain string: a class path too, to jsonargparse
}


@pytest.mark.parametrize("command", list(CRAFTED_NAMES))
def test_a_class_the_checkpoint_names_is_refused_before_it_is_imported(
    command, marker_module, checkpoint_file, tmp_path, monkeypatch, capsys
):
    name, marker = marker_module
    key, value, where = CRAFTED_NAMES[command]
    crafted = _naming(checkpoint_file, tmp_path, key, value(name))
    class_name = f"{name}.{'Opt' if key == 'optimizer' else 'LiteCNN'}"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, *SMOKE, "--ckpt_path", str(crafted)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"checkpoint {crafted} names '{class_name}' at hyper_parameters.{where}: refused, and nothing was imported"
        in err
    )
    assert f"name it yourself (e.g. --model.{key} {class_name})" in err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert not marker.exists() and name not in sys.modules, "the checkpoint's module was imported"


def test_export_refuses_a_class_the_checkpoint_names_in_one_message(marker_module, checkpoint_file, tmp_path, capsys):
    name, marker = marker_module
    crafted = _naming(checkpoint_file, tmp_path, "net", {"class_path": f"{name}.LiteCNN"})
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(crafted), "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lit-accel-export: error: checkpoint {crafted} names '{name}.LiteCNN' at ") and (
        "Traceback" not in err
    )
    assert not marker.exists() and name not in sys.modules
    assert not (tmp_path / "out").exists()


def test_a_class_the_users_own_command_names_is_allowed(marker_module, checkpoint_file, tmp_path, monkeypatch):
    """Naming the class on the command line is the user's own choice of code: the checkpoint may then name it."""
    name, marker = marker_module
    crafted = _naming(checkpoint_file, tmp_path, "net", {"class_path": f"{name}.LiteCNN", "init_args": {"width": 16}})
    monkeypatch.chdir(tmp_path)
    cli_main(["test", *SMOKE, "--model.net", f"{name}.LiteCNN", "--ckpt_path", str(crafted)])
    assert marker.exists()


def test_import_paths_are_checked_at_any_depth_against_packages_not_prefixes():
    hparams = {
        "net": {"class_path": "lit_accel.models.LiteCNN"},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"foreach": None}},
        "_instantiator": "lightning.pytorch.cli.instantiate_module",  # Lightning checks it itself
        "lr_scheduler_monitor": "val/loss",
    }
    check_import_paths({"hyper_parameters": hparams}, "x.ckpt")
    for key, value, where in (
        ("lr_scheduler", {"class_path": "torchx.Sched"}, "hyper_parameters.lr_scheduler.class_path"),
        ("callbacks", [{"init_args": {"inner": {"class_path": "evil.C"}}}], "callbacks[0].init_args.inner.class_path"),
        ("loss", "os.system", "hyper_parameters.loss"),
    ):
        with pytest.raises(CheckpointError, match=re.escape(where)):
            check_import_paths({"hyper_parameters": {**hparams, key: value}}, "x.ckpt")
    check_import_paths({"hyper_parameters": {**hparams, "loss": "os.system"}}, "x.ckpt", allowed={"os.system"})
    data = {"data_dir": "cifar10.v2", "transform": {"class_path": "evil.Data"}}  # a folder name is no class
    with pytest.raises(
        CheckpointError,
        match=r"names 'evil\.Data' at datamodule_hyper_parameters\.transform\.class_path.*--data\.transform",
    ):
        check_import_paths({"datamodule_hyper_parameters": data}, "x.ckpt")
    check_import_paths({"datamodule_hyper_parameters": {"data_dir": "cifar10.v2"}}, "x.ckpt")
