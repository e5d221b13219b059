"""The benchmarks must not rot: ``python -m tools.bench CASE --smoke`` runs each case and prints a
well-formed table (tools/ is a package: nothing edits sys.path)."""

import importlib
import json
import re

import pytest
import torch

import lit_accel.measure.fit as measure_fit
from helpers import REPO_ROOT, config
from lit_accel.cli import LitAccelCLI
from lit_accel.models import SeedCNN
from lit_accel.tune import Trial
from tools import plain_loop, synthetic_cifar_folder
from tools.bench import batch_curve, command_start, fits, sample_seed, stability, state_copies, trial_memory
from tools.bench import recipe as bench_recipe
from tools.bench.__main__ import main as bench_main


@pytest.mark.slow
def test_bench_smoke_prints_a_row_for_every_variant(tmp_path, monkeypatch, capsys):
    """The runners for real: the plain loop and a timed in-process fit (overhead), a fit with a
    training-time budget and validations (networks). The other in-process cases are these fits with
    other arguments (the next test); ddp's subprocess runner is the one of lit-accel tune's ddp lever."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench.json"
    bench_main(
        ["overhead,networks", "--smoke", "--networks", "ResNet9:0.05", "--net", "BatchNormCNN", "--json", str(out)]
    )
    assert [row["variant"] for row in json.loads(out.read_text())["rows"]][-1] == "ResNet9 (width 8), lr 0.05"
    main_table, network_table = capsys.readouterr().out.split("\n\n")[-2:]
    rows = [
        line for line in main_table.splitlines() if line.startswith("| ") and not line.startswith(("| case", "| ---"))
    ]
    assert [row.split("|")[2].strip() for row in rows] == [
        "plain PyTorch loop",
        "lit-accel fit",
        "ResNet9 (width 8), lr 0.05",
    ]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 8
        assert re.fullmatch(r"[\d,]+", cells[2]), f"images/s must be a number: {row}"
        assert re.fullmatch(r"\d+\.\d{3}", cells[3]), f"ratio must be a number: {row}"
        assert re.fullmatch(r"[\d,]+", cells[5]), f"peak memory must be a number: {row}"
    assert re.fullmatch(r"0\.\d{3}|1\.000", rows[2].strip("|").split("|")[6].strip())
    (time_to_accuracy,) = network_table.splitlines()[2:]
    cells = [c.strip() for c in time_to_accuracy.strip("|").split("|")]
    assert re.fullmatch(r"\d+\.\d", cells[2]) and re.fullmatch(r"0\.\d{3}|1\.000", cells[4]), cells
    assert re.fullmatch(r"0\.\d{3}|1\.000", cells[3]), cells  # a smoke run's 1 s is within the 15 s
    assert all(re.fullmatch(r"\d+\.\d|not reached", c) for c in cells[5:]), cells


def test_the_in_process_cases_are_fits_the_cli_accepts(monkeypatch):
    """callbacks, pipeline and precision: each variant's arguments parse as ``lit-accel fit`` parses
    them, and the callbacks case's variant brings the three callbacks."""
    runs = []
    monkeypatch.setattr(fits, "timed_fit", lambda s, args, callbacks=None, **_: runs.append((args, callbacks)) or {})
    s = fits.settings_from_args(fits.parse(["--smoke"]))
    expected = {
        "callbacks": ["no callbacks", "meter + guard + dynamic"],
        "pipeline": ["preload", "dataloader, 0 workers", "dataloader, 1 workers", "dataloader, 2 workers"],
        "precision": ["32-true", "bf16-mixed", "16-mixed (runs as bf16-mixed on CPU)"],
    }
    for case, names in expected.items():
        variants = importlib.import_module(f"tools.bench.{case}").variants(s)
        assert list(variants) == names
        for run in variants.values():
            run()
    parsed = [LitAccelCLI(args=args[1:], run=False) for args, _ in runs]
    assert [cli.datamodule.pipeline for cli in parsed[2:6]] == ["preload", "dataloader", "dataloader", "dataloader"]
    assert [cli.datamodule.num_workers for cli in parsed[3:6]] == [0, 1, 2]
    assert [cli.trainer.precision for cli in parsed[6:]] == ["32-true", "bf16-mixed", "bf16-mixed"]
    assert runs[0][1] is None and [type(c).__name__ for c in runs[1][1]] == [
        "ThroughputMeter", "DivergenceGuard", "DynamicBatchLR"
    ]  # fmt: skip


def test_plain_loop_trains_without_lit_accel_training_code():
    from lit_accel.data import make_synthetic_cifar

    images, labels = make_synthetic_cifar(256, seed=0)
    result = plain_loop.train(SeedCNN(), images, labels, batch_size=32, warmup_steps=1, timed_steps=4)
    assert result.images_per_sec > 0 and result.timed_steps == 4
    source = (REPO_ROOT / "tools" / "plain_loop.py").read_text()
    assert "lightning" not in source and "lit_accel.data.augment" not in source and "ImageClassifier" not in source


# --------------------------------------------------------------------- the recipe harness
@pytest.mark.slow
def test_recipe_harness_runs_whole_fit_and_test_processes_on_a_cifar_format_folder(
    tmp_path, cifar10_root, monkeypatch, capsys
):
    """The maintainers' path: any CIFAR-format folder (here the fixture's, not the official files)."""
    root, _ = cifar10_root
    out = tmp_path / "recipes.json"
    monkeypatch.chdir(tmp_path)
    bench_main(
        [
            "recipe",
            "--smoke",
            "--data_dir",
            str(root),
            "--recipes",
            "epochs2",  # one recipe (a fit and a test process) keeps the suite short
            "--json",
            str(out),
        ]
    )
    stdout = capsys.readouterr().out
    rows = {row["recipe"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["epochs2"]
    # smoke.yaml makes the recipe 1 epoch; "epochs2" adds --trainer.max_epochs 2 after it
    assert len(rows["epochs2"]["curves"][0]) == 2
    for row in rows.values():
        assert row["fit_seconds"] > row["train_seconds"] > 0, "whole process includes start-up"
        assert row["test_seconds"] > 0 and row["reps"] == 1
        assert 0.0 <= row["test_acc"] <= 1.0 and 0.0 <= row["train_acc"] <= 1.0
        assert row["val_acc"] == pytest.approx(row["curves"][0][-1][2])
    table_rows = [line for line in stdout.splitlines() if re.match(r"\| (recipe|epochs2) \| [\d.]+ \|", line)]
    assert len(table_rows) == 1 and all(re.search(r"\| 0\.\d{4} \|", line) for line in table_rows)


def test_recipe_harness_rejects_unknown_recipes_and_folders(tmp_path):
    with pytest.raises(ValueError, match="recipe 'nope' is not known"):
        bench_recipe.parse_recipes("recipe,nope", [])
    with pytest.raises(ValueError, match="use NAME=ARGS with a new NAME"):
        bench_recipe.parse_recipes("recipe", ["recipe=--trainer.max_epochs 1"])
    mine = bench_recipe.parse_recipes("", ["lr4=--model.optimizer.init_args.lr 0.004"])
    assert [(r.name, r.args) for r in mine] == [("lr4", ["--model.optimizer.init_args.lr", "0.004"])]
    with pytest.raises(ValueError, match="no cifar-10-batches-py/ folder"):
        bench_recipe.data_arguments(str(tmp_path), smoke=False)
    assert bench_recipe.data_arguments(None, smoke=False) == ["--data.synthetic", "true"]


def test_synthetic_set_written_as_a_cifar_folder_reads_back_the_same(tmp_path):
    from lit_accel.data import make_synthetic_cifar
    from lit_accel.data.cifar10 import read_cifar_folder

    synthetic_cifar_folder.write_folder(tmp_path, train_size=52, test_size=7, seed=3)
    images, labels, classes = read_cifar_folder(str(tmp_path), train=True)
    expected_images, expected_labels = make_synthetic_cifar(52, seed=3, split=0)
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    test_images, _, _ = read_cifar_folder(str(tmp_path), train=False)
    assert torch.equal(test_images, make_synthetic_cifar(7, seed=3, split=1)[0])
    assert classes[0] == "airplane"


# --------------------------------------------------------------------- the stability harness
def test_stability_harness_takes_only_the_guard_out_of_the_recipe(tmp_path):
    import yaml

    shipped = yaml.safe_load((REPO_ROOT / "configs" / "cifar10.yaml").read_text())
    unguarded = yaml.safe_load(stability.write_unguarded_recipe(tmp_path).read_text())
    paths = [c["class_path"] for c in shipped["trainer"]["callbacks"]]
    assert "lit_accel.callbacks.DivergenceGuard" in paths
    assert [c["class_path"] for c in unguarded["trainer"]["callbacks"]] == [
        p for p in paths if not p.endswith("DivergenceGuard")
    ]
    assert {k: v for k, v in unguarded.items() if k != "trainer"} == {
        k: v for k, v in shipped.items() if k != "trainer"
    }
    assert stability.recipe_lr() == shipped["model"]["optimizer"]["init_args"]["lr"]
    no_guard = tmp_path / "none.yaml"
    no_guard.write_text(yaml.safe_dump({**unguarded}))
    with pytest.raises(ValueError, match="has no lit_accel.callbacks.DivergenceGuard"):
        stability.write_unguarded_recipe(tmp_path, no_guard)


def test_stability_harness_reads_the_guard_counters_and_compares_to_the_tuned_run(tmp_path):
    run = tmp_path / "runs" / "cifar10" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    assert stability.guard_state(tmp_path) == {"skipped_steps": 0, "rollbacks": 0, "lr_factor": 1.0}
    guard = {"skipped_steps": 4, "rollbacks": 1, "lr_factor": 0.25, "scaler_skips": 0}
    torch.save({"callbacks": {"DivergenceGuard{'rollback_after': 3}": guard}}, run / "checkpoints" / "last.ckpt")
    assert stability.guard_state(tmp_path) == {"skipped_steps": 4, "rollbacks": 1, "lr_factor": 0.25}
    # After a stop the guard's own checkpoint is the one that holds the final counters.
    torch.save({"callbacks": {"DivergenceGuard{}": {**guard, "rollbacks": 3}}}, run / "divergence.ckpt")
    assert stability.guard_state(tmp_path)["rollbacks"] == 3

    runs = [stability.StabilityRun(m, g) for m in (1.0, 40.0) for g in (True, False)]
    for run_, acc, code in zip(runs, (0.9, 0.8, 0.7, 0.1), (0, 0, 3, 0)):
        run_.results.append(
            {
                "test_acc": acc,
                "val_acc": acc,
                "train_acc": acc,
                "fit_seconds": 1.0,
                "skipped_steps": 2,
                "rollbacks": 1,
                "lr_factor": 0.5,
                "fit_exit_code": code,
            }
        )
    rows = stability.summarize(runs)
    assert [round(r["vs_tuned"], 6) for r in rows] == [0.0, -0.1, -0.2, -0.8]
    assert [r["stopped"] for r in rows] == [0, 0, 1, 0]
    assert "| x40 (0.16) | on | 0.7000 | -0.2000 |" in stability.table(rows, 0.004)
    for bad in ("0", "-1,10", "ten", ""):
        with pytest.raises(ValueError, match="--lr_multipliers"):
            stability.parse_multipliers(bad)


def test_stability_harness_runs_each_factor_with_and_without_the_guard(tmp_path, monkeypatch, capsys):
    """The orchestration, with the fit and test processes stubbed (python -m tools.bench recipe runs
    them for real in the recipe-harness test): which runs, with which recipe file and LR, and what
    reaches the table. The guard-free recipe it writes is accepted by the real CLI."""
    import argparse

    calls, unguarded = [], tmp_path / "unguarded.yaml"

    def fake_run_recipe(args, data_args, timeout, config, fit_exit_codes, inspect):
        calls.append((args, config, fit_exit_codes))
        if config != bench_recipe.RECIPE_CONFIG:
            unguarded.write_text(config.read_text())  # the harness's temporary folder goes away
        lr = float(args[args.index("--model.optimizer.init_args.lr") + 1])
        guarded = config == bench_recipe.RECIPE_CONFIG
        return {
            "test_acc": 0.9 if guarded or lr < 0.01 else 0.5,
            "val_acc": 0.9,
            "train_acc": 0.9,
            "fit_seconds": 1.0,
            "fit_exit_code": 0,
            **inspect(tmp_path),
        }

    monkeypatch.setattr(bench_recipe, "run_recipe", fake_run_recipe)
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(lr_multipliers="1,10", epochs=2, data_dir=None, recipe_timeout=60)
    rows = stability.run_from_args(argparse.ArgumentParser(), args, 1, True, str(tmp_path / "out.json"))
    base = stability.recipe_lr()
    assert [(r["lr_multiplier"], r["guard"]) for r in rows] == [(1.0, True), (1.0, False), (10.0, True), (10.0, False)]
    assert [r["vs_tuned"] for r in rows] == pytest.approx([0.0, 0.0, 0.0, -0.4])
    for (run_args, recipe_file, exit_codes), row in zip(calls, rows):
        assert float(run_args[run_args.index("--model.optimizer.init_args.lr") + 1]) == pytest.approx(
            base * row["lr_multiplier"]
        )
        assert run_args[run_args.index("--trainer.max_epochs") + 1] == "2" and exit_codes == (0, 3)
        assert (recipe_file == bench_recipe.RECIPE_CONFIG) is row["guard"]
    assert "DivergenceGuard" not in unguarded.read_text()
    assert "| x10 (" in capsys.readouterr().out
    cli = LitAccelCLI(args=["--config", str(unguarded), *config("smoke.yaml")], run=False)
    callbacks = {type(c).__name__ for c in cli.trainer.callbacks}
    assert "DivergenceGuard" not in callbacks and "ThroughputMeter" in callbacks


def test_state_copies_bench_times_each_copy(capsys):
    state_copies.main(["--net", "SeedCNN", "--copies", "3"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows[1:]] == [
        "GeneralizationMonitor best-weights copy",
        "DivergenceGuard snapshot (buffers reused)",
        "DivergenceGuard restore",
    ]
    for row in rows[1:]:
        low, median = (float(cell) for cell in row.strip("|").split("|")[1:])
        assert 0 < low <= median


def test_batch_curve_model_and_simulation():
    curve = batch_curve
    # Points made from a known model (5 ms per step + batch / 10,000 images/s) are fitted back.
    known = {b: curve.images_per_sec(b, 0.005, 10_000.0) for b in (64, 256, 1024)}
    overhead, peak = curve.fit_step_model(known)
    assert overhead == pytest.approx(0.005) and peak == pytest.approx(10_000.0)
    # Growth 256 -> 512 for the last 3 of 5 epochs: 2 epochs at 256, 3 at 512, per image.
    result = curve.simulate(256, {0.4: 512}, 5, 0.005, 10_000.0)
    per_image = {b: 1 / curve.images_per_sec(b, 0.005, 10_000.0) for b in (256, 512)}
    assert result["batches"] == [256, 256, 512, 512, 512]
    assert result["time_ratio"] == pytest.approx((2 * per_image[256] + 3 * per_image[512]) / (5 * per_image[256]))
    # No per-step overhead: images/s do not depend on the batch, so growth saves nothing.
    assert curve.simulate(256, {0.4: 512}, 5, 0.0, 10_000.0)["time_ratio"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2 batch sizes"):
        curve.fit_step_model({256: 1000.0})
    with pytest.raises(ValueError, match="after the last epoch"):
        curve.simulate(256, {0.9: 512}, 5, 0.005, 10_000.0)


@pytest.mark.slow
def test_batch_curve_measures_the_recipe_through_the_cli(tmp_path, capsys):
    curve = batch_curve
    report = curve.main(
        ["--batches", "32,64", "--reps", "1", "--steps_images", "192", "--json", str(tmp_path / "c.json")]
    )
    out = capsys.readouterr().out
    assert set(report["curve"]) == {"32", "64"} and all(v["median"] > 0 for v in report["curve"].values())
    assert "| 32 |" in out and "| 64 |" in out
    saved = json.loads((tmp_path / "c.json").read_text())
    assert set(saved["curve"]) == {"32", "64"}
    # Two points this short can come out with a flat or falling step time on a busy machine: then
    # the tool says so instead of simulating.
    if "no step-time model" not in out:
        assert "training time x" in out and saved["batches"] == [256, 256, 512, 512, 512]


def test_sample_seed_bench_times_both_variants(capsys):
    result = sample_seed.main(["--samples", "20", "--reps", "2"])
    out = capsys.readouterr().out
    assert "| seeded |" in out and "| global RNG |" in out and "median paired ratio seeded / global RNG" in out
    assert result["ratio"] > 0 and result["seeded"] > 0 and result["global RNG"] > 0


def test_the_bench_entry_names_its_cases_and_refuses_others(capsys):
    bench_main(["--help"])
    assert "callback_overhead" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        bench_main(["overhead,recipe"])  # recipe has its own flags: not together with a throughput case
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "'overhead,recipe' is not a case: use one of overhead" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------- the image-folder case
@pytest.mark.slow
def test_image_folder_case_runs_its_epochs_part_end_to_end_and_prints_its_tables(tmp_path, monkeypatch, capsys):
    """--smoke, the epochs part: two processes (lit-accel fit and the ImageFolder loop). The start-up
    part's runs are fits of the same kind (run_fit), checked without processes in the next test."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "folder.json"
    bench_main(["image_folder", "--smoke", "--parts", "epochs", "--json", str(out)])
    report = json.loads(out.read_text())
    stdout = capsys.readouterr().out
    epochs_rows = [line for line in stdout.splitlines() if line.startswith(("| ImageFolder", "| lit-accel fit"))]
    assert len(epochs_rows) == 2 and all(
        re.search(r"\| \d+\.\d\d \| .* \| [\d,]+ \| .* \| 1 \|$", r) for r in epochs_rows
    )
    for runs in report["epochs"].values():
        (run,) = runs
        assert run["first_epoch_s"] > 0 and run["later_epoch_s"] > 0
        # later images/s count every training image of the folder once per later epoch (540 of 600)
        assert run["later_images_per_sec"] == pytest.approx(540 / run["later_epoch_s"])
    figures = [row["figure"] for row in report["targets"]]
    assert [f.split(":")[0] for f in figures] == ["later epochs", "first epoch"]
    assert sum(line.endswith(("| yes |", "| no |")) for line in stdout.splitlines()) == 2


def test_image_folder_startup_part_times_fits_the_cli_accepts_and_refuses_a_rewritten_cache(tmp_path, monkeypatch):
    """The start-up part: one untimed fit builds the cache, then the CIFAR-format and the folder fits
    alternate; each one's arguments parse as ``lit-accel fit``'s; a timed fit that rewrote the cache
    (it decoded instead of loading) is an error, not a start-up figure."""
    from tools.bench import image_folder as case

    s = case.settings_from_args(case.parse(["--smoke", "--rounds", "2"]))
    cache, calls = tmp_path / "cache", []

    def fake_run_fit(args: list[str], work, timeout) -> dict:
        calls.append(args)
        if not cache.exists():  # the first fit decodes and writes the cache
            cache.mkdir()
            (cache / "all.pt").write_bytes(b"decoded")
        return {"launched": 10.0, "first_batch": 10.0 + len(calls)}

    monkeypatch.setattr(case, "run_fit", fake_run_fit)
    root, cifar = tmp_path / "photos", tmp_path / "photos-cifar"
    results = case.startup_part(s, root, cifar, 60, tmp_path, cache)
    assert len(calls) == 5  # the untimed fit, then 2 rounds of 2 (the second round reversed)
    is_cifar = ["--data.verify_checksums" in args for args in calls]
    assert is_cifar == [False, True, False, False, True]
    assert results == {case.CIFAR: [2.0, 5.0], case.FOLDER: [3.0, 4.0]}
    cifar_fit, folder_fit = (LitAccelCLI(args=calls[i], run=False) for i in (1, 2))
    assert cifar_fit.datamodule.data_dir == str(cifar) and not cifar_fit.datamodule.verify_checksums
    assert cifar_fit.trainer.max_steps == folder_fit.trainer.max_steps == 1
    assert type(folder_fit.datamodule).__name__ == "ImageFolderDataModule"
    assert folder_fit.datamodule.root == str(root) and folder_fit.datamodule.cache_dir == str(cache)

    def rewriting_run_fit(args: list[str], work, timeout) -> dict:
        (cache / "all.pt").write_bytes(b"decoded again, longer")
        return {"launched": 0.0, "first_batch": 1.0}

    monkeypatch.setattr(case, "run_fit", rewriting_run_fit)
    with pytest.raises(RuntimeError, match="was rewritten by a timed fit"):
        case.startup_part(s, root, cifar, 60, tmp_path, cache)


def test_image_folder_case_pairs_each_round_and_checks_the_targets():
    from tools.bench.image_folder import CIFAR, FOLDER, LIT, LOOP, epoch_figures, target_rows

    assert epoch_figures([9.0, 2.0, 4.0], [100, 100, 100], 12.0) == {
        "first_epoch_s": 12.0,
        "later_epoch_s": 3.0,
        "later_images_per_sec": pytest.approx(200 / 6),
    }
    loop = [{"first_epoch_s": 11.0, "later_epoch_s": 10.0, "later_images_per_sec": 100.0}] * 2
    lit = [
        {"first_epoch_s": 8.0, "later_epoch_s": 3.0, "later_images_per_sec": 400.0},
        {"first_epoch_s": 12.0, "later_epoch_s": 4.0, "later_images_per_sec": 200.0},
    ]
    startup = {CIFAR: [3.0, 4.0], FOLDER: [4.0, 7.0]}
    later, first, start = target_rows({LOOP: loop, LIT: lit}, startup)
    assert (later["median"], later["low"], later["high"], later["met"]) == (3.0, 2.0, 4.0, True)
    assert (first["median"], first["low"], first["high"], first["met"]) == (1.0, 0.8, 1.2, True)
    assert (start["median"], start["low"], start["high"], start["met"]) == (2.0, 1.0, 3.0, True)
    startup[FOLDER] = [5.5, 6.5]
    lit[0]["later_images_per_sec"] = 300.0
    assert [row["met"] for row in target_rows({LOOP: loop, LIT: lit}, startup)] == [False, True, False]


def test_command_start_times_parsing_in_process_and_each_entry_in_alternation(capsys):
    """The parse part builds real LitAccelCLIs (one round here); the exit part, with its process
    runner injected, runs the script's entry and commands.main with the same arguments, in
    alternating order."""
    command_start.main(["--parts", "parse", "--rounds", "1"])
    table = capsys.readouterr().out
    assert re.search(r"\| fit … \(fit's parser\) \| [\d.]+ \|", table), table
    assert re.search(r"\| --config FILE fit … \(four parsers\) \| [\d.]+ \|", table), table

    started: list[list[str]] = []
    command_start.main(["--parts", "exit", "--rounds", "2"], run_process=lambda c: started.append(c) or 1.0)
    codes = [command[2] for command in started]
    assert codes[0] == codes[3] != codes[1] == codes[2], "A B, then B A"
    assert {command[3:] == ["fit", "--help"] for command in started} == {True}
    assert sorted("run()" in code for code in codes[:2]) == [False, True], "one freezes (run), one does not (main)"
    with pytest.raises(SystemExit):
        command_start.main(["--parts", "start"])
    assert "--parts: start is not a part" in capsys.readouterr().err


def test_trial_memory_runs_large_then_small_trials_and_can_keep_freed_memory(monkeypatch, capsys):
    """With a scripted trial runner: the rounds, the table, and --keep_freed switching the window's
    release off for the run only (tests/test_tune.py runs real trials in a fresh process)."""
    released = []

    class ScriptedTrials:
        def __init__(self, recipe, warmup_steps, timed_steps):
            assert "smoke" in recipe

        def __call__(self, setting, seconds_left):
            released.append(measure_fit.release_free_host_memory is real_release)
            return Trial(images_per_sec=1.0, data_wait=0.0, peak_memory_mb=float(setting.name))

    real_release = measure_fit.release_free_host_memory
    monkeypatch.setattr(trial_memory, "FitTrials", ScriptedTrials)
    assert trial_memory.main(["--rounds", "2", "--large", "300", "--small", "20"]) == [(300.0, 20.0)] * 2
    assert "| 1 | 300.0 | 20.0 |" in capsys.readouterr().out and released == [True] * 4
    trial_memory.main(["--rounds", "1", "--keep_freed"])
    assert released[4:] == [False, False] and measure_fit.release_free_host_memory is real_release
