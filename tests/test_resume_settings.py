"""A run resumed through ``lit-accel`` with changed callback settings keeps the callbacks' state."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import config, run_cli


def _meter_config(tmp_path, warmup_steps: int):
    path = tmp_path / f"meter{warmup_steps}.yaml"
    meter = {
        "class_path": "lit_accel.callbacks.ThroughputMeter",
        "init_args": {"warmup_steps": warmup_steps, "print_summary": False},
    }
    path.write_text(json.dumps({"trainer": {"callbacks": [meter]}}))  # JSON is YAML
    return ["--config", str(path)]


@pytest.mark.slow
def test_resume_with_another_warmup_keeps_the_meters_totals(tmp_path):
    common = [*config("cifar10.yaml", "smoke.yaml"), "--trainer.enable_progress_bar", "false"]
    first = run_cli(["fit", *common, *_meter_config(tmp_path, 1)], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(
        ["fit", *common, *_meter_config(tmp_path, 2), "--trainer.max_epochs", "2", "--ckpt_path", "last"], cwd=tmp_path
    )
    assert second.returncode == 0, second.stderr[-3000:]
    state = torch.load(tmp_path / "runs" / "cifar10" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    # 8 batches per epoch (smoke.yaml): 7 timed in the first fit (warm-up 1), 6 in the resumed
    # one (warm-up 2). Keyed on the settings, the resumed meter would have started from zero.
    assert state["callbacks"]["ThroughputMeter"]["batches"] == 7 + 6
