"""``lit-accel tune``: it measures through the real fit code, picks the faster setting, writes a YAML
that ``lit-accel fit`` accepts, and bad input is one message with no YAML left behind."""

from __future__ import annotations

import signal
import statistics
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import config
from lit_accel.cli import LitAccelCLI
from lit_accel.commands import main as cli_main
from lit_accel.tune import (
    Lever,
    Measured,
    Setting,
    _duration,
    combine,
    main,
    plan_levers,
    table,
    tune,
    tuned_yaml,
)

TESTS_DIR = Path(__file__).resolve().parent
SMOKE = config("cifar10.yaml", "smoke.yaml")
QUICK = ["--warmup_steps", "2", "--timed_steps", "4", "--no_progress"]


def _parsed(*extra: str):
    return LitAccelCLI(args=[*SMOKE, *extra], run=False).config


def test_it_picks_the_faster_of_two_settings_whose_speeds_are_known(in_tmp_dir, monkeypatch):
    """The recipe sleeps 30 ms per step; one setting sleeps 80 ms, the other not at all."""
    monkeypatch.syspath_prepend(str(TESTS_DIR))  # faults.SleepEachStep by class path
    recipe = [*SMOKE, "--trainer.callbacks+=faults.SleepEachStep", "--trainer.callbacks.seconds", "0.03"]
    slower = Setting("sleep", "80 ms", ("--trainer.callbacks.seconds", "0.08"), {"model.channels_last": False}, False)
    faster = Setting("sleep", "0 ms", ("--trainer.callbacks.seconds", "0.0"), {"model.channels_last": True}, False)
    report = tune(
        recipe,
        [Lever("sleep", (slower, faster))],
        budget_s=120,
        warmup_steps=2,
        timed_steps=4,
        rounds=2,
        progress=False,
    )
    measured = dict(report["settings"])
    assert len(measured[slower].ratios) == len(measured[faster].ratios) == 2  # every round, alternating
    assert statistics.median(measured[slower].ratios) < 1.0 < statistics.median(measured[faster].ratios)
    assert report["chosen"] == [faster]
    assert list(report["baseline"].images_per_sec) and not report["not_measured"]


def test_winners_of_two_levers_are_measured_together_and_kept_when_faster(in_tmp_dir, monkeypatch):
    """The recipe sleeps 30 + 30 ms per step; each lever removes one of the sleeps."""
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    sleeps = ["--trainer.callbacks+=faults.SleepTwice", "--trainer.callbacks.first", "0.03"]
    recipe = [*SMOKE, *sleeps, "--trainer.callbacks.second", "0.03"]
    first = Setting("first", "0 ms", ("--trainer.callbacks.first", "0.0"), {"a": 1}, False)
    second = Setting("second", "0 ms", ("--trainer.callbacks.second", "0.0"), {"b": 2}, False)
    levers = [Lever("first", (first,)), Lever("second", (second,))]
    report = tune(recipe, levers, budget_s=120, warmup_steps=2, timed_steps=4, rounds=1, progress=False)
    combined = report["combined"]
    assert report["chosen"] == [first, second] and combined is not None and len(combined.ratios) == 1
    singles = {s.lever: statistics.median(m.ratios) for s, m in report["settings"]}
    assert combined.ratios[0] > max(singles.values()) > 1.0
    assert "| combined | 0 ms + 0 ms |" in table(report)


def test_a_trial_that_outlasts_the_budget_is_stopped_and_shown_as_failed(in_tmp_dir, monkeypatch):
    """A setting that sleeps 3 s a step needs 18 s for its 6 steps; the budget is 10 s."""
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    recipe = [*SMOKE, "--trainer.callbacks+=faults.SleepEachStep", "--trainer.callbacks.seconds", "0.0"]
    slow = Setting("sleep", "3 s", ("--trainer.callbacks.seconds", "3.0"), {"a": 1}, False)
    started = time.perf_counter()
    report = tune(
        recipe, [Lever("sleep", (slow,))], budget_s=10, warmup_steps=2, timed_steps=4, rounds=1, progress=False
    )
    assert time.perf_counter() - started < 10 + 5  # the trial's training stopped at the budget (set-up on top)
    (measured,) = [m for _, m in report["settings"]]
    assert measured.error is not None and "stopped before 6 optimizer steps" in measured.error
    assert report["chosen"] == [] and "failed: RuntimeError: stopped before 6" in table(report)
    assert [_duration(x) for x in (0.2, 9.1, 130, 90061)] == [
        "00:00:00:01",
        "00:00:00:10",
        "00:00:02:10",
        "01:01:01:01",
    ]


def test_the_command_writes_a_yaml_that_fit_accepts(in_tmp_dir, capsys):
    """With the README's relative --config paths: the trials run in the user's working folder
    (before, they ran in a temporary one, where configs/… did not exist), and leave nothing there."""
    import shutil

    shutil.copytree(Path(SMOKE[1]).parent, in_tmp_dir / "configs")
    relative = ["--config", "configs/cifar10.yaml", "--config", "configs/smoke.yaml"]
    with pytest.raises(SystemExit) as exit_info:  # through the lit-accel entry point
        cli_main(["tune", *relative, "--levers", "channels_last", "--budget_s", "120", "--rounds", "1", *QUICK])
    assert exit_info.value.code == 0
    assert sorted(p.name for p in in_tmp_dir.iterdir()) == ["configs", "tuned.yaml"]
    out = capsys.readouterr().out
    assert "| recipe | as configured |" in out and "| channels_last | NCHW |" in out
    written = (in_tmp_dir / "tuned.yaml").read_text()
    assert written.startswith("# Written by `lit-accel tune`")
    fit = LitAccelCLI(args=["fit", *SMOKE, "--config", "tuned.yaml", "--trainer.max_steps", "1"])
    assert fit.trainer.state.finished
    assert not list(in_tmp_dir.glob(".tuned.yaml.*")), "no temporary file left"


def test_sigterm_or_ctrl_c_stops_tune_itself_and_writes_nothing(in_tmp_dir, monkeypatch, capsys):
    """Lightning's SIGTERMException is a SystemExit: it was taken for a failed trial, and tune went on."""
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    signal_at_step_2 = ["--trainer.callbacks+=faults.SignalSelfAtStep", "--trainer.callbacks.step", "2"]
    signal_at_step_2 += ["--trainer.callbacks.signum", str(int(signal.SIGTERM))]
    (in_tmp_dir / "tuned.yaml").write_text("# the user's own\n")
    assert main([*SMOKE, *signal_at_step_2, *QUICK, "--levers", "channels_last", "--budget_s", "120"]) == 143
    assert "lit-accel tune: stopped (SIGTERMException); nothing was written" in capsys.readouterr().err
    assert (in_tmp_dir / "tuned.yaml").read_text() == "# the user's own\n"


def test_winners_never_measured_together_are_not_written_together(in_tmp_dir, monkeypatch):
    """The budget leaves time for the single settings but not for a combined trial: only the fastest
    single setting is chosen (the README: kept together only if that is faster still)."""
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    sleeps = ["--trainer.callbacks+=faults.SleepTwice", "--trainer.callbacks.first", "0.03"]
    recipe = [*SMOKE, *sleeps, "--trainer.callbacks.second", "0.06"]
    first = Setting("first", "0 ms", ("--trainer.callbacks.first", "0.0"), {"a": 1}, False)
    second = Setting("second", "0 ms", ("--trainer.callbacks.second", "0.0"), {"b": 2}, False)
    levers = [Lever("first", (first,)), Lever("second", (second,))]
    monkeypatch.setattr("lit_accel.tune._time_to_combine", lambda *args: False)
    report = tune(recipe, levers, budget_s=120, warmup_steps=1, timed_steps=2, rounds=1, progress=False)
    assert report["combined"] is None and report["not_combined"] is True
    assert report["chosen"] == [second], "the larger sleep removed: the faster of the two"


def test_a_tuned_yaml_composes_after_the_recipe_and_says_what_it_changes(in_tmp_dir):
    wanted = ["channels_last", "threads", "pipeline", "precision", "batch_size"]
    levers, _ = plan_levers(_parsed(), wanted, unchanged_only=False)
    by_lever = {lever.name: lever.settings for lever in levers}
    chosen = [
        by_lever["channels_last"][0],
        by_lever["threads"][0],  # 1 thread, or 2 when this process already runs on 1
        next(s for s in by_lever["pipeline"] if s.name == "dataloader, 1 workers"),
        by_lever["precision"][0],
        next(s for s in by_lever["batch_size"] if s.yaml["data.batch_size"] == 128),
    ]
    report = {"settings": [(s, Measured(ratios=[1.1])) for s in chosen], "chosen": chosen, "combined": None}
    text = tuned_yaml(report, "lit-accel tune …")
    (in_tmp_dir / "tuned.yaml").write_text(text)
    assert "CHANGES WHAT IS LEARNED" in text and "training unchanged" in text
    values = yaml.safe_load(text)
    # smoke.yaml: batch 64 -> 128, AdamW's LR 0.004 by the square-root rule
    assert values["data"] == {"pipeline": "dataloader", "num_workers": 1, "residency": "host", "batch_size": 128}
    assert values["model"]["optimizer"]["init_args"]["lr"] == pytest.approx(0.004 * 2**0.5, rel=1e-5)
    wanted_threads = by_lever["threads"][0].yaml["num_threads"]
    assert values["num_threads"] == wanted_threads
    threads = torch.get_num_threads()
    try:
        tuned = LitAccelCLI(args=[*SMOKE, "--config", "tuned.yaml"], run=False)
        assert torch.get_num_threads() == wanted_threads  # applied before anything is built
    finally:
        torch.set_num_threads(threads)
    assert tuned.model.channels_last is False and tuned.trainer.precision == "bf16-mixed"
    assert (tuned.datamodule.pipeline, tuned.datamodule.num_workers, tuned.datamodule.batch_size) == (
        "dataloader",
        1,
        128,
    )
    assert tuned.model.optimizer_factory.keywords["lr"] == pytest.approx(0.004 * 2**0.5, rel=1e-5)


def test_unchanged_training_only_leaves_out_precision_batch_and_processes():
    levers, skipped = plan_levers(_parsed(), None, unchanged_only=True)
    assert {lever.name for lever in levers} == {"channels_last", "threads", "pipeline"}
    assert all(not s.changes_training for lever in levers for s in lever.settings)
    assert any(line.startswith("precision: changes what is learned") for line in skipped)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--output", "missing/tuned.yaml"], "--output missing/tuned.yaml: the folder missing does not exist"),
        (["--output", "."], "--output . is a folder"),
        (["--levers", "warp_drive"], "--levers warp_drive is not allowed: use some of channels_last"),
        (["--levers", "ddp", "--trainer.strategy", "ddp"], "--levers: ddp: the recipe already sets strategy=ddp"),
        (["--budget_s", "0"], "--budget_s=0.0 is not allowed"),
        (["--budget_s", "0.5"], "budget_s=0.5 is too small: one trial of the recipe took"),
        (["--budget_s", "inf"], "--budget_s=inf is not allowed: use a positive (finite) number"),
        (["--levers", ","], "--levers ',' names no lever: use some of channels_last"),
    ],
)
def test_bad_input_is_one_message_and_no_yaml(in_tmp_dir, capsys, extra, message):
    (in_tmp_dir / "tuned.yaml").write_text("# the user's own\n")
    assert main([*SMOKE, *QUICK, "--levers", "channels_last", *extra]) == 2  # a later --levers wins
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert (in_tmp_dir / "tuned.yaml").read_text() == "# the user's own\n"
    assert sorted(p.name for p in in_tmp_dir.iterdir()) == ["tuned.yaml"]


def test_a_bad_recipe_is_the_cli_message(in_tmp_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*SMOKE, "--trainer.max_epochz", "3", *QUICK])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --trainer.max_epochz" in capsys.readouterr().err
    assert not (in_tmp_dir / "tuned.yaml").exists()


def test_progress_bar_counts_the_trials(in_tmp_dir, capsys):
    args = [
        "--levers",
        "channels_last",
        "--budget_s",
        "120",
        "--rounds",
        "1",
        "--warmup_steps",
        "1",
        "--timed_steps",
        "2",
    ]
    assert main([*SMOKE, *args]) == 0
    err = capsys.readouterr().err
    assert "lit-accel tune" in err and "2/2" in err  # the recipe and one setting


def test_the_batch_lever_tries_up_to_eight_times_the_batch_that_the_training_split_holds():
    """smoke.yaml: batch 64 of 768 training images; a smaller split leaves out what it cannot hold."""
    (lever,), _ = plan_levers(_parsed(), ["batch_size"], unchanged_only=False)
    assert [s.yaml["data.batch_size"] for s in lever.settings] == [32, 128, 256, 512]
    assert all(s.changes_training for s in lever.settings)
    (small,), _ = plan_levers(_parsed("--data.synthetic_size", "300", "--data.val_size", "44"), ["batch_size"], False)
    assert [s.yaml["data.batch_size"] for s in small.settings] == [32, 128, 256]


def test_the_ddp_and_batch_winners_together_split_the_chosen_batch_over_the_processes(in_tmp_dir):
    """smoke.yaml: batch 64. The batch lever's 256 (LR x2, square-root rule) with 2 DDP processes is
    128 per process, the global batch the LR was scaled for; measured and written alike."""
    levers, _ = plan_levers(_parsed(), ["batch_size", "ddp"], unchanged_only=False)
    by_lever = {lever.name: lever.settings for lever in levers}
    batch = next(s for s in by_lever["batch_size"] if s.yaml["data.batch_size"] == 256)
    (ddp,) = by_lever["ddp"]
    assert ddp.processes == 2 and ddp.yaml["data.batch_size"] == 32  # alone: the recipe's 64 split in two
    merged = combine([batch, ddp])
    assert merged.processes == 2
    parsed = LitAccelCLI(args=[*SMOKE, *merged.args], run=False).config
    assert (parsed.data.batch_size, str(parsed.trainer.devices), parsed.trainer.strategy) == (128, "2", "ddp")
    assert parsed.model.optimizer.init_args.lr == pytest.approx(0.004 * 2, rel=1e-5)
    report = {
        "settings": [(batch, Measured(ratios=[1.2])), (ddp, Measured(ratios=[1.3]))],
        "chosen": [batch, ddp],
        "combined": Measured(ratios=[1.5]),
    }
    values = yaml.safe_load(tuned_yaml(report, "lit-accel tune …"))
    assert values["data"]["batch_size"] == 128 and values["trainer"]["devices"] == 2
    assert values["model"]["optimizer"]["init_args"]["lr"] == pytest.approx(0.004 * 2, rel=1e-5)


def test_from_a_device_resident_recipe_every_pipeline_setting_is_one_the_cli_accepts():
    """configs/gpu.yaml holds the data on the device; the DataLoader settings must say host."""
    recipe = [*config("cifar10.yaml", "gpu.yaml", "smoke.yaml"), "--trainer.accelerator", "cpu"]
    parsed = LitAccelCLI(args=recipe, run=False).config
    (lever,), _ = plan_levers(parsed, ["pipeline"], unchanged_only=False)
    assert {s.name for s in lever.settings} >= {"preload", "dataloader, 0 workers"}
    for setting in lever.settings:
        data = LitAccelCLI(args=[*recipe, *setting.args], run=False).datamodule  # no ConfigurationError
        assert (data.pipeline, data.residency) == (setting.yaml["data.pipeline"], setting.yaml["data.residency"])


def test_the_compile_lever_measures_a_compiled_network(in_tmp_dir):
    """torch.compile with the eager backend (dynamo traces, no code generation: seconds on a CPU)."""
    recipe = [*SMOKE, "--model.compile_options", '{"backend": "eager"}']
    (lever,), _ = plan_levers(LitAccelCLI(args=recipe, run=False).config, ["compile"], unchanged_only=False)
    report = tune(recipe, [lever], budget_s=120, warmup_steps=2, timed_steps=4, rounds=1, progress=False)
    ((setting, measured),) = report["settings"]
    assert setting.args == ("--model.compile", "true") and measured.error is None
    assert len(measured.ratios) == 1 and measured.ratios[0] > 0
