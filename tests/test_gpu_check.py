"""tools/gpu_check.py works before a GPU is ever lent: its quick mode runs every section on the CPU."""

import json
import os
import socket

import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator

from lit_accel.cli import LitAccelCLI
from tools import gpu_check
from tools.bench import recipe as bench_recipe


def _accepted_by_fit(recipe_args, data_args, timeout):
    """The recipe harness's stand-in: the arguments gpu_check hands it must be a run ``fit`` accepts
    (the harness's own fit and test processes run in tests/test_bench.py); a 2-epoch curve back."""
    cli = LitAccelCLI(args=["--config", str(bench_recipe.RECIPE_CONFIG), *data_args, *recipe_args], run=False)
    assert cli.trainer.max_epochs == 2 and isinstance(cli.trainer.accelerator, CPUAccelerator)
    return {"fit_exit_code": 0, "fit_seconds": 9.0, "images_per_sec": 100.0, "train_seconds": 2.0,
            "curve": [(1.0, 4, 0.5), (2.0, 8, 0.6)], "test_acc": 0.55}  # fmt: skip


@pytest.mark.slow
def test_quick_mode_runs_every_section_and_writes_the_report(tmp_path, monkeypatch):
    """One quick run: the gpu tests, fits of the matrix, the whole recipe's arguments, and the
    plain-loop pairs (compiled and not), each with figures in report.json and a row in report.md.
    The fits are the plain one, the in-process FSDP2 one (the environment and port it must give
    back) and the GPU-only one (not run here): the other precision and strategy files run with the
    recipe in tests/test_configs.py."""
    fsdp_gpu = gpu_check.FITS[-1]
    monkeypatch.setattr(gpu_check, "FITS", (gpu_check.FITS[0], gpu_check.FITS[4], fsdp_gpu))
    monkeypatch.setattr(bench_recipe, "run_recipe", _accepted_by_fit)
    out = tmp_path / "report"
    port = gpu_check.free_port()
    monkeypatch.setenv("MASTER_PORT", str(port))  # as a ddp_fork test earlier in the suite leaves it
    assert gpu_check.main([str(out), "--quick"]) == 0
    # The in-process DDP/FSDP fits leave this process's environment as it was, and the port later
    # DDP runs inherit is not held by them (an in-process FSDP2 run keeps its rendezvous port).
    assert os.environ["MASTER_PORT"] == str(port)
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is fine
        probe.bind(("", port))
        probe.listen()
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "passed" and report["section_errors"] == {}
    sections = report["sections"]

    tests = sections["gpu_tests"]
    assert tests["files"] == ["tests/test_configs.py"] and tests["failed"] == 0
    if not torch.cuda.is_available():
        assert tests["passed"] == 0 and tests["skipped"] >= 2, "the gpu tests were collected and skipped here"

    fits = {row["fit"]: row for row in sections["fits"]}
    assert list(fits) == [name for name, *_ in gpu_check.FITS]
    for name, row in fits.items():
        if name.startswith("fsdp_gpu"):
            assert "needs a GPU" in row["not_run"]
            continue
        assert row["exit_status"] == 0, row
        assert row["images_per_sec"] > 0 and 0 <= row["data_wait"] < 1 and row["peak_memory_mb"] > 0
        assert 0 < row["mfu"] < 1, "ThroughputMeter's MFU reaches the report"

    (synthetic,) = sections["time_to_accuracy"]
    assert synthetic["exit_status"] == 0 and synthetic["test_acc"] == 0.55
    assert synthetic["seconds_to_target"] == float("inf"), "0.94 not reached: 'not reached' in the report"

    pairs = {(row["network"], row["compile"]): row for row in sections["versus_plain_loop"]}
    for key in [("SeedCNN", False), ("ResNet9 (GPU recipe)", False), ("SeedCNN", True)]:
        assert pairs[key]["ratio"] > 0 and pairs[key]["plain_images_per_sec"] > 0, key
    assert "quick mode" in pairs["ResNet9 (GPU recipe)", True]["not_run"]

    text = (out / "report.md").read_text()
    for heading in ("## gpu-marked tests", "## Short fits", "## Time to accuracy", "## lit-accel against"):
        assert heading in text
    assert text.count("| fsdp") == 2 and text.count("| synthetic |") == 1


def test_a_data_dir_adds_the_recipe_on_those_images(tmp_path, cifar10_root, monkeypatch):
    """The real-data run is the same harness (tests/test_bench.py runs it on a CIFAR-format
    folder); here: gpu_check hands it the folder after the synthetic run."""
    root, _ = cifar10_root
    calls = []

    def run_recipe(recipe_args, data_args, timeout):
        calls.append(data_args)
        return {"fit_exit_code": 0, "fit_seconds": 9.0, "images_per_sec": 100.0, "train_seconds": 2.0,
                "curve": [(1.0, 4, 0.5), (2.0, 8, 0.95)], "test_acc": 0.9}  # fmt: skip

    monkeypatch.setattr(gpu_check.bench_recipe, "run_recipe", run_recipe)
    plan = gpu_check.Plan.for_run(True, 60.0, 0.94, str(root))
    synthetic, real = gpu_check.time_to_accuracy(plan, gpu_check.Clock(60.0), tmp_path)
    assert "--data.synthetic" in calls[0] and calls[0][calls[0].index("--data.synthetic") + 1] == "true"
    assert calls[1][calls[1].index("--data.data_dir") + 1] == str(root.resolve())
    assert real["data"] == "real CIFAR-10" and real["seconds_to_target"] == 2.0 and real["test_acc"] == 0.9


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_and_without_quick_it_says_so_in_one_line(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu_check: this machine has no CUDA GPU") and "--quick" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "report").exists()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("report", "already holds a report"),
        ("file", "is a file"),
        ("no_cifar", "no cifar-10-batches-py/"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, setup, message):
    out = tmp_path / "report"
    args = [str(out), "--quick"]
    if setup == "report":
        out.mkdir()
        (out / "report.md").write_text("an earlier report")
    elif setup == "file":
        out.write_text("not a folder")
    else:
        args += ["--data_dir", str(tmp_path)]
    assert gpu_check.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    if setup == "report":
        assert (out / "report.md").read_text() == "an earlier report", "never overwritten"


def test_the_verdict_fails_on_any_failed_test_fit_or_section():
    passed = {
        "sections": {
            "gpu_tests": {"exit_status": 0, "failed": 0},
            "fits": [{"fit": "fp32", "exit_status": 0}, {"fit": "fsdp_gpu", "not_run": "needs a GPU"}],
            "time_to_accuracy": [{"data": "synthetic", "exit_status": 0}],
            "versus_plain_loop": [{"network": "SeedCNN", "compile": False, "ratio": 0.98}],
        },
        "section_errors": {},
    }
    assert gpu_check.verdict(passed) == "passed"
    broken = [
        ("gpu_tests", {"exit_status": 1, "failed": 1}),
        ("fits", [{"fit": "fp32", "exit_status": 1, "error": "exit 1"}]),
        ("time_to_accuracy", [{"data": "real CIFAR-10", "error": "... exited with 2"}]),
        ("versus_plain_loop", [{"network": "SeedCNN", "compile": True, "error": "RuntimeError: boom"}]),
    ]
    for section, value in broken:
        report = json.loads(json.dumps(passed))
        report["sections"][section] = value
        assert gpu_check.verdict(report) == "failed", section
    assert gpu_check.verdict({**passed, "section_errors": {"fits": "ValueError: x"}}) == "failed"
    # left out by the time budget: not a pass either
    for section, value in [
        ("gpu_tests", {"files": ["tests/test_configs.py"], "error": gpu_check.OUT_OF_TIME}),
        ("time_to_accuracy", [{"data": "real CIFAR-10", "not_run": gpu_check.OUT_OF_TIME}]),
        ("versus_plain_loop", [{"network": "ResNet9", "compile": True, "not_run": gpu_check.OUT_OF_TIME}]),
    ]:
        report = json.loads(json.dumps(passed))
        report["sections"][section] = value
        assert gpu_check.verdict(report) == "incomplete", section
    report = json.loads(json.dumps(passed))
    del report["sections"]["versus_plain_loop"]
    assert gpu_check.verdict(report) == "incomplete"


def test_the_report_is_written_after_every_section(tmp_path, monkeypatch):
    """A check stopped from outside (a machine's time limit) still leaves what it measured."""

    def section(name):
        def run(plan, clock, folder):
            if name == "versus_plain_loop":
                raise KeyboardInterrupt  # stopped from outside in the last section
            return [] if name != "gpu_tests" else {"exit_status": 0, "failed": 0}

        return run

    for name in gpu_check.SECTIONS:
        monkeypatch.setattr(gpu_check, name, section(name))
    plan = gpu_check.Plan.for_run(False, 60.0, 0.94, None)  # GPU mode: sections one after the other
    with pytest.raises(KeyboardInterrupt):
        gpu_check.run(plan, tmp_path, "python -m tools.gpu_check report")
    partial = json.loads((tmp_path / "report.json").read_text())
    assert list(partial["sections"]) == ["gpu_tests", "fits", "time_to_accuracy"]
    assert partial["verdict"].startswith("running") and "partial" in (tmp_path / "report.md").read_text()
