"""WarmupDecayLR: the learning-rate schedule that is sized from the run, not from the recipe."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from helpers import CONFIGS, config, quiet_cpu_trainer
from lit_accel import CIFAR10DataModule, ImageClassifier
from lit_accel.callbacks import DynamicBatchLR
from lit_accel.cli import LitAccelCLI, main
from lit_accel.models import BatchNormCNN
from lit_accel.schedules import WarmupDecayLR, lr_factor, optimizer_steps_left

PEAK_LR = 0.01


class LRRecorder(Callback):
    """The learning rate each optimizer step actually used (read just before the step); with
    ``folder``, each rank also writes its list to ``folder/lrs_rank<N>.json`` at the end of fit."""

    def __init__(self, folder: Path | None = None) -> None:
        self.lrs: list[float] = []
        self.folder = folder

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.folder is not None:
            (self.folder / f"lrs_rank{trainer.global_rank}.json").write_text(json.dumps(self.lrs))


# ------------------------------------------------------------------------------- pure function
def test_lr_factor_warms_up_then_decays_to_the_end_value():
    cosine = partial(lr_factor, warmup=0.2, decay="cosine", start_factor=0.1, end_factor=0.0)
    assert cosine(0.0) == pytest.approx(0.1)
    assert cosine(0.1) == pytest.approx(0.55)  # halfway up the warm-up
    assert cosine(0.2) == pytest.approx(1.0)
    assert cosine(0.6) == pytest.approx(0.5)  # halfway down the cosine
    assert cosine(1.0) == pytest.approx(0.0)
    linear = partial(lr_factor, warmup=0.0, decay="linear", start_factor=1.0, end_factor=0.2)
    assert [linear(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 0.6, 0.2])
    assert linear(1.5) == pytest.approx(0.2) and linear(-1.0) == pytest.approx(1.0), "progress is clamped"


def test_plan_changed_mid_run_keeps_the_lr_continuous_and_still_ends_at_the_end_value():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = WarmupDecayLR(optimizer, decay="linear", start_factor=1.0, end_factor=0.0)
    scheduler.plan(101)  # steps 0..100: the LR falls by 0.01 a step
    lrs = []
    for step in range(101):
        if step == 40:
            scheduler.plan(71)  # the run just got shorter: 31 steps left instead of 61
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[39] == pytest.approx(0.61) and lrs[40] == pytest.approx(0.60), "no jump at the re-plan"
    assert lrs[70] == pytest.approx(0.0), "the new last step (70) has the end value"
    assert lrs[41] - lrs[40] == pytest.approx(-0.60 / 30)


# ------------------------------------------------------------------------------- through fit()
def _fit(tmp_path: Path, scheduler: partial, callbacks: list[Callback] = (), data: dict | None = None, **trainer_args):
    recorder = LRRecorder()
    data_args = dict(synthetic=True, synthetic_size=288, val_size=32, batch_size=32, augment=False)
    data_module = CIFAR10DataModule(**{**data_args, **(data or {})})
    model = ImageClassifier(
        BatchNormCNN(width=4), optimizer=partial(torch.optim.SGD, lr=PEAK_LR, momentum=0.9), lr_scheduler=scheduler
    )
    trainer = quiet_cpu_trainer(tmp_path, [recorder, *callbacks], limit_val_batches=0, **trainer_args)
    trainer.fit(model, data_module)
    return recorder.lrs, trainer


SCHEDULE = partial(WarmupDecayLR, warmup_fraction=0.25, start_factor=0.1, end_factor=0.0)


@pytest.mark.parametrize(
    ("trainer_args", "expected_steps"),
    [
        ({"max_epochs": 1}, 8),  # 256 training images / 32
        ({"max_epochs": 3}, 24),
        ({"max_epochs": 2, "accumulate_grad_batches": 3}, 6),  # ceil(8 / 3) steps per epoch
        ({"max_epochs": 10, "max_steps": 13}, 13),
        ({"max_epochs": -1, "max_steps": 5}, 5),
        ({"max_epochs": 4, "limit_train_batches": 3}, 12),
    ],
    ids=["1-epoch", "3-epochs", "accumulate", "max_steps-first", "max_steps-only", "limit_train_batches"],
)
def test_any_run_length_ends_exactly_at_the_end_value(tmp_path, trainer_args, expected_steps):
    lrs, _ = _fit(tmp_path, SCHEDULE, **trainer_args)
    assert len(lrs) == expected_steps
    assert lrs[0] == pytest.approx(0.1 * PEAK_LR), "the first step starts the warm-up"
    assert lrs[-1] == 0.0, "the last step uses the end value"
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert lrs[peak] == pytest.approx(PEAK_LR, rel=0.2)
    assert lrs[: peak + 1] == sorted(lrs[: peak + 1]) and lrs[peak:] == sorted(lrs[peak:], reverse=True)


def test_warmup_steps_and_end_factor(tmp_path):
    scheduler = partial(WarmupDecayLR, warmup_steps=4, decay="linear", start_factor=0.5, end_factor=0.1)
    lrs, _ = _fit(tmp_path, scheduler, max_epochs=2)
    assert len(lrs) == 16
    assert lrs[:5] == pytest.approx([PEAK_LR * f for f in (0.5, 0.625, 0.75, 0.875, 1.0)])
    assert lrs[-1] == pytest.approx(0.1 * PEAK_LR)


def test_batch_growth_shortens_the_run_and_the_schedule_follows(tmp_path):
    """Batch 32 → 64 at epoch 1 and → 128 at epoch 2: 8 + 4 + 2 steps, not the 24 planned first."""
    growth = DynamicBatchLR(policy="none", batch_size_schedule={1: 64, 2: 128})
    lrs, trainer = _fit(tmp_path, SCHEDULE, [growth], max_epochs=3)
    assert len(lrs) == 14 and trainer.datamodule.batch_size == 128
    assert lrs[-1] == 0.0
    peak = lrs.index(max(lrs))
    assert lrs[: peak + 1] == sorted(lrs[: peak + 1]) and lrs[peak:] == sorted(lrs[peak:], reverse=True), lrs


@pytest.mark.slow
def test_two_ddp_processes_follow_the_same_schedule_to_its_end(tmp_path):
    """Under DDP each process sees half the batches: 4 steps per epoch, and the schedule knows it."""
    torch.set_num_threads(1)
    recorder = LRRecorder(folder=tmp_path)
    model = ImageClassifier(
        BatchNormCNN(width=4), optimizer=partial(torch.optim.SGD, lr=PEAK_LR), lr_scheduler=SCHEDULE
    )
    data = CIFAR10DataModule(synthetic=True, synthetic_size=288, val_size=32, batch_size=32, augment=False)
    trainer = quiet_cpu_trainer(tmp_path, [recorder], limit_val_batches=0, max_epochs=3, strategy="ddp_fork", devices=2)
    trainer.fit(model, data)
    per_rank = [json.loads((tmp_path / f"lrs_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert per_rank[0] == per_rank[1]
    assert len(per_rank[0]) == 12 and per_rank[0][-1] == 0.0


def test_a_run_without_an_end_cannot_be_scheduled(tmp_path):
    with pytest.raises(ValueError, match="set trainer.max_epochs or trainer.max_steps"):
        _fit(tmp_path, SCHEDULE, max_epochs=-1, max_steps=-1)


def test_warmup_longer_than_the_run_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"warmup_steps=50 is not allowed: the run has only 8 optimizer steps"):
        _fit(tmp_path, partial(WarmupDecayLR, warmup_steps=50), max_epochs=1)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"warmup_fraction": -0.1}, "warmup_fraction"),
        ({"warmup_fraction": 1.0}, "warmup_fraction"),
        ({"warmup_fraction": float("nan")}, "warmup_fraction"),
        ({"warmup_steps": -3}, "warmup_steps"),
        ({"warmup_steps": 5, "warmup_fraction": 0.1}, "warmup_steps"),
        ({"decay": "step"}, "decay"),
        ({"start_factor": 0.0}, "start_factor"),
        ({"end_factor": 1.5}, "end_factor"),
        ({"end_factor": float("inf")}, "end_factor"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, name):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=f"{name}=.* is not allowed"):
        WarmupDecayLR(optimizer, **kwargs)


def test_optimizer_steps_left_counts_from_the_batch_to_the_end_of_the_run():
    class _Trainer:
        num_training_batches, accumulate_grad_batches = 10, 1
        max_epochs, max_steps, current_epoch, global_step = -1, -1, 0, 0

    trainer = _Trainer()
    assert optimizer_steps_left(trainer) == math.inf, "neither max_epochs nor max_steps"
    trainer.max_steps = 25
    assert optimizer_steps_left(trainer) == 25
    trainer.max_epochs, trainer.current_epoch, trainer.global_step = 3, 1, 14
    assert optimizer_steps_left(trainer, batch_idx=4) == 11 and optimizer_steps_left(trainer, batch_idx=6) == 11
    trainer.max_steps = -1
    assert optimizer_steps_left(trainer, batch_idx=4) == 16  # 6 left in epoch 1, 10 in epoch 2
    trainer.accumulate_grad_batches = 3  # 4 optimizer steps an epoch, the last after one batch
    assert optimizer_steps_left(trainer, batch_idx=4) == 4 - 1 + 4
    trainer.num_training_batches = math.inf  # an iterable loader without a length
    assert optimizer_steps_left(trainer) == math.inf


# ------------------------------------------------------------------------------ the real CLI
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _recorded_fit(args: list[str]) -> tuple[LitAccelCLI, list[float]]:
    """``lit-accel fit ARGS`` in this process, with an LRRecorder added; the CLI and its LRs."""
    recorder = LRRecorder()

    class _RecordingCLI(LitAccelCLI):
        def instantiate_classes(self) -> None:
            super().instantiate_classes()
            self.trainer.callbacks.append(recorder)

    return _RecordingCLI(args=["fit", *args]), recorder.lrs


def test_no_recipe_holds_a_schedule_length():
    """A length in a scheduler's arguments would have to be kept in step with trainer.max_epochs."""
    import yaml

    lengths = {"T_max", "T_0", "total_steps", "total_iters", "step_size", "milestones", "epochs", "steps_per_epoch"}
    schedulers = 0
    for path in CONFIGS.rglob("*.yaml"):
        scheduler = (yaml.safe_load(path.read_text()) or {}).get("model", {}).get("lr_scheduler")
        if isinstance(scheduler, dict):
            schedulers += 1
            assert not lengths & set(scheduler.get("init_args") or {}), f"{path.name} holds a schedule length"
    assert schedulers >= 1, "the recipe has a scheduler"


@pytest.mark.parametrize(
    ("run_length", "steps"),
    [
        (["--trainer.max_epochs", "2"], 16),  # smoke.yaml: 8 batches an epoch
        (["--trainer.max_epochs", "3"], 24),
        (["--trainer.max_epochs", "5", "--trainer.max_steps", "11"], 11),
    ],
)
def test_the_recipe_anneals_fully_for_any_run_length(run_length, steps, in_tmp_dir):
    cli, lrs = _recorded_fit([*config("cifar10.yaml", "smoke.yaml"), *QUIET, *run_length])
    assert cli.trainer.global_step == len(lrs) == steps
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, WarmupDecayLR)
    assert lrs[-1] == pytest.approx(scheduler.end_factor * scheduler.base_lrs[0], abs=1e-12)
    assert max(lrs) == pytest.approx(scheduler.base_lrs[0], rel=0.1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.lr_scheduler.init_args.warmup_fraction", "-0.5"], "warmup_fraction=-0.5 is not allowed"),
        (
            [
                "--model.lr_scheduler.init_args.warmup_fraction",
                "0",
                "--model.lr_scheduler.init_args.warmup_steps",
                "1000",
            ],
            "warmup_steps=1000 is not allowed: the run has only 8",
        ),
        (
            ["--model.lr_scheduler.init_args.warmup_steps", "10"],
            "warmup_steps=10 is not allowed: use 0 when warmup_fraction is set",
        ),
        (["--model.lr_scheduler_interval", "epoch"], "lr_scheduler_interval=epoch is not allowed"),
    ],
)
def test_bad_schedule_settings_are_one_message_and_exit_2(args, message, in_tmp_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config("cifar10.yaml", "smoke.yaml"), *QUIET, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_run_resumed_mid_epoch_follows_the_same_schedule_to_the_end_value(tmp_path, monkeypatch):
    """Batch 64 → 96 at epoch 1 (12 + 8 steps instead of the 24 planned at the start), a crash at
    step 17 (mid-epoch 1; the last checkpoint is from step 15), then ``--ckpt_path last``: the
    resumed steps use exactly the uninterrupted run's learning rates, down to the end value."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))  # faults.CrashAtStep by class path
    growth = tmp_path / "growth.yaml"
    growth.write_text(
        "trainer:\n  callbacks+:\n    - class_path: lit_accel.callbacks.DynamicBatchLR\n"
        "      init_args: {policy: none, batch_size_schedule: {1: 96}}\n"
    )
    run = [
        *config("cifar10.yaml", "smoke.yaml"),
        *QUIET,
        "--config",
        str(growth),
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_train_batches",
        "1.0",
        "--step_checkpoint.every_n_train_steps",
        "3",
    ]

    def fit(folder: str, *extra: str) -> list[float]:
        (tmp_path / folder).mkdir(exist_ok=True)
        monkeypatch.chdir(tmp_path / folder)
        return _recorded_fit([*run, *extra])[1]

    uninterrupted = fit("a")
    assert len(uninterrupted) == 12 + 8  # 768 training images in batches of 64, then of 96
    with pytest.raises(RuntimeError, match="injected crash at step 17"):
        fit("b", "--trainer.callbacks+=faults.CrashAtStep", "--trainer.callbacks.step", "17")
    resumed = fit("b", "--ckpt_path", "last")
    assert resumed == uninterrupted[15:], "steps 15-19 repeat exactly"
    assert resumed[-1] == 0.0


def test_any_torch_scheduler_still_works_and_steps_every_epoch_unless_told(tmp_path):
    step_lr = partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    lrs, _ = _fit(tmp_path, step_lr, max_epochs=3)
    assert lrs == pytest.approx([PEAK_LR] * 8 + [PEAK_LR / 2] * 8 + [PEAK_LR / 4] * 8)


def test_a_run_resumed_mid_epoch_with_fewer_epochs_still_ends_at_the_end_value(tmp_path, monkeypatch):
    """Crash mid-epoch 1 of a 3-epoch run, resume it as a 2-epoch run: the resumed epoch is now the
    last, so the plan from the checkpoint (24 steps) must shrink to 16 at once, not at an epoch start."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    run = [*config("cifar10.yaml", "smoke.yaml"), *QUIET, "--step_checkpoint.every_n_train_steps", "3"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="injected crash at step 11"):
        _recorded_fit(
            [
                *run,
                "--trainer.max_epochs",
                "3",
                "--trainer.callbacks+=faults.CrashAtStep",
                "--trainer.callbacks.step",
                "11",
            ]
        )
    cli, resumed = _recorded_fit([*run, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 16 and len(resumed) == 16 - 9
    assert resumed[-1] == 0.0
    assert resumed == sorted(resumed, reverse=True), "decaying all the way, no jump"


class _NaNLossAt(Callback):
    """Makes the loss of the given optimizer steps NaN, so DivergenceGuard skips them."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pl_module._nan_now = trainer.global_step in self.steps


class _SometimesNaN(ImageClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if getattr(self, "_nan_now", False) else loss


def test_steps_the_divergence_guard_skips_still_end_the_schedule_on_the_last_step(tmp_path):
    """A skipped step holds the scheduler while trainer.global_step (and max_steps) count on."""
    from lit_accel.callbacks import DivergenceGuard

    recorder = LRRecorder()
    model = _SometimesNaN(BatchNormCNN(width=4), optimizer=partial(torch.optim.SGD, lr=PEAK_LR), lr_scheduler=SCHEDULE)
    data = CIFAR10DataModule(synthetic=True, synthetic_size=288, val_size=32, batch_size=32, augment=False)
    guard = DivergenceGuard(rollback_after=5)
    trainer = quiet_cpu_trainer(tmp_path, [guard, _NaNLossAt({20, 21}), recorder], limit_val_batches=0, max_epochs=3)
    trainer.fit(model, data)
    assert guard.skipped_steps == 2 and trainer.global_step == 24
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 22, "held on the two skipped steps"
    assert recorder.lrs[-1] == 0.0


def test_extending_a_finished_schedule_warns_that_the_new_steps_run_at_the_end_value():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = WarmupDecayLR(optimizer, decay="linear", start_factor=1.0, end_factor=0.0)
    scheduler.plan(5)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    with pytest.warns(UserWarning, match="the schedule already ended .* 5 steps added to the run use the end value"):
        scheduler.plan(10)
    assert optimizer.param_groups[0]["lr"] == 0.0


def test_the_cli_has_no_second_optimizer_or_scheduler_option(in_tmp_dir, capsys):
    """LightningCLI's own top-level --optimizer/--lr_scheduler would replace configure_optimizers and
    step WarmupDecayLR once an epoch; lit-accel configures them under model.* only."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config("cifar10.yaml", "smoke.yaml"), "--lr_scheduler", "lit_accel.schedules.WarmupDecayLR"])
    assert exit_info.value.code == 2
    assert "--lr_scheduler" in capsys.readouterr().err
