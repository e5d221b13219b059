"""SLURM auto-requeue: Lightning's hpc_ckpt_<n>.ckpt (saved on SIGUSR1) is what ``--ckpt_path last`` resumes.

SLURM is simulated: its environment variables (so Lightning detects a SLURMEnvironment with
auto-requeue) and a fake ``scontrol`` on PATH that records the requeue and then kills the job
with SIGKILL, as a requeued job is killed, before it can write anything else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import config, free_port, lit_accel_command
from lit_accel.cli import LitAccelCLI

# smoke.yaml alone: the default logger (runs/lit_accel/) and no recipe callbacks, only the requeue path.
SMOKE = config("smoke.yaml") + ["--trainer.enable_progress_bar", "false"]
SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "train",  # not "bash"/"interactive", which Lightning treats as no SLURM
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29531",
}
FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "$SCONTROL_LOG"
kill -KILL "$PPID"
"""


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            out, err = process.communicate(timeout=30) if process.poll() is not None else ("", "")
            raise AssertionError(f"gave up waiting (exit {process.poll()}):\n{err[-3000:]}")
        time.sleep(0.05)


@pytest.mark.slow
def test_a_requeued_job_relaunched_with_last_resumes_from_the_hpc_checkpoint(in_tmp_dir: Path, monkeypatch) -> None:
    bin_dir = in_tmp_dir / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(FAKE_SCONTROL)
    scontrol.chmod(0o755)
    env = {
        **SLURM_ENV,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SCONTROL_LOG": str(in_tmp_dir / "scontrol.log"),
    }
    # Long enough to be signalled mid-run; last.ckpt every 3 steps; no validation to write others.
    run = [
        "fit",
        *SMOKE,
        "--trainer.max_epochs",
        "50",
        "--trainer.limit_val_batches",
        "0",
        "--step_checkpoint.every_n_train_steps",
        "3",
        "--ckpt_path",
        "last",
    ]
    job = subprocess.Popen(
        lit_accel_command() + run,
        cwd=in_tmp_dir,
        env={**os.environ, **env},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        last = in_tmp_dir / "runs" / "lit_accel" / "version_0" / "checkpoints" / "last.ckpt"
        _wait_for(last.exists, job)
        time.sleep(0.5)  # a few more steps, so the two checkpoints differ
        job.send_signal(signal.SIGUSR1)  # what SLURM sends before the time limit (#SBATCH --signal=USR1@90)
        job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == -signal.SIGKILL, "killed by the fake scontrol while requeueing"
    assert (in_tmp_dir / "scontrol.log").read_text().split() == ["requeue", "4242"]
    hpc = in_tmp_dir / "hpc_ckpt_1.ckpt"  # Lightning saves it in trainer.default_root_dir: the working directory
    hpc_step = torch.load(hpc, map_location="cpu", weights_only=True)["global_step"]
    # Saved after last.ckpt (which the kill may even have cut short): the newest state, which
    # `last` must find.
    assert last.exists() and hpc.stat().st_mtime > last.stat().st_mtime

    # The requeued job runs the same command again (README: srun lit-accel fit … --ckpt_path last).
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    relaunch = LitAccelCLI(args=[*run, "--trainer.max_steps", str(hpc_step + 2)])
    assert Path(relaunch.trainer.ckpt_path) == hpc
    assert relaunch.trainer.global_step == hpc_step + 2


RECORD_SCONTROL = """#!/bin/sh
echo "$@" >> "$SCONTROL_LOG"
"""


@pytest.mark.slow
def test_under_ddp_the_ranks_answer_the_requeue_signal_together_at_an_agreed_batch(in_tmp_dir: Path) -> None:
    """Two processes started as srun starts them (one SLURM task each). Only rank 1 gets SIGUSR1, at
    step 3: Lightning's save is collective, so the ranks agree on a batch (every 10th: after step 10)
    and both run its handler there. One hpc checkpoint of step 10, one requeue, and both ranks go
    on training to the end (the fake scontrol only records)."""
    bin_dir = in_tmp_dir / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(RECORD_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    tests_dir = Path(__file__).resolve().parent
    common = {
        **SLURM_ENV,
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "MASTER_PORT": str(free_port()),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SCONTROL_LOG": str(in_tmp_dir / "scontrol.log"),
        "PYTHONPATH": os.pathsep.join([str(tests_dir), os.environ.get("PYTHONPATH", "")]),
    }
    run = [
        "fit",
        *SMOKE,
        "--trainer.accelerator",
        "cpu",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.max_epochs",
        "50",
        "--trainer.max_steps",
        "14",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.callbacks+=faults.SignalSelfAtStep",
        "--trainer.callbacks.step",
        "3",
        "--trainer.callbacks.rank",
        "1",
    ]
    tasks = [
        subprocess.Popen(
            lit_accel_command() + run,
            cwd=in_tmp_dir,
            env={**os.environ, **common, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [task.communicate(timeout=240) for task in tasks]
    finally:
        for task in tasks:
            if task.poll() is None:
                task.kill()
    for task, (_, err) in zip(tasks, outputs):
        assert task.returncode == 0, err[-3000:]
    assert (in_tmp_dir / "scontrol.log").read_text().split() == ["requeue", "4242"], "rank 0 requeues, once"
    (hpc,) = in_tmp_dir.glob("hpc_ckpt_*.ckpt")
    assert torch.load(hpc, map_location="cpu", weights_only=True)["global_step"] == 10
    final = in_tmp_dir / "runs" / "lit_accel" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(final, map_location="cpu", weights_only=True)["global_step"] == 14
