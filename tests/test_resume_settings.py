"""A run resumed through ``lit-accel`` with changed callback settings keeps the callbacks' state."""

from __future__ import annotations

import json

import torch

from helpers import config
from lit_accel.cli import main


def _meter_config(tmp_path, warmup_steps: int):
    path = tmp_path / f"meter{warmup_steps}.yaml"
    meter = {
        "class_path": "lit_accel.callbacks.ThroughputMeter",
        "init_args": {"warmup_steps": warmup_steps, "print_summary": False},
    }
    path.write_text(json.dumps({"trainer": {"callbacks": [meter]}}))  # JSON is YAML
    return ["--config", str(path)]


def test_resume_with_another_warmup_keeps_the_meters_totals(in_tmp_dir):
    """Through lit-accel's entry point, in this process (two processes took three times as long)."""
    tmp_path = in_tmp_dir
    common = [*config("cifar10.yaml", "smoke.yaml"), "--trainer.enable_progress_bar", "false"]
    main(["fit", *common, *_meter_config(tmp_path, 1)])  # returns on success, exits on any error
    main(["fit", *common, *_meter_config(tmp_path, 2), "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    state = torch.load(tmp_path / "runs" / "cifar10" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    # 8 batches per epoch (smoke.yaml): 7 timed in the first fit (warm-up 1), 6 in the resumed
    # one (warm-up 2). Keyed on the settings, the resumed meter would have started from zero.
    assert state["callbacks"]["ThroughputMeter"]["batches"] == 7 + 6
