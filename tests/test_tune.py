"""``lit-accel tune``: the search tested with a scripted trial runner and clock (numbers in, a choice
out), the real trials and the command through the real fit code, and bad input is one message with
no YAML left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import config
from lit_accel.cli import LitAccelCLI
from lit_accel.commands import main as cli_main
from lit_accel.tune import (
    FitTrials,
    Lever,
    Measured,
    Report,
    Setting,
    Trial,
    combine,
    main,
    plan_levers,
    search,
    table,
    tuned_yaml,
)
from lit_accel.tune.trials import duration

SMOKE = config("cifar10.yaml", "smoke.yaml")
QUICK = ["--warmup_steps", "1", "--timed_steps", "2", "--no_progress"]


def _parsed(*extra: str):
    return LitAccelCLI(args=[*SMOKE, *extra], run=False).config


def _setting(lever: str, name: str, **yaml_values) -> Setting:
    return Setting(lever, name, (f"--{lever}", name), yaml_values or {lever: name}, False)


class Scripted:
    """A trial runner with its own clock: each trial takes ``seconds`` of the clock and returns the
    scripted images/s of its setting (a list: one per trial, in order), or fails with ``errors``."""

    def __init__(self, rates: dict, seconds: float = 1.0, errors: dict | None = None, memory: dict | None = None):
        self.rates = {k: list(v) if isinstance(v, list) else v for k, v in rates.items()}
        self.seconds = seconds
        self.errors = errors or {}
        self.memory = memory or {}
        self.now = 0.0
        self.calls: list[str | None] = []
        self.left: list[float] = []

    def clock(self) -> float:
        return self.now

    def __call__(self, setting: Setting | None, seconds_left: float) -> Trial:
        name = None if setting is None else setting.name
        self.calls.append(name)
        self.left.append(seconds_left)
        self.now += self.seconds
        if name in self.errors:
            return Trial(seconds=self.seconds, error=self.errors[name])
        rate = self.rates[name]
        rate = rate.pop(0) if isinstance(rate, list) else rate
        return Trial(rate, 0.05, self.memory.get(name, 100.0), self.seconds)


def _search(levers, runner: Scripted, budget_s: float = 100.0, rounds: int = 3, min_gain: float = 0.03) -> Report:
    return search(levers, runner, budget_s, rounds, min_gain, clock=runner.clock)


# ------------------------------------------------------------------------------- the search
def test_it_picks_the_faster_setting_measured_in_alternating_rounds():
    slower, faster = _setting("a", "slower"), _setting("a", "faster")
    runner = Scripted({None: 100.0, "slower": 80.0, "faster": 150.0})
    report = _search([Lever("a", (slower, faster))], runner, rounds=2)
    assert runner.calls == [None, "slower", "faster", None, "faster", "slower"]  # the order reversed in round 2
    assert report.measured(slower).ratios == [0.8, 0.8] and report.measured(faster).ratios == [1.5, 1.5]
    assert report.chosen == [faster] and report.combined is None and not report.not_measured
    assert report.seconds == 6.0 and runner.left[:2] == [100.0, 99.0]  # the budget left, on the runner's clock


def test_ratios_are_paired_with_their_own_rounds_recipe_trial():
    """The machine slows down by half between rounds: each ratio is to the same round's recipe."""
    setting = _setting("a", "x")
    runner = Scripted({None: [100.0, 50.0, 100.0], "x": [110.0, 55.0, 110.0]})
    report = _search([Lever("a", (setting,))], runner)
    assert report.measured(setting).ratios == pytest.approx([1.1, 1.1, 1.1])
    assert report.baseline.images_per_sec == [100.0, 50.0, 100.0]


def test_a_setting_must_beat_the_recipe_by_min_gain():
    setting = _setting("a", "x")
    assert _search([Lever("a", (setting,))], Scripted({None: 100.0, "x": 102.0})).chosen == []
    assert _search([Lever("a", (setting,))], Scripted({None: 100.0, "x": 102.0}), min_gain=0.01).chosen == [setting]


def test_winners_of_two_levers_are_measured_together_and_kept_when_faster():
    first, second = _setting("first", "f", a=1), _setting("second", "s", b=2)
    levers = [Lever("first", (first,)), Lever("second", (second,))]
    runner = Scripted({None: 100.0, "f": 120.0, "s": 130.0, "f + s": 160.0})
    report = _search(levers, runner, rounds=1)
    assert runner.calls == [None, "f", "s", None, "f + s"]  # the recipe again, next to the merged trial
    assert report.chosen == [first, second] and report.combined is not None
    assert report.combined.ratios == [1.6]
    assert "| combined | f + s |" in table(report)
    values = yaml.safe_load(tuned_yaml(report, "lit-accel tune …"))
    assert values == {"a": 1, "b": 2}


def test_winners_slower_together_than_the_best_alone_keep_only_the_best():
    first, second = _setting("first", "f"), _setting("second", "s")
    levers = [Lever("first", (first,)), Lever("second", (second,))]
    report = _search(levers, Scripted({None: 100.0, "f": 120.0, "s": 130.0, "f + s": 125.0}), rounds=1)
    assert report.chosen == [second] and report.combined is not None and report.combined.ratios == [1.25]
    assert "| combined | (slower than the best single setting) |" in table(report)


def test_winners_never_measured_together_are_not_written_together():
    """The budget holds the single settings but not a combined trial: only the fastest single one."""
    first, second = _setting("first", "f"), _setting("second", "s")
    levers = [Lever("first", (first,)), Lever("second", (second,))]
    runner = Scripted({None: 100.0, "f": 120.0, "s": 130.0}, seconds=10.0)
    report = _search(levers, runner, budget_s=35.0, rounds=1)
    assert runner.calls == [None, "f", "s"]  # 30 s spent: a recipe and a merged trial need 20 more
    assert report.combined is None and report.not_combined is True
    assert report.chosen == [second]


def test_the_budget_stops_the_rounds_and_says_what_was_not_measured():
    a, b, c = _setting("l", "a"), _setting("l", "b"), _setting("l", "c")
    runner = Scripted({None: 100.0, "a": 110.0, "b": 120.0, "c": 130.0}, seconds=10.0)
    report = _search([Lever("l", (a, b, c))], runner, budget_s=35.0)
    assert runner.calls == [None, "a", "b"]  # c would end at 40 s
    assert report.not_measured == [c] and report.chosen == [b]
    assert "| l | c | not measured (budget) |" in table(report)


def test_a_failed_trial_is_a_row_of_the_table_not_a_crash():
    oom, fine = _setting("l", "huge"), _setting("l", "fine")
    runner = Scripted({None: 100.0, "fine": 99.0}, errors={"huge": "out of memory"})
    report = _search([Lever("l", (oom, fine))], runner, rounds=2)
    assert runner.calls.count("huge") == 1, "a failed setting is not tried again"
    assert report.measured(oom).error == "out of memory" and report.chosen == []
    assert "| l | huge | failed: out of memory | — |" in table(report)


@pytest.mark.parametrize(
    ("runner", "budget_s", "message"),
    [
        (Scripted({}, errors={None: "ValueError: bad"}), 100.0, "the recipe itself failed in a trial: ValueError: bad"),
        (Scripted({None: 100.0}, seconds=10.0), 15.0, "budget_s=15 is too small: one trial of the recipe took 10.0 s"),
    ],
)
def test_a_failing_recipe_or_a_budget_too_small_is_one_message(runner, budget_s, message):
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.")):
        _search([Lever("l", (_setting("l", "x"),))], runner, budget_s=budget_s)


def test_each_row_shows_its_trials_own_peak_memory():
    """The table shows each trial's figure (the process's peak grew with every trial before)."""
    small, large = _setting("b", "small"), _setting("b", "large")
    memory = {None: 300.0, "small": 100.0, "large": 900.0}
    report = _search([Lever("b", (small, large))], Scripted({None: 1.0, "small": 1.0, "large": 1.0}, memory=memory))
    rows = {line.split("|")[2].strip(): line.split("|")[6].strip() for line in table(report).splitlines()[2:]}
    assert rows == {"as configured": "300", "small": "100", "large": "900"}


# ------------------------------------------------------------------------------- the command
def test_the_command_writes_a_yaml_that_fit_accepts(in_tmp_dir, capsys):
    """The one end-to-end run: real trials through the lit-accel entry point, with the README's
    relative --config paths (the trials run in the user's working folder and leave nothing there)."""
    shutil.copytree(Path(SMOKE[1]).parent, in_tmp_dir / "configs")
    relative = ["--config", "configs/cifar10.yaml", "--config", "configs/smoke.yaml"]
    with pytest.raises(SystemExit) as exit_info:
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


def test_the_progress_bar_counts_the_trials(in_tmp_dir, capsys):
    runner = Scripted({None: 100.0, "NCHW": 100.0, "channels_last": 100.0})
    assert main([*SMOKE, "--levers", "channels_last", "--rounds", "1"], run_trial=runner) == 0
    err = capsys.readouterr().err
    assert "lit-accel tune" in err and "2/2" in err  # the recipe and one setting


class SignalOnTrial(Scripted):
    def __init__(self, signum: int) -> None:
        super().__init__({None: 100.0, "NCHW": 100.0, "channels_last": 100.0})
        self.signum = signum

    def __call__(self, setting, seconds_left):
        if setting is not None:
            os.kill(os.getpid(), self.signum)
        return super().__call__(setting, seconds_left)


@pytest.mark.parametrize(
    ("signum", "status", "name"), [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")]
)
def test_ctrl_c_exits_130_and_sigterm_143_and_nothing_is_written(in_tmp_dir, capsys, signum, status, name):
    (in_tmp_dir / "tuned.yaml").write_text("# the user's own\n")
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main([*SMOKE, *QUICK, "--levers", "channels_last"], run_trial=SignalOnTrial(signum)) == status
    assert f"lit-accel tune: stopped ({name}); nothing was written" in capsys.readouterr().err
    assert (in_tmp_dir / "tuned.yaml").read_text() == "# the user's own\n"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers, "handlers put back"


def test_ctrl_c_inside_a_real_trial_is_ctrl_c(in_tmp_dir, capsys):
    """The recipe's PreemptionCheckpoint turns Ctrl-C into a SIGTERM in a fit: a trial must not
    (tune said 'stopped (SIGTERMException)' and exited 143 after Ctrl-C)."""
    ctrl_c_at_step_1 = ["--trainer.callbacks+=faults.SignalSelfAtStep", "--trainer.callbacks.step", "1"]
    ctrl_c_at_step_1 += ["--trainer.callbacks.signum", str(int(signal.SIGINT))]
    assert main([*SMOKE, *ctrl_c_at_step_1, *QUICK, "--levers", "channels_last", "--budget_s", "120"]) == 130
    assert "lit-accel tune: stopped (Ctrl-C); nothing was written" in capsys.readouterr().err
    assert not (in_tmp_dir / "tuned.yaml").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--output", "missing/tuned.yaml"], "--output missing/tuned.yaml: the folder missing does not exist"),
        (["--output", "."], "--output . is a folder"),
        (["--levers", "warp_drive"], "--levers warp_drive is not allowed: use some of channels_last"),
        (["--levers", "ddp", "--trainer.strategy", "ddp"], "--levers: ddp: the recipe already sets strategy=ddp"),
        (["--budget_s", "0"], "--budget_s=0.0 is not allowed"),
        (["--budget_s", "0.5"], "budget_s=0.5 is too small: one trial of the recipe took 1.0 s"),
        (["--budget_s", "inf"], "--budget_s=inf is not allowed: use a positive (finite) number"),
        (["--levers", ","], "--levers ',' names no lever: use some of channels_last"),
    ],
)
def test_bad_input_is_one_message_and_no_yaml(in_tmp_dir, capsys, extra, message):
    (in_tmp_dir / "tuned.yaml").write_text("# the user's own\n")
    runner = Scripted({None: 100.0, "NCHW": 100.0, "channels_last": 100.0})
    assert main([*SMOKE, *QUICK, "--levers", "channels_last", *extra], run_trial=runner) == 2  # a later --levers wins
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


# ------------------------------------------------------------------------------- real trials
def test_a_trial_that_outlasts_its_time_is_stopped_and_failed(in_tmp_dir):
    """1.5 s a step with 1 s left: Trainer max_time stops the training after the first step."""
    recipe = [*SMOKE, "--trainer.callbacks+=faults.SleepEachStep", "--trainer.callbacks.seconds", "1.5"]
    trial = FitTrials(recipe, warmup_steps=1, timed_steps=2)(None, 1.0)
    assert (
        trial.error == "RuntimeError: stopped before 3 optimizer steps: out of the budget's time, or the run is shorter"
    )
    assert [duration(x) for x in (0.2, 9.1, 130, 90061)] == ["00:00:00:01", "00:00:00:10", "00:00:02:10", "01:01:01:01"]


# Two real trials in one fresh process, as `lit-accel tune` runs them. A test worker that ran other
# tests first keeps freed memory resident, and a trial reusing it adds nothing to the resident set.
_LARGE_THEN_SMALL = """
import json, sys
from lit_accel.tune.levers import Setting
from lit_accel.tune.trials import FitTrials
trials = FitTrials(json.loads(sys.argv[1]), 1, 1)
rows = [trials(Setting("batch_size", b, ("--data.batch_size", b), {}, True), 120.0) for b in ("512", "8")]
print(json.dumps([[row.error, row.peak_memory_mb] for row in rows]))
"""


@pytest.mark.slow
def test_each_real_trial_reports_its_own_peak_memory(in_tmp_dir):
    """A large batch, then a small one: the second row is the small trial's own figure, not the
    process's high-water mark (tests/test_measure.py checks the window in both orders)."""
    recipe = [*SMOKE, "--data.synthetic_size", "612", "--data.val_size", "100"]
    done = subprocess.run(
        [sys.executable, "-c", _LARGE_THEN_SMALL, json.dumps(recipe)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (big_error, big), (little_error, little) = json.loads(done.stdout.strip().splitlines()[-1])
    assert big_error is None and little_error is None, (big_error, little_error)
    assert big > 0 and little < big / 2, (little, big)


def test_the_compile_lever_measures_a_compiled_network(in_tmp_dir):
    """torch.compile with the eager backend (dynamo traces, no code generation: seconds on a CPU)."""
    recipe = [*SMOKE, "--model.compile_options", '{"backend": "eager"}']
    (lever,), _ = plan_levers(LitAccelCLI(args=recipe, run=False).config, ["compile"], unchanged_only=False)
    (setting,) = lever.settings
    assert setting.args == ("--model.compile", "true")
    trial = FitTrials(recipe, warmup_steps=1, timed_steps=2)(setting, 120.0)
    assert trial.error is None and trial.images_per_sec > 0


# ------------------------------------------------------------------------------- the levers and the YAML
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
    report = Report(Measured(), [(s, Measured(ratios=[1.1])) for s in chosen], chosen)
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
    assert (parsed.data.init_args.batch_size, str(parsed.trainer.devices), parsed.trainer.strategy) == (128, "2", "ddp")
    assert parsed.model.optimizer.init_args.lr == pytest.approx(0.004 * 2, rel=1e-5)
    report = Report(
        Measured(),
        [(batch, Measured(ratios=[1.2])), (ddp, Measured(ratios=[1.3]))],
        [batch, ddp],
        Measured(ratios=[1.5]),
    )
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
