"""The benchmark must not rot: its quickest mode runs every case and prints a well-formed table."""

import itertools
import re
import subprocess
import sys

import lightning as L
import pytest
from helpers import REPO_ROOT

from lit_accel import CIFAR10DataModule, ImageClassifier
from lit_accel.models import SeedCNN


@pytest.mark.slow
def test_bench_smoke_prints_a_row_for_every_variant(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "bench.py"), "--smoke", "--net", "BatchNormCNN", "--json", str(tmp_path / "bench.json")],
        capture_output=True, text=True, timeout=400, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    main_table, network_table = result.stdout.split("\n\n")[-2:]
    rows = [line for line in main_table.splitlines() if line.startswith("| ") and not line.startswith(("| case", "| ---"))]
    cases = {row.split("|")[1].strip() for row in rows}
    assert cases == {"overhead", "callbacks", "pipeline", "precision", "ddp", "networks"}
    assert len(rows) == 17
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 8
        assert re.fullmatch(r"[\d,]+", cells[2]), f"images/s must be a number: {row}"
        assert re.fullmatch(r"\d+\.\d{3}", cells[3]), f"ratio must be a number: {row}"
    network_rows = [r for r in rows if r.startswith("| networks")]
    assert all(re.fullmatch(r"0\.\d{3}|1\.000", r.strip("|").split("|")[6].strip()) for r in network_rows)
    time_to_accuracy = network_table.splitlines()[2:]
    assert len(time_to_accuracy) == len(network_rows) == 4
    for row in time_to_accuracy:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert re.fullmatch(r"\d+\.\d", cells[2]) and re.fullmatch(r"0\.\d{3}|1\.000", cells[4]), row
        assert re.fullmatch(r"0\.\d{3}|1\.000", cells[3]), row  # a smoke run's 1 s is within the 15 s
        assert all(re.fullmatch(r"\d+\.\d|not reached", c) for c in cells[5:]), row


def test_plain_loop_trains_without_lit_accel_training_code():
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import plain_loop
    from lit_accel.data import make_synthetic_cifar

    images, labels = make_synthetic_cifar(256, seed=0)
    result = plain_loop.train(SeedCNN(), images, labels, batch_size=32, warmup_steps=1, timed_steps=4)
    assert result.images_per_sec > 0 and result.timed_steps == 4
    source = (REPO_ROOT / "tools" / "plain_loop.py").read_text()
    assert "lightning" not in source and "lit_accel.data.augment" not in source and "ImageClassifier" not in source


def test_step_timer_stops_at_its_training_time_budget_and_records_the_curve(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import bench_timer

    ticks = itertools.count()  # a clock that advances one second per reading
    monkeypatch.setattr(bench_timer.time, "perf_counter", lambda: float(next(ticks)))
    timer = bench_timer.StepTimer(warmup_steps=1, budget_seconds=12)
    data = CIFAR10DataModule(synthetic=True, synthetic_size=512, val_size=64, batch_size=16)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=100, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer], default_root_dir=tmp_path,
    )
    trainer.fit(ImageClassifier(SeedCNN()), data)

    # The fake clock charges each timed step 2 s (read at batch start and end) and each validation
    # 1 s (read at its start; the reading at its end restarts the clock). Step 1 is the warm-up, so
    # steps 2-6 (10 s) plus the validations after steps 2 and 4 (2 s) reach the 12 s at step 6.
    assert trainer.global_step == 6
    assert [(seconds, step) for seconds, step, _accuracy in timer.result["curve"]] == [(3, 2), (8, 4), (13, 6)]
    assert all(0.0 <= accuracy <= 1.0 for _seconds, _step, accuracy in timer.result["curve"])
    with pytest.raises(ValueError, match="budget_seconds=0"):
        bench_timer.StepTimer(budget_seconds=0)
