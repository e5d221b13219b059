"""Every shipped config file (lit_accel/configs/, linked as configs/) runs through the real CLI with a
tiny budget; ``--config NAME`` finds them, and no ``--config`` means the recipe."""

import os
from pathlib import Path

import pytest
import torch
import yaml

from helpers import CONFIGS, config, run_cli, same_state
from lit_accel.cli import (
    DEFAULT_RECIPE,
    GPU_RECIPE_ON_CPU,
    SHIPPED_CONFIGS,
    LitAccelCLI,
    main,
    shipped_config_names,
    with_configs_resolved,
)
from lit_accel.errors import ConfigurationError

TESTS_DIR = Path(__file__).resolve().parent  # faults.py, loaded by class path in the CLI runs
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SMOKE = ["cifar10.yaml", "smoke.yaml"]

# Each combination a test below runs; test_every_config_file_is_run checks the list is complete.
IN_PROCESS = [
    ["smoke.yaml"],
    SMOKE,
    [*SMOKE, "precision/bf16-mixed.yaml"],
    [*SMOKE, "precision/16-mixed.yaml"],
    [*SMOKE, "dynamic_batch.yaml"],
]
TWO_PROCESSES = [
    [*SMOKE, "strategy/ddp.yaml", "precision/bf16-mixed.yaml"],
    [*SMOKE, "strategy/fsdp.yaml"],
]
# The two-process runs: most of their cost is starting 4 processes (imports of torch and Lightning);
# of the rest, epochs cost more than steps (validation, and a checkpoint of every rank at each epoch
# end). So one long epoch of tiny batches, no sanity check: 384 training images in batches of 8
# shared by 2 ranks, 24 steps.
ONE_LONG_EPOCH = ["--data.synthetic_size", "512", "--data.val_size", "128", "--data.batch_size", "8"]
ONE_LONG_EPOCH += ["--trainer.limit_train_batches", "1.0", "--trainer.num_sanity_val_steps", "0"]
EPOCH_STEPS = 24
GPU_RECIPE = ["cifar10.yaml", "gpu.yaml", "smoke.yaml"]
GPU_ONLY = [[*SMOKE, "strategy/fsdp_gpu.yaml", "precision/16-mixed.yaml"], GPU_RECIPE]
PROGRESS = [*SMOKE, "dynamic_progress.yaml"]  # needs 2 epochs or more: its own test below
REAL_CIFAR = [["cifar10.yaml"]]
IMAGE_FOLDER = [["image_folder.yaml"]]  # run by tests/data/test_image_folder_data_module.py (it needs a folder)


def test_every_config_file_is_run():
    all_files = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    covered = {
        name
        for combo in [*IN_PROCESS, *TWO_PROCESSES, *GPU_ONLY, *REAL_CIFAR, *IMAGE_FOLDER, PROGRESS]
        for name in combo
    }
    assert all_files <= covered, f"config files no test runs: {sorted(all_files - covered)}"


def test_config_names_resolve_to_the_shipped_files_unless_a_file_is_there(in_tmp_dir):
    ddp = str(SHIPPED_CONFIGS / "strategy" / "ddp.yaml")
    recipe = str(SHIPPED_CONFIGS / "cifar10.yaml")
    for value in ("strategy/ddp", "strategy/ddp.yaml", "configs/strategy/ddp.yaml"):
        assert with_configs_resolved(["fit", "--config", value]) == ["fit", "--config", ddp], value
    resolved = with_configs_resolved(["fit", "-c", "cifar10", "--config=precision/bf16-mixed", "--data.synthetic", "1"])
    assert resolved == [
        "fit",
        "-c",
        recipe,
        f"--config={SHIPPED_CONFIGS / 'precision' / 'bf16-mixed.yaml'}",
        "--data.synthetic",
        "1",
    ]
    # A file in the working folder wins over the shipped name; inline YAML is left to jsonargparse.
    (in_tmp_dir / "cifar10.yaml").write_text("trainer: {max_epochs: 1}\n")
    assert with_configs_resolved(["fit", "--config", "cifar10.yaml"]) == ["fit", "--config", "cifar10.yaml"]
    assert with_configs_resolved(["fit", "--config", "{trainer: {max_epochs: 1}}"])[2] == "{trainer: {max_epochs: 1}}"
    assert set(shipped_config_names()) == {
        str(p.relative_to(CONFIGS).with_suffix("").as_posix()) for p in CONFIGS.rglob("*.yaml")
    }


def test_an_unknown_config_name_is_one_message_listing_the_shipped_names(in_tmp_dir):
    with pytest.raises(ConfigurationError) as error:
        with_configs_resolved(["fit", "--config", "strategy/dpp"])
    message = str(error.value)
    assert message.startswith("--config strategy/dpp: no such file") and "\n" not in message
    assert all(name in message for name in ("cifar10", "gpu", "strategy/ddp", "precision/bf16-mixed")), message


def test_no_config_means_the_recipe_and_an_explicit_one_replaces_it():
    recipe = ["--config", str(SHIPPED_CONFIGS / f"{DEFAULT_RECIPE}.yaml")]
    for command in ("fit", "validate", "test", "predict"):
        assert with_configs_resolved([command, "--data.synthetic", "1"]) == [command, *recipe, "--data.synthetic", "1"]
    assert with_configs_resolved(["--data.synthetic", "1"], subcommands=False) == [*recipe, "--data.synthetic", "1"]
    assert with_configs_resolved(["fit", "--config", "smoke"]) == ["fit", "--config", str(CONFIGS / "smoke.yaml")]
    assert with_configs_resolved(["--help"]) == ["--help"], "no command: nothing to add"


def test_fit_without_config_prints_the_recipe(in_tmp_dir, capsys):
    """Parse only: `lit-accel fit --print_config` is the shipped recipe with the command line on top."""
    with pytest.raises(SystemExit) as exit_info:
        LitAccelCLI(args=["fit", "--trainer.max_epochs", "2", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    shipped = yaml.safe_load((CONFIGS / "cifar10.yaml").read_text())
    assert [c["class_path"] for c in printed["trainer"]["callbacks"]] == [
        c["class_path"] for c in shipped["trainer"]["callbacks"]
    ]
    assert printed["model"]["lr_scheduler"]["class_path"] == "lit_accel.schedules.WarmupDecayLR"
    assert printed["trainer"]["max_epochs"] == 2


@pytest.mark.parametrize("names", IN_PROCESS, ids=lambda names: "+".join(names))
def test_single_process_configs(names, in_tmp_dir):
    cli = LitAccelCLI(args=["fit", *config(*names), *QUIET])
    assert cli.trainer.state.finished
    callbacks = {type(c).__name__ for c in cli.trainer.callbacks}
    if "cifar10.yaml" in names:
        assert {"ThroughputMeter", "DivergenceGuard"} <= callbacks, "the recipe's callbacks are on"
    if "dynamic_batch.yaml" in names:
        assert {"ThroughputMeter", "DivergenceGuard", "DynamicBatchLR"} <= callbacks, "callbacks+ appends"
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    precision = cli.trainer.precision
    if any(name.startswith("precision/") for name in names):
        on_gpu = cli.trainer.strategy.root_device.type == "cuda"
        expected = "16-mixed" if on_gpu and "precision/16-mixed.yaml" in names else "bf16-mixed"
        assert precision == expected, "on CPU both mixed precisions run as bf16"
    else:
        assert precision == "32-true"


def test_dynamic_progress_config_grows_the_batch_and_the_lr(in_tmp_dir):
    cli = LitAccelCLI(args=["fit", *config(*PROGRESS), *QUIET, "--trainer.max_epochs", "3"])
    assert cli.trainer.state.finished and cli.trainer.current_epoch == 3
    # smoke.yaml's batch of 64 grows to 512 from epoch 2 (0.4 of 3 epochs); AdamW: sqrt rule.
    assert cli.datamodule.batch_size == 512
    assert cli.trainer.optimizers[0].param_groups[0]["dynamic_lr_scale"] == pytest.approx(8**0.5)
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])


@pytest.mark.parametrize("names", REAL_CIFAR, ids=lambda names: "+".join(names))
def test_default_recipe_on_the_real_cifar10_code_path(names, in_tmp_dir, cifar10_root, cifar10_checksum_patched):
    root, _ = cifar10_root
    cli = LitAccelCLI(
        args=[
            "fit",
            *config(*names),
            *QUIET,
            "--data.data_dir",
            str(root),
            "--data.val_size",
            "50",
            "--data.batch_size",
            "32",
            "--trainer.max_epochs",
            "1",
        ]
    )
    assert cli.datamodule.classes[3] == "cat"
    assert cli.trainer.num_training_batches == 5  # 150 images / 32 per batch, the last partial
    assert torch.isfinite(cli.trainer.callback_metrics["val/acc"])


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("names", TWO_PROCESSES, ids=lambda names: "+".join(names))
def test_two_process_strategies_resume_and_stop_a_divergence(names, tmp_path):
    """Two processes, through the real CLI: a healthy epoch, then a run resumed with
    ``--ckpt_path last`` in which one rank's weights turn NaN for good. The resumed run starts
    from each rank's own saved state (its shards under FSDP2), the DivergenceGuard rolls back on
    both ranks together and then stops: exit status 3, one message, ``divergence.ckpt`` saved, and
    every rank left at its snapshot, which is where the resumed run started."""
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    run = ["fit", *config(*names), *QUIET, "--trainer.devices", "2", *ONE_LONG_EPOCH]
    dump = ["--trainer.callbacks+=faults.DumpLocalState", "--trainer.callbacks.out", str(tmp_path)]
    first = run_cli([*run, *dump, "--trainer.callbacks.label", "first"], cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in first.stderr + first.stdout
    run_dir = tmp_path / "runs" / "cifar10"
    last = run_dir / "version_0" / "checkpoints" / "last.ckpt"
    sharded = "strategy/fsdp.yaml" in names
    if sharded:
        # FSDP2 saves one shard per process: proof that the model was sharded, not replicated.
        assert last.is_dir() and sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    else:
        assert last.is_file()

    # Two healthy steps, then NaN on rank 1 for good: 3 rollbacks and the stop, all in epoch 2.
    poison = ["--trainer.callbacks+=faults.PoisonParameters", "--trainer.callbacks.from_step", str(EPOCH_STEPS + 2)]
    resumed = run_cli(
        [
            *run,
            "--trainer.max_epochs",
            "2",
            "--ckpt_path",
            "last",
            *dump,
            "--trainer.callbacks.label",
            "resumed",
            *poison,
            "--trainer.callbacks.rank",
            "1",
        ],
        cwd=tmp_path,
        env=env,
    )
    assert resumed.returncode == 3, resumed.stderr[-3000:]
    assert "lit-accel: training diverged: DivergenceGuard stopped training at step" in resumed.stderr
    assert "after 3 rollback(s)" in resumed.stderr and "Traceback" not in resumed.stderr
    divergence = run_dir / "version_1" / "divergence.ckpt"
    if sharded:
        assert sorted(p.name for p in divergence.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    else:
        assert divergence.is_file()

    ranks = [(torch.load(tmp_path / f"first-rank{r}.pt"), torch.load(tmp_path / f"resumed-rank{r}.pt")) for r in (0, 1)]
    for first_rank, resumed_rank in ranks:
        assert first_rank["end"]["global_step"] == resumed_rank["start"]["global_step"] == EPOCH_STEPS
        # The resumed run starts from exactly the state the first run ended in, optimizer included.
        assert same_state(resumed_rank["start"]["params"], first_rank["end"]["params"])
        assert same_state(resumed_rank["start"]["optimizer"], first_rank["end"]["optimizer"])
        assert not same_state(first_rank["start"]["params"], first_rank["end"]["params"])
        # Rolled back to the snapshot taken when the resumed run started, weights and optimizer.
        assert resumed_rank["end"]["global_step"] > EPOCH_STEPS + 2
        assert same_state(resumed_rank["end"]["params"], resumed_rank["start"]["params"])
        assert same_state(resumed_rank["end"]["optimizer"], resumed_rank["start"]["optimizer"])
    final = [resumed["end"]["params"] for _, resumed in ranks]
    # FSDP2: each rank holds (and restored) its own half of every weight; DDP: identical replicas.
    assert same_state(final[0], final[1]) is not sharded


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without a GPU")
@pytest.mark.parametrize("names", GPU_ONLY, ids=lambda names: "+".join(names))
def test_gpu_only_config_without_a_gpu_is_one_clear_error(names, in_tmp_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config(*names), *QUIET])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lit-accel: error:") and "GPU" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the GPU recipe the way its error message says")
def test_gpu_recipe_runs_on_a_cpu_with_the_changes_its_error_names(in_tmp_dir, capsys):
    """The message's own flags turn configs/gpu.yaml into a CPU run (a narrow ResNet9 to keep it short)."""
    with pytest.raises(SystemExit):
        main(["fit", *config(*GPU_RECIPE), *QUIET])
    err = capsys.readouterr().err
    assert GPU_RECIPE_ON_CPU in err
    cli = LitAccelCLI(args=["fit", *config(*GPU_RECIPE), *QUIET, *GPU_RECIPE_ON_CPU.split(), "--model.net.width", "8"])
    assert cli.trainer.state.finished and torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    assert type(cli.model.net).__name__ == "ResNet9" and cli.datamodule.residency == "device"
    assert type(cli.trainer.train_dataloader).__name__ == "DeviceBatchLoader"
    assert {"ThroughputMeter", "DivergenceGuard"} <= {type(c).__name__ for c in cli.trainer.callbacks}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("names", GPU_ONLY, ids=lambda names: "+".join(names))
def test_gpu_only_config_on_a_gpu(names, tmp_path):
    result = run_cli(["fit", *config(*names), *QUIET], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
