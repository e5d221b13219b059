"""``lit-accel tune``: measure the acceleration levers on this machine and write the fastest as a config.

With the user's own recipe (the same ``--config`` files and overrides as ``lit-accel fit``), it runs
short timed trials through the real ``fit`` code (LightningCLI, Trainer, data module), one lever at
a time against the recipe as given (the baseline), in rounds: every round runs the baseline and
then each setting, in reversed order on every other round, and a setting's figure is the median
over rounds of its images/s divided by the same round's baseline, so a drifting load on a shared
machine cancels. Each trial trains ``warmup_steps + timed_steps`` optimizer steps with validation,
checkpoints and logging off, in a temporary folder; only the timed steps count.

Levers (``--levers``, default: all that apply here, cheapest first):

* ``channels_last``: the other memory layout (training unchanged);
* ``threads``: intra-op CPU threads (``num_threads``: 1, half and all of the cores), on a CPU
  (training unchanged up to the order of floating-point sums);
* ``pipeline``: the other input pipeline: preload in host memory, preload on the GPU
  (``data.residency: device``, where there is a GPU), the DataLoader one with 0 to 4 workers (same
  data, other random streams for augmentation: training unchanged in distribution);
* ``precision``: ``bf16-mixed`` against ``32-true`` (and ``16-mixed`` on a CUDA GPU): **changes
  what is learned** (rounding);
* ``batch_size``: half, 2, 4 and 8 times the per-device batch (up to the training split's size),
  the learning rate scaled by the rule the optimizer needs (square root for Adam-type, linear
  otherwise); a batch that does not fit in memory is a failed trial, so the fastest that fits is
  found: **changes what is learned**;
* ``compile``: ``torch.compile`` of the network (default only on a GPU: on a CPU compiling takes
  longer than a short trial; name it to try);
* ``ddp``: 2 processes or more (the CPU cores / GPUs here), the same global batch: **changes what
  is learned** (BatchNorm statistics per process). Runs as a subprocess.

Each trial's training is stopped when the budget runs out (Trainer ``max_time``; a trial cut
short is shown as failed). ``--unchanged_training_only`` keeps to the levers that leave training
unchanged. A setting is taken when it is at least ``--min_gain`` faster; the winners of several levers are then measured
together once (when the budget allows), and kept together only if that is faster than the best
single one. A trial that fails (out of memory, a setting this machine refuses) is a result, shown
in the table, not a crash.

Usage::

    lit-accel tune --config configs/cifar10.yaml --budget_s 120 --output tuned.yaml
    lit-accel fit --config configs/cifar10.yaml --config tuned.yaml

Prints a table (lever, setting, images/s, ratio to the baseline, data wait, the trial's own peak
memory, whether training changes) and writes a YAML that composes after the user's configs; each
entry carries a comment saying what it changes. Ctrl-C exits 130, SIGTERM 143, writing nothing.

Modules: :mod:`~lit_accel.tune.levers` (the levers and their settings), :mod:`~lit_accel.tune.search`
(the search, given a trial runner and a clock), :mod:`~lit_accel.tune.trials` (real trials),
:mod:`~lit_accel.tune.report` (the table and the YAML); timing, rounds and tables come from
:mod:`lit_accel.measure`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from lit_accel.measure import quiet
from lit_accel.tune.levers import LEVERS, Lever, Setting, combine, plan_levers
from lit_accel.tune.report import table, tuned_yaml
from lit_accel.tune.search import Measured, Report, Trial, TrialRunner, search
from lit_accel.tune.trials import FitTrials

__all__ = [
    "LEVERS",
    "FitTrials",
    "Lever",
    "Measured",
    "Report",
    "Setting",
    "Stopped",
    "Trial",
    "TrialRunner",
    "combine",
    "main",
    "plan_levers",
    "search",
    "stop_on_signals",
    "table",
    "tuned_yaml",
]


class Stopped(BaseException):
    """Raised by :func:`stop_on_signals` when SIGINT or SIGTERM arrives (a BaseException, so that no
    trial takes it for its own failure); ``signum`` says which.

    Args:
        signum: the signal received.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """The shell's convention: 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside, SIGINT (Ctrl-C) and SIGTERM raise :class:`Stopped` naming the signal (main thread only).

    Lightning runs its own SIGTERM handler during a fit and then this one; the trials switch off the
    recipe's Ctrl-C handling (PreemptionCheckpoint), so Ctrl-C reaches this one as itself.
    """

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Stopped(signum)

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _with_progress(run_trial: TrialRunner, planned: int) -> tuple[TrialRunner, Any]:
    """The runner with a progress bar on stderr counting its trials, and the bar (to close)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=planned, desc="lit-accel tune", unit="trial", file=sys.stderr)

    def run(setting: Setting | None, seconds_left: float) -> Trial:
        trial = run_trial(setting, seconds_left)
        bar.update(1)
        bar.set_postfix_str(setting.name if setting else "baseline")
        return trial

    return run, bar


def _check_output(path: str) -> Path:
    output = Path(path)
    if output.is_dir():
        raise ValueError(f"--output {path} is a folder: give a file name, e.g. {output / 'tuned.yaml'}")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"--output {path}: the folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise ValueError(f"--output {path} cannot be written (no permission); choose another path")
    return output


def _write_atomically(path: Path, text: str) -> None:
    """All or nothing: a failed write leaves no partial YAML (and an older file as it was)."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
        temporary = handle.name
    try:
        os.replace(temporary, path)
    except OSError:
        os.unlink(temporary)
        raise


def main(argv: list[str], run_trial: TrialRunner | None = None) -> int:
    """``lit-accel tune ARGS``: returns the exit status (2 with one message for bad input; 130 after
    Ctrl-C, 143 after SIGTERM, with nothing written).

    Args:
        argv: the arguments after ``tune``.
        run_trial: the trial runner (default :class:`FitTrials` of the recipe); tests pass a scripted one.
    """
    parser = argparse.ArgumentParser(
        prog="lit-accel tune",
        description="Measure the acceleration levers on this machine and write the fastest as a config.",
        epilog="Every other argument (--config files, --model.*, --data.*, --trainer.*) is the recipe, as for fit.",
    )
    parser.add_argument("--budget_s", type=float, default=120.0, help="seconds for all trials (default 120)")
    parser.add_argument("--output", default="tuned.yaml", help="the YAML to write (default tuned.yaml)")
    parser.add_argument("--levers", help=f"comma-separated, some of {','.join(LEVERS)} (default: all that apply)")
    parser.add_argument(
        "--unchanged_training_only", action="store_true", help="only levers that leave what is learned unchanged"
    )
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed optimizer steps per trial")
    parser.add_argument("--timed_steps", type=int, default=10, help="timed optimizer steps per trial")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of trials (each: recipe, then every setting)")
    parser.add_argument("--min_gain", type=float, default=0.03, help="a setting must be this much faster (0.03: 3%%)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args, fit_args = parser.parse_known_args(argv)
    bar = None
    try:
        with stop_on_signals():
            for name in ("budget_s", "warmup_steps", "timed_steps", "rounds"):
                if not 0 < getattr(args, name) < math.inf:
                    raise ValueError(f"--{name}={getattr(args, name)} is not allowed: use a positive (finite) number")
            if not args.min_gain >= 0:
                raise ValueError(f"--min_gain={args.min_gain} is not allowed: use 0 or more")
            output = _check_output(args.output)
            wanted = None if args.levers is None else [n.strip() for n in args.levers.split(",") if n.strip()]
            if wanted == []:
                raise ValueError(f"--levers {args.levers!r} names no lever: use some of {', '.join(LEVERS)}")
            unknown = [n for n in wanted or [] if n not in LEVERS]
            if unknown:
                raise ValueError(f"--levers {','.join(unknown)} is not allowed: use some of {', '.join(LEVERS)}")
            config = _parse_recipe(fit_args)
            levers, skipped = plan_levers(config, wanted, args.unchanged_training_only)
            if wanted is not None and skipped:
                raise ValueError("--levers: " + "; ".join(skipped))
            if not levers:
                raise ValueError("no lever applies to this recipe on this machine: " + "; ".join(skipped))
            runner = run_trial or FitTrials(fit_args, args.warmup_steps, args.timed_steps)
            if not args.no_progress:
                planned = args.rounds * (1 + sum(len(lever.settings) for lever in levers))
                runner, bar = _with_progress(runner, planned)
            report = search(levers, runner, args.budget_s, args.rounds, args.min_gain)
    except ValueError as error:
        print(f"lit-accel tune: error: {error}", file=sys.stderr)
        return 2
    except Stopped as stop:
        how = "Ctrl-C" if stop.signum == signal.SIGINT else signal.Signals(stop.signum).name
        print(f"lit-accel tune: stopped ({how}); nothing was written", file=sys.stderr)
        return stop.exit_status
    finally:
        if bar is not None:
            bar.close()
    print(table(report))
    for line in skipped:
        print(f"# not measured: {line}")
    if report.not_combined:
        print("# the budget left no time to measure the winners of several levers together: only the fastest is kept")
    command = "lit-accel tune " + " ".join(argv)
    _write_atomically(output, tuned_yaml(report, command))
    chosen = ", ".join(f"{s.lever}={s.name}" for s in report.chosen) or "nothing (the recipe is the fastest)"
    print(f"# {report.seconds:.0f} s of trials; chosen: {chosen}; written to {output}")
    return 0


def _parse_recipe(fit_args: list[str]) -> Any:
    """The recipe's ``fit`` config, parsed as ``lit-accel fit`` parses it (bad arguments: exit 2)."""
    from lit_accel.cli import LitAccelCLI

    with quiet():
        cli = LitAccelCLI(args=fit_args, run=False)  # run=False: no subcommand, the fit arguments alone
    return cli.config
