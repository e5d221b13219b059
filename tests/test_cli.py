"""The ``lit-accel`` command: defaults, checkpoints by alias, and user errors."""

import logging
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from helpers import TINY_CLI_ARGS, config, read_scalars, run_cli
from lit_accel.cli import LitAccelCLI, check_config_file, check_trainer_integers, main
from lit_accel.errors import ConfigurationError

SMOKE = config("cifar10.yaml", "smoke.yaml") + ["--trainer.enable_progress_bar", "false"]


def test_fit_then_validate_and_test_a_finished_run_by_alias(in_tmp_dir):
    # Trained at width 24; the commands below give the recipe's width (16): an alias, like the
    # path it names, rebuilds the network the checkpoint was trained with (issue #13, item 3).
    fit = LitAccelCLI(args=["fit", *SMOKE, "--trainer.max_epochs", "2", "--model.net.width", "24"])
    best_score = float(fit.trainer.checkpoint_callback.best_model_score)
    run_dir = in_tmp_dir / "runs" / "cifar10" / "version_0"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and checkpoints[1] == "last.ckpt" and checkpoints[0].startswith("best-epoch")

    # A fresh CLI (as in a new process) finds the best checkpoint and reproduces its val/acc.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate = LitAccelCLI(args=["validate", *SMOKE, "--ckpt_path", "best"])
        test_last = LitAccelCLI(args=["test", *SMOKE, "--ckpt_path", "last"])
        test_path = LitAccelCLI(args=["test", *SMOKE, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
    assert float(validate.trainer.callback_metrics["val/acc"]) == pytest.approx(best_score, abs=1e-6)
    # Evaluating is not resuming: no warning that the checkpoint folder changed.
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    assert "test/acc" in test_last.trainer.callback_metrics
    assert torch.equal(test_last.trainer.callback_metrics["test/acc"], test_path.trainer.callback_metrics["test/acc"])
    for cli in (validate, test_last, test_path):
        assert cli.model.net.features[0].out_channels == 24, "the checkpoint's network, not the config's"
        assert cli.config[cli.subcommand]["model"]["net"]["init_args"]["width"] == 24


TINY = TINY_CLI_ARGS


@pytest.mark.slow
def test_best_and_last_are_the_newest_of_two_runs(in_tmp_dir):
    """Two runs under one logger folder (widths 8, then 12): best and last name the second run's
    files, and the model is rebuilt with its network."""
    for width in ("8", "12"):
        LitAccelCLI(args=["fit", *TINY, "--model.net.width", width])
    runs = in_tmp_dir / "runs" / "cifar10"
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]
    for alias in ("last", "best"):
        cli = LitAccelCLI(args=["test", *TINY, "--ckpt_path", alias])
        path = Path(cli.config["test"]["ckpt_path"])
        assert path.parent.resolve() == (runs / "version_1" / "checkpoints").resolve(), (alias, path)
        assert path.name == "last.ckpt" if alias == "last" else path.name.startswith("best-epoch"), (alias, path)
        assert cli.model.net.features[0].out_channels == 12, "the newest run's network"


def test_tensorboard_logs_by_default_and_resuming_before_any_checkpoint_starts_afresh(in_tmp_dir):
    """``fit --ckpt_path last`` in a fresh folder trains from scratch: the same command serves the first
    launch and every relaunch."""
    fit = LitAccelCLI(args=["fit", *SMOKE, "--ckpt_path", "last"])
    assert fit.trainer.current_epoch == 1 and fit.trainer.ckpt_path is None
    scalars = read_scalars(in_tmp_dir / "runs" / "cifar10" / "version_0")
    for tag in ("train/loss_step", "train/loss", "train/acc", "val/loss", "val/acc", "train/lr"):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    assert (in_tmp_dir / "runs" / "cifar10" / "version_0" / "config.yaml").exists()


def test_checkpoint_alias_without_a_run_is_one_clear_error(in_tmp_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["test", *SMOKE, "--ckpt_path", "best"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no 'best' checkpoint found under runs/" in err and "Traceback" not in err


def test_reduce_lr_on_plateau_follows_val_loss_and_the_lr_is_logged_as_train_lr(in_tmp_dir):
    plateau = [
        "--model.lr_scheduler",
        "torch.optim.lr_scheduler.ReduceLROnPlateau",
        "--model.lr_scheduler.patience",
        "0",
    ]
    fit = LitAccelCLI(args=["fit", *TINY, *plateau, "--trainer.max_epochs", "2"])
    (config,) = fit.trainer.lr_scheduler_configs
    assert (config.monitor, config.interval, config.name) == ("val/loss", "epoch", "train/lr")
    scalars = read_scalars(in_tmp_dir / "runs" / "cifar10" / "version_0")
    val_losses = [value for _, value in scalars["val/loss"]]
    assert len(val_losses) == 2
    assert config.scheduler.best == pytest.approx(min(val_losses), rel=1e-6), "stepped with val/loss"
    assert [value for _, value in scalars["train/lr"]][0] == pytest.approx(0.004)


def test_without_a_scheduler_the_constant_lr_is_logged_under_the_same_key(in_tmp_dir):
    every_step = ["--trainer.log_every_n_steps", "1"]
    fit = LitAccelCLI(args=["fit", *TINY, *every_step, "--model.lr_scheduler", "null", "--trainer.max_epochs", "2"])
    scalars = read_scalars(in_tmp_dir / "runs" / "cifar10" / "version_0")
    assert not [key for key in scalars if key.startswith("lr-")]
    lrs = [value for _, value in scalars["train/lr"]]
    assert len(lrs) >= 2 and all(lr == pytest.approx(0.004) for lr in lrs)
    assert fit.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.004)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--data.val_size", "0"],
            "ReduceLROnPlateau follows model.lr_scheduler_monitor=val/loss, which is not logged every epoch here "
            "(data.val_size=0)",
        ),
        (
            ["--model.lr_scheduler_monitor", "val/los"],
            "lr_scheduler_monitor='val/los' is not allowed: use a metric ImageClassifier logs",
        ),
        (["--model.lr_scheduler_interval", "step"], "lr_scheduler_interval=step is not allowed with ReduceLROnPlateau"),
    ],
    ids=["no-validation", "unknown-metric", "per-step"],
)
def test_a_plateau_scheduler_without_its_metric_is_one_clear_error(in_tmp_dir, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *SMOKE, "--model.lr_scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (in_tmp_dir / "runs").exists()


def test_missing_data_without_network_is_one_clear_error(in_tmp_dir, no_network, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config("cifar10.yaml"), "--data.data_dir", str(in_tmp_dir / "nowhere")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lit-accel: error: CIFAR-10 not found in")
    assert "--data.synthetic true" in err and "Traceback" not in err


def test_console_script_is_installed_and_lists_subcommands(tmp_path):
    result = run_cli(["--help"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    for subcommand in ("fit", "validate", "test", "predict"):
        assert subcommand in result.stdout


def test_random_seed_per_process_under_an_outside_launcher_is_refused(in_tmp_dir, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *SMOKE, "--seed_everything", "true"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "seed_everything=True with WORLD_SIZE=2" in err and "--seed_everything 42" in err and "Traceback" not in err


def _copy_of(root: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "own-data"
    shutil.copytree(root, copy)
    return copy


def test_own_cifar_format_files_through_the_cli(in_tmp_dir, cifar10_root, no_network, capsys):
    """Not the official files: refused with the flag to use; with the flag, a crafted file is refused
    without running, and more classes than the model has outputs is one message."""
    import pickle

    root = _copy_of(cifar10_root[0], in_tmp_dir)
    base = [
        "fit",
        *config("cifar10.yaml"),
        "--trainer.enable_progress_bar",
        "false",
        "--data.data_dir",
        str(root),
        "--data.val_size",
        "50",
        "--trainer.max_epochs",
        "1",
    ]
    for extra, expected in [
        ([], "not the official CIFAR-10 (their checksums differ)"),
        (["--data.verify_checksums", "false"], None),
    ]:
        if expected is None:
            meta = root / "cifar-10-batches-py" / "batches.meta"
            names = pickle.loads(meta.read_bytes(), encoding="latin1")
            names["label_names"] = [f"class{i}" for i in range(12)]
            meta.write_bytes(pickle.dumps(names))
            expected = "the data has 12 classes but model.num_classes=10"
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err


def test_print_config_prints_the_whole_recipe_and_reads_back_the_same(in_tmp_dir, capsys):
    def printed(args: list[str]) -> str:
        with pytest.raises(SystemExit) as stop:
            LitAccelCLI(args=args)
        assert stop.value.code in (0, None)
        return capsys.readouterr().out

    first = printed(["fit", *config("cifar10.yaml"), "--model.net.width", "24", "--print_config"])
    resolved = yaml.safe_load(first)
    net = resolved["model"]["net"]
    assert net["class_path"] == "lit_accel.models.LiteCNN" and net["init_args"]["width"] == 24
    assert resolved["model"]["optimizer"]["class_path"] == "torch.optim.AdamW"
    callbacks = [c["class_path"] for c in resolved["trainer"]["callbacks"]]
    assert "lit_accel.callbacks.DivergenceGuard" in callbacks and "lit_accel.callbacks.ThroughputMeter" in callbacks
    assert not (in_tmp_dir / "runs").exists(), "printing trains nothing and makes no run folder"
    saved = in_tmp_dir / "printed.yaml"
    saved.write_text(first)
    assert printed(["fit", "--config", str(saved), "--print_config"]) == first


def test_a_plain_callbacks_list_replaces_the_recipes(in_tmp_dir, capsys):
    """YAML lists replace (jsonargparse); `callbacks+=` on the command line appends."""
    mine = in_tmp_dir / "mine.yaml"
    mine.write_text("trainer:\n  callbacks:\n    - class_path: lit_accel.callbacks.ThroughputMeter\n")
    with pytest.raises(SystemExit):
        LitAccelCLI(args=["fit", *config("cifar10.yaml"), "--config", str(mine), "--print_config"])
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    assert [c["class_path"] for c in callbacks] == ["lit_accel.callbacks.ThroughputMeter"]


@pytest.mark.parametrize("devices", ["-1", "[0,1]", "0"])
def test_cpu_devices_that_name_gpus_are_one_clear_error(in_tmp_dir, capsys, devices):
    """On a CPU a device is a process: -1 ("all") and index lists are GPU spellings (Lightning raises
    a TypeError for them)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *SMOKE, "--trainer.accelerator", "cpu", "--trainer.devices", devices])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "trainer.devices=" in err and "is not allowed on a CPU" in err, err
    assert "auto (one process) or a number from 1 to" in err and "Traceback" not in err
    assert not (in_tmp_dir / "runs").exists()


def test_evaluating_without_a_checkpoint_warns_once_that_the_network_is_untrained(in_tmp_dir, caplog):
    """Allowed (fit, then test in a new process, is the usual order; this may be a set-up check), but
    said in one line that names the flag."""
    args = [*TINY, "--trainer.limit_predict_batches", "1", "--predict_writer.output_path", "p.csv"]
    for subcommand in ("test", "validate", "predict"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lit_accel.cli"):
            LitAccelCLI(args=[subcommand, *args])
        warned = [r.getMessage() for r in caplog.records if r.name == "lit_accel.cli"]
        assert warned == [
            f"lit-accel {subcommand}: no --ckpt_path given, so the untrained network (its random initial weights) "
            "is evaluated. Pass --ckpt_path best|last|FILE to use a trained checkpoint."
        ], warned


def test_predicting_no_batch_is_one_clear_error(in_tmp_dir, capsys):
    (in_tmp_dir / "p.csv").write_text("kept\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *SMOKE, "--trainer.limit_predict_batches", "0", "--predict_writer.output_path", "p.csv"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "nothing was predicted: trainer.limit_predict_batches=0 runs no batch, so p.csv was not written" in err
    assert "Traceback" not in err
    assert (in_tmp_dir / "p.csv").read_text() == "kept\n"


# ------------------------------------------------------------------ bad values: one message
@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("accumulate_grad_batches", 0, "from 1 up"),  # Lightning: ZeroDivisionError
        ("accumulate_grad_batches", -1, "from 1 up"),  # Lightning: an optimizer step every batch, silently
        ("check_val_every_n_epoch", 0, "from 1 up"),
        ("val_check_interval", 0, "from 1 up"),
        ("log_every_n_steps", -3, "from 0 up"),
        ("num_sanity_val_steps", -2, "from -1 up"),
        ("min_epochs", -1, "from 0 up"),
        ("min_steps", -1, "from 0 up"),
    ],
)
def test_trainer_integers_lightning_divides_by_are_checked(key, value, allowed):
    with pytest.raises(ConfigurationError) as error:
        check_trainer_integers({key: value})
    assert str(error.value).startswith(f"trainer.{key}={value} is not allowed: use an integer {allowed}")


def test_trainer_integers_in_range_and_fractions_pass():
    check_trainer_integers(
        {
            "accumulate_grad_batches": 1,
            "check_val_every_n_epoch": None,
            "val_check_interval": 0.5,  # a fraction of an epoch
            "log_every_n_steps": 0,  # never
            "num_sanity_val_steps": -1,  # all
            "min_epochs": None,
        }
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [("", "holds no settings (it is empty"), ("# a comment only\n", "holds no settings"), ("[1, 2]\n", "holds a list")],
)
def test_a_config_file_without_settings_is_named(tmp_path, content, expected):
    path = tmp_path / "overlay.yaml"
    path.write_text(content)
    with pytest.raises(TypeError) as error:
        check_config_file(str(path))
    assert str(error.value).startswith(f"the config file {path} {expected}")
    path.write_text("trainer:\n  max_epochs: 3\n")
    check_config_file(str(path))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # argparse's prefix matching would take it as --trainer.max_epochs, silently.
        (["--trainer.max_epoch", "3"], "error: unrecognized arguments: --trainer.max_epoch 3"),
        (["--config", "empty.yaml"], "error: the config file empty.yaml holds no settings"),
        (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches=0 is not allowed"),
    ],
    ids=["abbreviated-option", "empty-config", "accumulate-0"],
)
def test_a_bad_value_is_one_message_before_anything_runs(in_tmp_dir, capsys, args, expected):
    (in_tmp_dir / "empty.yaml").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *SMOKE, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert not (in_tmp_dir / "runs").exists()


def test_only_the_subcommand_run_has_its_parser_built(in_tmp_dir, monkeypatch):
    """``fit …`` builds fit's parser alone (each takes a quarter of a second); a top-level
    ``--config`` before the subcommand, which may hold a section per subcommand, gets them all."""
    monkeypatch.setattr("lightning.pytorch.Trainer.fit", lambda *args, **kwargs: None)
    monkeypatch.setattr("lightning.pytorch.Trainer.test", lambda *args, **kwargs: None)
    fit = LitAccelCLI(args=["fit", *TINY])
    assert set(fit.subcommands()) == {"fit"}
    with pytest.raises(SystemExit):  # the parser knows no other subcommand
        fit.parser.parse_args(["test", *TINY])

    sections = in_tmp_dir / "sections.yaml"
    sections.write_text(yaml.safe_dump({"fit": {"trainer": {"max_steps": 7}}, "test": {"trainer": {"max_steps": 9}}}))
    cli = LitAccelCLI(args=["--config", str(sections), "test", *TINY])
    assert set(cli.subcommands()) == {"fit", "validate", "test", "predict"}
    assert cli.trainer.max_steps == 9
