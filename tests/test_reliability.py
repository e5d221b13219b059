"""Resume after a crash, checkpoint on SIGTERM, determinism, multi-node, no hangs, bad input."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import config, free_port, lit_accel_command, read_scalars, run_cli
from lit_accel.cli import LitAccelCLI, main

TESTS_DIR = Path(__file__).resolve().parent
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SMOKE = [*config("cifar10.yaml", "smoke.yaml"), *QUIET]
FAULT_ENV = {"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}


def _final_weights(cli: LitAccelCLI) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}


def _last_checkpoint(root: Path, version: int) -> Path:
    return root / "runs" / "cifar10" / f"version_{version}" / "checkpoints" / "last.ckpt"


# --------------------------------------------------------------------------- crash and resume
RESUME_RUN = [*SMOKE, "--trainer.max_epochs", "2", "--step_checkpoint.every_n_train_steps", "3"]


DYNAMIC_SCHEDULE = """
trainer:
  callbacks+:
    - class_path: lit_accel.callbacks.DynamicBatchLR
      init_args:
        policy: none
        batch_size_schedule: {1: 96}
        lr_scaling: linear
"""


def test_run_resumed_after_a_crash_ends_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    """Recipe callbacks (meter, guard) plus DynamicBatchLR changing batch and LR at epoch 1."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    schedule = tmp_path / "dynamic.yaml"
    schedule.write_text(DYNAMIC_SCHEDULE)
    run = [*RESUME_RUN, "--config", str(schedule)]
    monkeypatch.chdir(tmp_path / "a")
    uninterrupted = LitAccelCLI(args=["fit", *run])
    assert uninterrupted.trainer.global_step == 16

    monkeypatch.chdir(tmp_path / "b")
    sys.path.insert(0, str(TESTS_DIR))
    crash = ["--trainer.callbacks+=faults.CrashAtStep", "--trainer.callbacks.step", "11"]
    with pytest.raises(RuntimeError, match="injected crash at step 11"):
        LitAccelCLI(args=["fit", *run, *crash])  # mid-epoch 1; last.ckpt is from step 9
    saved = torch.load(_last_checkpoint(tmp_path / "b", 0), weights_only=False)
    assert saved["global_step"] == 9 and saved["epoch"] == 1
    states = {key.split("{")[0] for key in saved["callbacks"]}
    assert {"ThroughputMeter", "DivergenceGuard", "DynamicBatchLR", "RNGStateCheckpoint"} <= states

    resumed = LitAccelCLI(args=["fit", *run, "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 16 and resumed.trainer.current_epoch == 2
    assert resumed.datamodule.batch_size == uninterrupted.datamodule.batch_size == 96
    # Same weights to the bit: optimizer, scheduler, data order, augmentation and dropout
    # randomness all continued where the crashed run left them.
    expected = _final_weights(uninterrupted)
    for name, value in _final_weights(resumed).items():
        assert torch.equal(value, expected[name]), name
    assert (
        resumed.trainer.optimizers[0].param_groups[0]["lr"] == uninterrupted.trainer.optimizers[0].param_groups[0]["lr"]
    )


def test_same_config_and_seed_give_identical_metrics(tmp_path, monkeypatch):
    results = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        cli = LitAccelCLI(args=["fit", *SMOKE, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3"])
        results.append({k: float(v) for k, v in cli.trainer.callback_metrics.items()})
    assert results[0] == results[1]
    assert "val/acc" in results[0]


# 2 epochs of 30 batches: 60 optimizer steps.
LONGER_RUN = [
    *SMOKE,
    "--data.synthetic_size",
    "2304",
    "--trainer.max_epochs",
    "2",
    "--trainer.limit_train_batches",
    "30",
]


ONE_EPOCH = ["--trainer.max_epochs", "1"]


def _start_fit(cwd: Path, extra: list[str]) -> subprocess.Popen:
    args = [
        *lit_accel_command(),
        "fit",
        *LONGER_RUN,
        "--trainer.callbacks+=faults.SleepEachStep",
        "--trainer.callbacks.seconds",
        "0.1",
        *extra,
    ]
    env = {**os.environ, **FAULT_ENV, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    time.sleep(0.3)  # let the writer finish the file


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_with_last(tmp_path, monkeypatch):
    """Killed mid-epoch 0 of a one-epoch run: the resume restores the loader's position in it."""
    process = _start_fit(tmp_path, ["--step_checkpoint.every_n_train_steps", "5", *ONE_EPOCH])
    _wait_for(_last_checkpoint(tmp_path, 0), process)
    process.kill()  # SIGKILL: nothing runs after this, no handler, no final checkpoint
    process.wait(timeout=30)
    killed_at = torch.load(_last_checkpoint(tmp_path, 0), weights_only=False)
    assert 0 < killed_at["global_step"] < 30 and killed_at["global_step"] % 5 == 0

    # The resume is a fresh process, as after a real kill.
    resumed = run_cli(["fit", *LONGER_RUN, *ONE_EPOCH, "--ckpt_path", "last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "--ckpt_path last: using runs/cifar10/version_0/checkpoints/last.ckpt" in resumed.stderr + resumed.stdout
    final = torch.load(_last_checkpoint(tmp_path, 1), weights_only=False)
    assert final["global_step"] == 30
    # Callback and data-loader state travelled too: the RNG states and the loader's position.
    assert any(key.startswith("RNGStateCheckpoint") for key in final["callbacks"])
    logged_steps = [step for step, _ in read_scalars(tmp_path / "runs" / "cifar10" / "version_1")["train/loss_step"]]
    assert min(logged_steps) >= killed_at["global_step"], "the resumed run continues, it does not start over"
    # It continued exactly: the weights are those of the run that was never killed (run here, in
    # this process: another interpreter would cost seconds), to the bit.
    (tmp_path / "uninterrupted").mkdir()
    monkeypatch.chdir(tmp_path / "uninterrupted")
    reference = LitAccelCLI(args=["fit", *LONGER_RUN, *ONE_EPOCH])
    assert reference.trainer.global_step == 30
    expected = _final_weights(reference)
    assert expected.keys() == final["state_dict"].keys()
    for name, value in final["state_dict"].items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path, monkeypatch):
    process = _start_fit(tmp_path, ["--step_checkpoint.every_n_train_steps", "0", "--trainer.log_every_n_steps", "1"])
    _wait_for(tmp_path / "runs" / "cifar10" / "version_0" / "hparams.yaml", process)
    time.sleep(1.0)  # mid-epoch 0
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 143, output[-3000:]
    assert "checkpoint saved to" in output and "Traceback" not in output
    assert "weights_only" not in output, "no notice that reads like a security warning"
    stopped = torch.load(_last_checkpoint(tmp_path, 0), weights_only=False)
    assert 0 < stopped["global_step"] < 30, "saved where it stopped, mid-epoch 0"

    # A few steps past it, in this process, are enough to show it resumes (the SIGKILL test above
    # resumes in a fresh process, to the end, and compares the weights with an uninterrupted run).
    target = stopped["global_step"] + 3
    monkeypatch.chdir(tmp_path)
    resumed = LitAccelCLI(args=["fit", *LONGER_RUN, "--ckpt_path", "last", "--trainer.max_steps", str(target)])
    assert Path(resumed.trainer.ckpt_path).resolve() == _last_checkpoint(tmp_path, 0).resolve()
    assert torch.load(_last_checkpoint(tmp_path, 1), weights_only=False)["global_step"] == target


def test_a_second_ctrl_c_during_the_batch_stops_at_once_without_a_checkpoint(tmp_path, monkeypatch, caplog):
    """The README's promise: Ctrl-C twice while a batch runs ends the run (exit status 1) with no
    checkpoint written for it (the step checkpoint from before stays as it was). In this process:
    the signals are real, sent to it by faults.SignalSelfAtStep after step 2."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    ctrl_c_twice = ["--trainer.callbacks+=faults.SignalSelfAtStep", "--trainer.callbacks.step", "2"]
    ctrl_c_twice += ["--trainer.callbacks.signum", str(int(signal.SIGINT)), "--trainer.callbacks.times", "2"]
    lightning_log = logging.getLogger("lightning.pytorch")  # it does not propagate to caplog's handler
    lightning_log.addHandler(caplog.handler)
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C from the interrupt on
    caplog.set_level(logging.INFO)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *SMOKE, "--step_checkpoint.every_n_train_steps", "2", *ctrl_c_twice])
    finally:
        signal.signal(signal.SIGINT, handler)
        lightning_log.removeHandler(caplog.handler)
    assert exit_info.value.code == 1
    output = caplog.text
    assert "press Ctrl-C again to abort now" in output and "Detected KeyboardInterrupt" in output
    assert "checkpoint saved to" not in output
    assert list(_last_checkpoint(tmp_path, 0).parent.iterdir()) == [_last_checkpoint(tmp_path, 0)]
    assert torch.load(_last_checkpoint(tmp_path, 0), weights_only=True)["global_step"] == 2


# --------------------------------------------------------------------------- multi-process
@pytest.mark.slow
def test_two_nodes_on_loopback_with_torchrun(tmp_path):
    port = free_port()
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    nodes = []
    for node_rank in (0, 1):
        node_dir = tmp_path / f"node{node_rank}"
        node_dir.mkdir()
        command = [
            torchrun,
            "--nnodes",
            "2",
            "--node-rank",
            str(node_rank),
            "--nproc-per-node",
            "1",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "-m",
            "lit_accel",
            "fit",
            *SMOKE,
            "--trainer.accelerator",
            "cpu",
            "--trainer.strategy",
            "ddp",
            "--trainer.num_nodes",
            "2",
            "--trainer.devices",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.limit_val_batches",
            "1",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        nodes.append(
            subprocess.Popen(
                command, cwd=node_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in outputs[0]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    assert _last_checkpoint(tmp_path / "node0", 0).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("failing_rank", [0, 1])
def test_exception_on_one_ddp_rank_ends_both_processes(tmp_path, failing_rank):
    marker = f"faulttest{failing_rank}{os.getpid()}"
    args = [
        "fit",
        *SMOKE,
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.max_epochs",
        "3",
        "--trainer.callbacks+=faults.CrashAtStep",
        "--trainer.callbacks.step",
        "3",
        "--trainer.callbacks.rank",
        str(failing_rank),
        "--trainer.logger.init_args.name",
        marker,
    ]
    # A rank left waiting in a collective would wait for its 30-minute timeout: the limit catches that.
    try:
        result = run_cli(args, cwd=tmp_path, timeout=120, env=FAULT_ENV)
    except subprocess.TimeoutExpired:
        pytest.fail("the job had not ended 120 s after it started, with one rank failed at step 3")
    assert result.returncode != 0
    assert f"injected crash at step 3 on rank {failing_rank}" in result.stderr
    # A rank still alive 2 s after the job ended outlived it.
    deadline = time.monotonic() + 2
    while (leftovers := _processes_named(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not leftovers, "a rank outlived the failed job"


def _processes_named(marker: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A folder with one finished run (the recipe's BatchNormCNN) whose files must survive every bad command."""
    root = tmp_path_factory.mktemp("finished")
    before = os.getcwd()
    os.chdir(root)  # in this process: a second interpreter would cost seconds
    try:
        main(["fit", *SMOKE, "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"])
    finally:
        os.chdir(before)
    checkpoints = root / "runs" / "cifar10" / "version_0" / "checkpoints"
    data = (checkpoints / "last.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (root / "corrupted.ckpt").write_bytes(b"not a checkpoint" * 100)
    # Without hyperparameters (as a model built in Python saves it), nothing rebuilds the network the
    # weights belong to: a checkpoint file, `best` or `last` otherwise brings its own (issue #13).
    contents = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    contents.pop("hyper_parameters")
    torch.save(contents, root / "weights_only.ckpt")
    return root


def _fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


BAD_INPUTS = {
    "unknown config key": (
        ["fit", *SMOKE, "--trainer.max_epochz", "3"],
        "unrecognized arguments: --trainer.max_epochz",
    ),
    "wrong type": (["fit", *SMOKE, "--trainer.max_epochs", "three"], 'Parser key "trainer.max_epochs"'),
    "negative learning rate": (["fit", *SMOKE, "--model.optimizer.lr", "-0.1"], "Invalid learning rate: -0.1"),
    "zero learning rate": (["fit", *SMOKE, "--model.optimizer.lr", "0"], "use a positive learning rate"),
    "batch size 0": (["fit", *SMOKE, "--data.batch_size", "0"], "batch_size=0 is not allowed"),
    "validation as large as training": (["fit", *SMOKE, "--data.val_size", "1024"], "val_size=1024 is not allowed"),
    "missing config file": (["fit", "--config", "configs/nope.yaml"], "no shipped config of that name"),
    "data missing, no network": (
        ["fit", *config("cifar10.yaml"), *QUIET, "--data.data_dir", "nowhere"],
        "CIFAR-10 not found",
    ),
    "truncated checkpoint": (["test", *SMOKE, "--ckpt_path", "truncated.ckpt"], "cannot be read"),
    "corrupted checkpoint": (["test", *SMOKE, "--ckpt_path", "corrupted.ckpt"], "cannot be read"),
    "checkpoint of another network": (
        ["test", *SMOKE, "--model.net", "lit_accel.models.SeedCNN", "--ckpt_path", "weights_only.ckpt"],
        "different network",
    ),
    "checkpoint of the same network at another width": (
        ["test", *SMOKE, "--model.net.width", "8", "--ckpt_path", "weights_only.ckpt"],
        "of other shapes (e.g. net.",
    ),
    "fsdp_gpu without a GPU": (["fit", *SMOKE, *config("strategy/fsdp_gpu.yaml")], "no usable CUDA GPU"),
    "more devices than the machine has": (
        ["fit", *SMOKE, "--trainer.accelerator", "cpu", "--trainer.devices", "512"],
        "trainer.devices=512",
    ),
    "NaN learning rate (SGD accepts it)": (
        ["fit", *SMOKE, "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", ".nan"],
        "lr=nan is not allowed: use a finite number",
    ),
    "infinite learning rate": (["fit", *SMOKE, "--model.optimizer.lr", ".inf"], "lr=inf is not allowed"),
    "NaN momentum": (
        ["fit", *SMOKE, "--model.optimizer", "torch.optim.SGD", "--model.optimizer.momentum", ".nan"],
        "momentum=nan is not allowed",
    ),
    "NaN gradient clipping": (
        ["fit", *SMOKE, "--trainer.gradient_clip_val", ".nan"],
        "gradient_clip_val=nan is not allowed",
    ),
    "NaN scheduler factor": (
        [
            "fit",
            *SMOKE,
            "--model.lr_scheduler",
            "torch.optim.lr_scheduler.ExponentialLR",
            "--model.lr_scheduler.gamma",
            ".nan",
        ],
        "gamma=nan is not allowed",
    ),
    "NaN warm-up": (
        ["fit", *SMOKE, "--model.lr_scheduler.warmup_fraction", ".nan"],
        "warmup_fraction=nan is not allowed",
    ),
    "batch growth that starts after the last epoch": (
        ["fit", *SMOKE, *config("dynamic_progress.yaml"), "--trainer.max_epochs", "1"],
        "0.4 of a 1-epoch run starts at epoch 1, after the last epoch (0): the batch can grow only in a run of 2",
    ),
    "batch growth to no more than the starting batch": (
        ["fit", *SMOKE, *config("dynamic_progress.yaml"), "--data.batch_size", "512", "--trainer.max_epochs", "5"],
        "cannot grow the batch: the run starts at 512 samples per optimizer step",
    ),
    "zero CPU threads": (["fit", *SMOKE, "--num_threads", "0"], "num_threads=0 is not allowed"),
    "log folder inside a file": (
        ["fit", *SMOKE, "--trainer.logger.init_args.save_dir", "corrupted.ckpt/logs"],
        "corrupted.ckpt is a file",
    ),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU cases assume a machine without a GPU")
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_message(case, finished_run, monkeypatch, no_network, capsys):
    args, expected = BAD_INPUTS[case]
    monkeypatch.chdir(finished_run)
    before = _fingerprint(finished_run / "runs" / "cifar10" / "version_0")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err and len(err.splitlines()) <= 12, err
    assert _fingerprint(finished_run / "runs" / "cifar10" / "version_0") == before, (
        "a bad command changed a finished run"
    )


def test_bad_input_through_the_console_script(finished_run):
    result = run_cli(["fit", *SMOKE, "--data.batch_size", "0"], cwd=finished_run)
    assert result.returncode == 2
    assert "lit-accel: error: batch_size=0 is not allowed" in result.stderr and "Traceback" not in result.stderr
