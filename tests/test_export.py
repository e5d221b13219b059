"""``lit-accel-export``: artifacts that serve without lit_accel and predict what the checkpoint predicts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from helpers import config
from lit_accel.cli import LitAccelCLI
from lit_accel.data import CIFAR10_CLASSES
from lit_accel.data.augment import normalize
from lit_accel.errors import LitAccelUserError
from lit_accel.export import PT2_NAME, TORCHSCRIPT_NAME, export_checkpoint, export_model, main
from lit_accel.models import ImageClassifier

TOLERANCE = 1e-5

# Run in a fresh interpreter: any import of lit_accel fails, and the script checks none happened.
SERVE_WITHOUT_LIT_ACCEL = r"""
import importlib.abc, json, sys

class RefuseLitAccel(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "lit_accel":
            raise ImportError("lit_accel must not be needed to serve the artifacts")
        return None

sys.meta_path.insert(0, RefuseLitAccel())
import torch

folder, inputs = sys.argv[1], torch.load(sys.argv[2])
extra = {"metadata.json": ""}
pt2 = torch.export.load(f"{folder}/model.pt2", extra_files=extra).module()
script = torch.jit.load(f"{folder}/model.torchscript.pt")
with torch.inference_mode():
    outputs = {
        "pt2_uint8": [pt2(x) for x in inputs["uint8"]],
        "script_uint8": [script(x) for x in inputs["uint8"]],
        "script_float": [script(x) for x in inputs["float"]],
    }
outputs["classes"] = json.loads(extra["metadata.json"])["classes"]
assert "lit_accel" not in sys.modules, "lit_accel was imported"
torch.save(outputs, sys.argv[3])
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The best checkpoint of a tiny ``lit-accel fit`` smoke run."""
    root = tmp_path_factory.mktemp("fit")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr("sys.argv", ["lit-accel"])
        LitAccelCLI(
            args=[
                "fit",
                *config("cifar10.yaml", "smoke.yaml"),
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.enable_model_summary",
                "false",
                "--trainer.limit_train_batches",
                "2",
                "--trainer.limit_val_batches",
                "1",
            ]
        )
    return next((root / "runs").rglob("best-*.ckpt"))


def _expected(checkpoint: Path, images: torch.Tensor) -> torch.Tensor:
    """What the checkpoint predicts for uint8 images, the way ``lit-accel predict`` does (flip averaging included)."""
    model = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False).eval()
    with torch.no_grad():
        return torch.softmax(model.evaluation_logits(normalize(images)), dim=-1)


def test_console_script_is_installed() -> None:
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("lit-accel-export") == "lit_accel.export:main"


def test_artifacts_predict_like_the_checkpoint_in_a_process_without_lit_accel(
    checkpoint: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "exported"
    main([str(checkpoint), "--out_dir", str(out)])
    assert f"exported {checkpoint}" in capsys.readouterr().out
    assert (out / PT2_NAME).is_file() and (out / TORCHSCRIPT_NAME).is_file()
    assert json.loads((out / "metadata.json").read_text())["classes"] == list(CIFAR10_CLASSES)

    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator) for n in (1, 5, 9)]
    torch.save({"uint8": batches, "float": [b.float() / 255 for b in batches]}, tmp_path / "inputs.pt")
    serve = subprocess.run(
        [
            sys.executable,
            "-c",
            SERVE_WITHOUT_LIT_ACCEL,
            str(out),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "outputs.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert serve.returncode == 0, serve.stderr
    outputs = torch.load(tmp_path / "outputs.pt")
    assert outputs["classes"] == list(CIFAR10_CLASSES)
    for i, images in enumerate(batches):  # batch sizes 1, 5, 9: the batch dimension is dynamic
        expected = _expected(checkpoint, images)
        single_pass = torch.softmax(
            ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False).eval()(
                normalize(images)
            ),
            dim=-1,
        )
        assert not torch.allclose(single_pass, expected, atol=TOLERANCE), (
            "the recipe averages over flips: a single pass differs"
        )
        for kind in ("pt2_uint8", "script_uint8", "script_float"):
            got = outputs[kind][i]
            assert got.shape == (images.shape[0], 10)
            torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0, msg=f"{kind}, batch {images.shape[0]}")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_a_distributed_checkpoint_folder_exports_like_its_file(checkpoint: Path, tmp_path: Path) -> None:
    # The layout ModelParallelStrategy (configs/strategy/fsdp.yaml) writes: the weights as DCP
    # shards under "state_dict", everything else in meta.pt.
    import torch.distributed.checkpoint as dcp

    full = torch.load(checkpoint, map_location="cpu", weights_only=False)
    folder = tmp_path / "last.ckpt"
    dcp.save({"state_dict": full.pop("state_dict")}, checkpoint_id=folder, no_dist=True)
    full.pop("optimizer_states", None)
    torch.save(full, folder / "meta.pt")

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    written = export_checkpoint(str(folder), tmp_path / "out", formats=["pt2"])
    got = torch.export.load(str(written["pt2"])).module()(images)
    torch.testing.assert_close(got, _expected(checkpoint, images), atol=TOLERANCE, rtol=0)


@pytest.mark.filterwarnings(r"ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_any_network_exports_with_float_input(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 3))
    written = export_model(net, tmp_path, classes=["a", "b", "c"], input_dtype="float32")
    images = torch.rand(2, 3, 32, 32)
    expected = torch.softmax(net(normalize(images)), dim=-1)
    torch.testing.assert_close(
        torch.export.load(str(written["pt2"])).module()(images), expected, atol=TOLERANCE, rtol=0
    )
    torch.testing.assert_close(torch.jit.load(str(written["torchscript"]))(images), expected, atol=TOLERANCE, rtol=0)
    assert json.loads((tmp_path / "metadata.json").read_text())["classes"] == ["a", "b", "c"]


def test_an_export_of_one_format_leaves_no_artifact_of_earlier_weights(tmp_path: Path, capsys) -> None:
    """Both formats of one network, then only .pt2 of another into the same folder: the old
    TorchScript file would be the first network's beside metadata that describes the second."""
    first = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    export_model(first, tmp_path, classes=["a", "b"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json", PT2_NAME, TORCHSCRIPT_NAME]
    second = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    export_model(second, tmp_path, classes=["x", "y", "z"], formats=["pt2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json", PT2_NAME]
    assert f"removed {tmp_path / TORCHSCRIPT_NAME}" in capsys.readouterr().err
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    assert metadata["files"] == [PT2_NAME] and TORCHSCRIPT_NAME not in metadata["input"]
    assert metadata["classes"] == ["x", "y", "z"]


def test_the_old_kebab_case_options_still_work_with_one_deprecation_warning(
    checkpoint: Path, tmp_path: Path, capsys
) -> None:
    main(
        [
            str(checkpoint),
            "--out-dir",
            str(tmp_path / "out"),
            "--input-dtype=float32",
            "--format",
            "pt2",
            "--runs-dir",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert err.count("deprecated") == 1, err
    assert (
        "--out-dir, --input-dtype, --runs-dir are deprecated" in err
        and "use --out_dir, --input_dtype, --runs_dir" in err
    )
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert metadata["input"][PT2_NAME] == "float32 in [0, 1]"


def test_the_options_are_snake_case_like_lit_accel(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out
    assert "--out_dir" in usage and "--input_dtype" in usage and "--runs_dir" in usage
    assert "--out-dir" not in usage and "--input-dtype" not in usage


def _incomplete_distributed_checkpoint(folder: Path, checkpoint: Path) -> str:
    """An FSDP checkpoint folder whose weight shards are missing (a copy cut short)."""
    import torch.distributed.checkpoint as dcp

    full = torch.load(checkpoint, map_location="cpu", weights_only=False)
    dcp.save({"state_dict": full.pop("state_dict")}, checkpoint_id=folder, no_dist=True)
    full.pop("optimizer_states", None)
    torch.save(full, folder / "meta.pt")
    for shard in folder.glob("*.distcp"):
        shard.unlink()
    return str(folder)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_an_incomplete_checkpoint_folder_is_one_message(checkpoint: Path, tmp_path: Path, capsys) -> None:
    folder = _incomplete_distributed_checkpoint(tmp_path / "last.ckpt", checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        main([folder, "--out_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lit-accel-export: error: ") and "is not a readable distributed checkpoint" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def _write_checkpoint_without_net(path: Path) -> str:
    torch.save({"state_dict": {}, "hyper_parameters": {"num_classes": 10}}, path)
    return str(path)


def _write_checkpoint_of_an_unknown_class(path: Path) -> str:
    """A trusted package's class that does not exist: the rebuild fails in the argument parser."""
    import lightning

    hparams = {
        "net": {"class_path": "lit_accel.models.NoSuchNet"},
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
    }
    contents = {"state_dict": {}, "hyper_parameters": hparams, "pytorch-lightning_version": lightning.__version__}
    torch.save(contents, path)
    return str(path)


@pytest.mark.parametrize(
    ("make_argument", "message"),
    [
        (lambda d: str(d / "missing.ckpt"), "checkpoint '.*missing.ckpt' not found"),
        (
            lambda d: (d / "bad.ckpt").write_text("garbage") and str(d / "bad.ckpt"),
            "cannot be read .*not a torch checkpoint archive.*truncated, corrupted or not a Lightning checkpoint",
        ),
        (lambda d: str(d), "is a folder, not a checkpoint"),
        (lambda d: _write_checkpoint_without_net(d / "python.ckpt"), "does not record its network .*export_model"),
        (lambda d: "best", "no 'best' checkpoint found under .*runs/"),
        (
            lambda d: _write_checkpoint_of_an_unknown_class(d / "unknown.ckpt"),
            r"could not be rebuilt as a lit_accel ImageClassifier \(ArgumentError: ",
        ),
    ],
    ids=["missing", "corrupt", "plain-folder", "no-network", "no-run", "unknown-class"],
)
def test_user_errors_are_one_message_and_exit_status_2(tmp_path, make_argument, message, capsys) -> None:
    argument = make_argument(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([argument, "--out_dir", str(tmp_path / "out"), "--runs_dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lit-accel-export: error: ") and "Traceback" not in err and err.count("error:") == 1, err
    assert re.search(message, err), err


def test_bad_export_arguments(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    with pytest.raises(ValueError, match=r"formats=\['onnx'\] is not allowed"):
        export_model(net, tmp_path, formats=["onnx"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"input_dtype='float16' is not allowed"):
        export_model(net, tmp_path, input_dtype="float16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="classes has 3 names but the network has 2 outputs"):
        export_model(net, tmp_path, classes=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"mean=\[0.5\], std=\[0.2\] is not allowed: use 3 finite values"):
        export_model(net, tmp_path, mean=[0.5], std=[0.2])
    with pytest.raises(ValueError, match=r"std=\[0.2, 0.2, 0.0\] is not allowed"):
        export_model(net, tmp_path, std=[0.2, 0.2, 0.0])


@pytest.mark.parametrize("where", ["existing_file", "existing_file/sub"])
def test_an_output_path_that_is_a_file_is_one_message(where: str, checkpoint: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "existing_file").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main([str(checkpoint), "-o", str(tmp_path / where)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lit-accel-export: error: output folder") and "is a file" in err and "Traceback" not in err
    assert (tmp_path / "existing_file").read_text() == "keep me"


def test_a_failed_export_leaves_the_previous_artifacts_as_they_were(
    checkpoint: Path, tmp_path: Path, monkeypatch
) -> None:
    import lit_accel.export as export

    out = tmp_path / "exported"
    main([str(checkpoint), "-o", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("the trace failed")

    monkeypatch.setattr(export, "_export_torchscript", broken)
    renamed = [f"class{i}" for i in range(10)]  # different metadata: every new file would differ
    with pytest.raises(RuntimeError, match="the trace failed"):
        main([str(checkpoint), "-o", str(out), "--classes", *renamed])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "no new model.pt2 beside an old TorchScript"
    assert [p.name for p in tmp_path.iterdir()] == ["exported"], "no staging folder left behind"


# ------------------------------------------------------------------ the output folder: checked first, the user's kept
def test_a_folder_holding_the_users_own_files_is_refused_before_any_work(checkpoint: Path, tmp_path: Path, capsys):
    out = tmp_path / "serving"
    out.mkdir()
    (out / PT2_NAME).write_bytes(b"the user's own model")
    (out / "metadata.json").write_text('{"owner": "the user"}')
    with pytest.raises(SystemExit) as exit_info:
        main([str(checkpoint), "--format", "torchscript", "-o", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        f"lit-accel-export: error: output folder {out} holds files that are not an earlier lit-accel-export's "
        f"(metadata.json, {PT2_NAME}): an export there would replace or remove them. Pass a new or empty folder with "
        f"-o, or add --overwrite to replace {PT2_NAME}, {TORCHSCRIPT_NAME} and metadata.json there (other files are "
        "kept).\n"
    )
    assert (out / PT2_NAME).read_bytes() == b"the user's own model"
    assert (out / "metadata.json").read_text() == '{"owner": "the user"}'


@pytest.mark.filterwarnings(r"ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_overwrite_replaces_the_exports_file_names_and_keeps_the_rest(tmp_path: Path) -> None:
    (tmp_path / PT2_NAME).write_bytes(b"the user's own model")
    (tmp_path / "notes.txt").write_text("keep me")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    with pytest.raises(LitAccelUserError, match=f"not an earlier lit-accel-export's \\({PT2_NAME}, notes.txt\\)"):
        export_model(net, tmp_path, formats=["torchscript"])
    export_model(net, tmp_path, formats=["torchscript"], overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json", TORCHSCRIPT_NAME, "notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_an_output_folder_that_cannot_be_written_is_one_message_before_any_work(
    checkpoint: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """As root, mode bits stop nothing; os.access does report a read-only mount. The check asks it."""
    import lit_accel.export as export

    real_access = os.access
    read_only = tmp_path / "mounted"
    read_only.mkdir()

    def access(path, mode, **kwargs):
        if Path(path) == read_only and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(export, "load_classifier", lambda *a: pytest.fail("the checkpoint was loaded first"))
    with pytest.raises(SystemExit) as exit_info:
        main([str(checkpoint), "-o", str(read_only / "new" / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"lit-accel-export: error: output folder {read_only / 'new' / 'out'} cannot be written: {read_only} is not "
        "writable (read-only, or no permission). Pass a folder you can write in with -o.\n"
    )
    assert list(read_only.iterdir()) == []
