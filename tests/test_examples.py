"""The examples in examples/ run, and prove the engines outside Lightning: a NaN step is skipped with
the weights exactly unchanged, three in a row roll back to the snapshot, and the meter's rate
matches a clock the test reads itself over the same steps."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from lit_accel.core import Action
from lit_accel.core.divergence import Reason

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = ["plain_pytorch_loop", "fabric_loop"]  # engine_cost: its own test below
TINY = ["--batch_size", "8", "--log_every", "1000"]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def state(model: torch.nn.Module, optimizer: Any) -> dict[str, torch.Tensor]:
    """Copies of every weight, buffer and optimizer-state tensor, by name."""
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for index, entry in optimizer.state_dict()["state"].items():
        out.update({f"optim.{index}.{k}": torch.as_tensor(v).clone() for k, v in entry.items()})
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Recorder:
    """on_step for the examples: the state after chosen steps, each step's verdict, images and time."""

    def __init__(self, keep: tuple[int, ...] = (), sleep: float = 0.0) -> None:
        self.keep, self.sleep = keep, sleep
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.verdicts: dict[int, Any] = {}
        self.times: list[float] = []
        self.images: list[int] = []
        self.lrs: dict[int, float] = {}

    def __call__(self, step: int, images: int, model: torch.nn.Module, optimizer: Any, verdict: Any) -> None:
        self.times.append(time.perf_counter())  # first: as close to the meter's own stop as possible
        self.images.append(images)
        self.verdicts[step] = verdict
        self.lrs[step] = optimizer.param_groups[0]["lr"]
        if step in self.keep:
            self.states[step] = state(model, optimizer)
        time.sleep(self.sleep)  # a slow data source: the meter counts this as the next step's wait


# One run of each example serves every test: NaN at step 4 (skipped); a snapshot after step 3
# (--snapshot_every 4: steps 0-3 good); steps 5 and 6 train; NaN at 7, 8, 9: the third rolls back to
# step 3's state. The meter skips 3 warm-up steps; each step is followed by a 20 ms sleep, which the
# meter counts as data wait.
STEPS, WARMUP, SKIPPED, ROLLED_BACK = 11, 3, 4, 9
ARGV = [*TINY, "--steps", str(STEPS), "--warmup", str(WARMUP), "--snapshot_every", "4", "--nan_at", "4", "7", "8", "9"]


@pytest.fixture(scope="module", params=NAMES)
def run(request: pytest.FixtureRequest) -> tuple[Recorder, dict[str, Any]]:
    rec = Recorder(keep=(3, 4, 5, 6, 9, 10), sleep=0.02)
    return rec, load(request.param).main(ARGV, rec)


def test_a_nan_step_is_skipped_with_the_weights_unchanged_and_training_goes_on(run) -> None:
    rec, _ = run
    verdict = rec.verdicts[SKIPPED]
    assert verdict.action is Action.SKIP and verdict.reason is Reason.NON_FINITE_LOSS
    assert same(rec.states[4], rec.states[3])  # weights, buffers, Adam's moments and step: all untouched
    after = rec.states[5]
    assert all(torch.isfinite(v).all() for v in after.values())
    weights = [k for k in after if k.startswith("model.")]
    assert all(not torch.equal(after[k], rec.states[4][k]) for k in weights)  # step 5 trained every weight


def test_three_bad_steps_in_a_row_roll_back_to_the_snapshot_with_the_lr_lowered(run) -> None:
    rec, result = run
    assert [rec.verdicts[s].action for s in range(7, 11)] == [Action.SKIP, Action.SKIP, Action.ROLLBACK, Action.OK]
    assert not same(rec.states[6], rec.states[3])  # steps 5 and 6 trained after the snapshot
    assert same(rec.states[ROLLED_BACK], rec.states[3])  # weights and optimizer state of the snapshot
    assert rec.lrs[ROLLED_BACK] == pytest.approx(0.5 * rec.lrs[6])  # the detector's lr_backoff
    assert not same(rec.states[10], rec.states[ROLLED_BACK])  # and training goes on
    assert (result["detector"].skipped_steps, result["detector"].rollbacks) == (4, 1)


def test_the_meters_rate_matches_a_clock_read_around_the_same_steps(run) -> None:
    rec, result = run
    tally, metrics = result["tally"], result["metrics"]
    # The meter times the steps after the warm-up: from the end of step WARMUP-1 to the end of the last.
    images = sum(rec.images[WARMUP:])
    seconds = rec.times[-1] - rec.times[WARMUP - 1]
    assert (tally.batches, tally.samples) == (STEPS - WARMUP, images)
    assert metrics["samples_per_sec"] == pytest.approx(images / seconds, rel=0.02)
    assert metrics["data_wait_fraction"] > 0  # the sleeps are data wait
    assert metrics["flops_per_sample"] > 0 and 0 < metrics["mfu"] < 1


def test_engine_cost_runs_each_variant_with_its_engines_in_alternating_rounds(capsys, monkeypatch) -> None:
    module = load("engine_cost")
    calls = []
    for name in ("check", "start"):  # the guard's and the meter's per-step calls
        owner = module.DivergenceDetector if name == "check" else module.Throughput
        real = getattr(owner, name)
        counted = lambda self, *a, real=real, name=name, **k: calls.append(name) or real(self, *a, **k)  # noqa: E731
        monkeypatch.setattr(owner, name, counted)
    out = module.main(["--rounds", "2", "--steps", "1", "--warmup", "1", "--batch_size", "4"])
    # warm-up: bare, guard, meter, both (the meter starts a step before the guard checks it); then
    # 2 rounds, the second in reverse order
    listed = ["check", "start", "start", "check"]
    assert calls == listed + listed + ["start", "check", "start", "check"]
    assert out["loop"].steps == 12
    assert {n: len(r) for n, r in out["rates"].items()} == dict.fromkeys(module.VARIANTS, 2)
    assert all(share == 0.0 for share in out["shares"]["bare"])
    assert all(0.0 < share < 1.0 for name in ("guard", "meter", "guard + meter") for share in out["shares"][name])
    assert capsys.readouterr().out.count("| bare | ") == 1


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("plain_pytorch_loop", ["--steps", "0"]),
        ("plain_pytorch_loop", ["--snapshot_every", "-1"]),
        ("fabric_loop", ["--batch_size", "0"]),
        ("engine_cost", ["--rounds", "0"]),
        ("engine_cost", ["--warmup", "-1"]),
    ],
)
def test_a_bad_count_is_one_usage_error(name, argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        load(name).parse_args(argv)
    assert stopped.value.code == 2
    assert f"{argv[0]} {argv[1]}: use" in capsys.readouterr().err
