"""lit_accel.measure: alternating rounds, paired ratios, the table renderer, per-trial peak memory and
the fit timer, with numbers in and figures out (a fake clock where time matters)."""

from __future__ import annotations

import itertools
import math
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lit_accel.core.throughput as throughput
import lit_accel.measure.fit as measure_fit
from lit_accel import CIFAR10DataModule, ImageClassifier
from lit_accel.measure import (
    FitTimer,
    MemoryWindow,
    alternate,
    cell,
    markdown_table,
    median,
    paired_ratios,
    rounds,
    spread,
)
from lit_accel.models import SeedCNN


def test_rounds_alternate_the_order_and_alternate_runs_each_variant_once_per_round():
    assert [order for _, order in rounds(["A", "B", "C"], 3)] == [["A", "B", "C"], ["C", "B", "A"], ["A", "B", "C"]]
    calls = []
    results = alternate({"A": lambda: calls.append("A") or len(calls), "B": lambda: calls.append("B") or len(calls)}, 3)
    assert calls == ["A", "B", "B", "A", "A", "B"]
    assert results == {"A": [1, 4, 5], "B": [2, 3, 6]}
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"count={bad!r} is not allowed"):
            list(rounds(["A"], bad))


def test_paired_ratios_medians_and_spread():
    assert paired_ratios([110.0, 55.0, 1.0, 2.0], [100.0, 50.0, 0.0, math.nan])[:2] == pytest.approx([1.1, 1.1])
    assert all(math.isnan(r) for r in paired_ratios([1.0, 2.0], [0.0, math.nan]))
    with pytest.raises(ValueError, match="one entry per round"):
        paired_ratios([1.0], [1.0, 2.0])
    assert median([3.0, math.nan, 1.0, 2.0]) == 2.0 and math.isnan(median([math.nan]))
    assert spread([3.0, 1.0, math.nan, 2.0]) == (2.0, 1.0, 3.0)
    assert all(math.isnan(x) for x in spread([]))


def test_the_table_aligns_numbers_right_and_keeps_cells_apart():
    text = markdown_table(["name", "images/s:"], [["a|b", cell(1234.5)], ["c", cell(math.nan)]])
    assert text.splitlines() == ["| name | images/s |", "| --- | ---: |", "| a/b | 1,234 |", "| c | — |"]
    assert cell(None) == "—" and cell(0.1234, "{:.1%}") == "12.3%"
    with pytest.raises(ValueError, match="has 1 cells: the table has 2 columns"):
        markdown_table(["a", "b"], [["x"]])


def _hold(mib: int) -> torch.Tensor:
    return torch.ones(mib * 2**18)  # float32: 4 bytes each, every page touched


def test_a_memory_window_is_one_trials_own_peak_in_either_order():
    """A large trial, memory kept between trials (as an allocator keeps it), a small one, a large
    one: each window shows its own figure, not the process's high-water mark nor what was kept."""
    large = MemoryWindow()
    del_me = _hold(120)
    del del_me
    large_mb = large.peak_mb()
    kept = _hold(60)
    small = MemoryWindow()
    del_me = _hold(10)
    del del_me
    small_mb = small.peak_mb()
    again = MemoryWindow()
    del_me = _hold(120)
    del del_me
    again_mb = again.peak_mb()
    assert large_mb > 100 and again_mb > 100, (large_mb, again_mb)
    assert small_mb < 40, (small_mb, large_mb, kept.numel())


def test_a_memory_window_hands_back_freed_memory_before_it_reads_the_start(monkeypatch):
    """Memory an earlier trial freed but the allocator kept would be reused unseen by the next one."""
    order = []
    monkeypatch.setattr(measure_fit, "release_free_host_memory", lambda: order.append("release"))
    monkeypatch.setattr(measure_fit, "memory_in_use_mb", lambda device=None: order.append("read") or 0.0)
    MemoryWindow()
    assert order == ["release", "read"]


def _trainer(tmp_path, timer: FitTimer, **kwargs) -> L.Trainer:
    settings = dict(
        accelerator="cpu",
        max_steps=100,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**settings, **kwargs})


def test_the_fit_timer_times_its_steps_and_stops_the_fit(tmp_path):
    timer = FitTimer(warmup_steps=2, timed_steps=3)
    trainer = _trainer(tmp_path, timer, limit_val_batches=0)
    trainer.fit(
        ImageClassifier(SeedCNN()), CIFAR10DataModule(synthetic=True, synthetic_size=512, val_size=64, batch_size=16)
    )
    assert trainer.global_step == 5
    result = timer.result
    assert result["timed_images"] == 3 * 16 and result["world_size"] == 1
    assert result["images_per_sec"] == pytest.approx(48 / result["train_seconds"])
    assert 0 <= result["data_wait"] < 1 and result["peak_memory_mb"] > 0
    for bad, message in [
        ({"warmup_steps": -1}, "warmup_steps=-1"),
        ({"timed_steps": 0}, "timed_steps=0"),
        ({"budget_seconds": 0}, "budget_seconds=0"),
    ]:
        with pytest.raises(ValueError, match=message):
            FitTimer(**bad)


class ThreeSecondValidations(Callback):
    """Each validation batch reads the (fake) clock 3 times: validation takes time, never timed."""

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        for _ in range(3):
            time.perf_counter()


def test_the_fit_timer_stops_at_its_training_time_budget_and_records_the_curve(tmp_path, monkeypatch):
    ticks = itertools.count()  # a clock that advances one second per reading
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: float(next(ticks)))
    timer = FitTimer(warmup_steps=1, timed_steps=None, budget_seconds=12)
    validation = {"val_check_interval": 2, "check_val_every_n_epoch": None, "limit_val_batches": 1}
    trainer = _trainer(tmp_path, timer, callbacks=[timer, ThreeSecondValidations()], **validation)
    trainer.fit(
        ImageClassifier(SeedCNN()), CIFAR10DataModule(synthetic=True, synthetic_size=512, val_size=64, batch_size=16)
    )
    # Each timed step reads the clock at its start and end: 1 s of data wait (from the previous
    # step's end) and 1 s of compute; a validation restarts the wait's clock after it (not timed).
    # Step 1 is the warm-up, so steps 2-7 take the 12 s; Lightning validates once more as it stops.
    assert trainer.global_step == 7 and timer.result["train_seconds"] == 12
    assert [(seconds, step) for seconds, step, _ in timer.result["curve"]] == [(2, 2), (6, 4), (10, 6), (12, 7)]
    assert timer.result["data_wait"] == 0.5
