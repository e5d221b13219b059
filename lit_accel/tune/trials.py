"""Real trials for ``lit-accel tune``: short ``lit-accel fit`` runs of the recipe with one setting,
timed by :class:`lit_accel.measure.FitTimer`, in this process (or their own, for several processes)."""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lit_accel.measure import TRIAL_FIT_ARGS, FitTimer, fit_in_process_tree, quiet
from lit_accel.tune.levers import Setting
from lit_accel.tune.search import Trial

__all__ = ["FitTrials", "duration"]


def duration(seconds: float) -> str:
    """Lightning's ``max_time`` string, ``DD:HH:MM:SS`` (two digits each), at least one second."""
    minutes, secs = divmod(max(1, math.ceil(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{secs:02d}"


class FitTrials:
    """The trial runner of ``lit-accel tune``: ``FitTrials(fit_args)(setting, seconds_left)`` trains
    the recipe with the setting's overrides for ``warmup_steps + timed_steps`` optimizer steps.

    Validation, checkpoints and the progress bar are off, the logs go to a temporary folder, and
    the training stops when ``seconds_left`` runs out (Trainer ``max_time``: a trial cut short is a
    failed one). The working folder stays the user's, so the recipe's relative paths mean what they
    mean to ``fit``. A trial that fails (out of memory, a setting this machine refuses) is a
    :class:`~lit_accel.tune.search.Trial` with its ``error``; SIGTERM and Ctrl-C are not caught.

    Args:
        fit_args: the recipe: ``--config`` files and overrides, as for ``lit-accel fit``.
        warmup_steps: optimizer steps not timed.
        timed_steps: optimizer steps timed.
    """

    def __init__(self, fit_args: list[str], warmup_steps: int = 3, timed_steps: int = 10) -> None:
        self.fit_args = list(fit_args)
        self.warmup_steps = warmup_steps
        self.timed_steps = timed_steps

    def __call__(self, setting: Setting | None, seconds_left: float) -> Trial:
        steps = self.warmup_steps + self.timed_steps
        # Epochs unbounded, so the trial runs its steps whatever the recipe's epochs and batch limits.
        length = ["--trainer.max_epochs", "-1", "--trainer.max_steps", str(steps)]
        length += ["--trainer.max_time", duration(seconds_left)]
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="lit-accel-tune-") as folder:
            where = ["--trainer.default_root_dir", folder, "--trainer.logger.init_args.save_dir", folder]
            # Ctrl-C is tune's to handle (exit 130): the recipe's PreemptionCheckpoint would turn it
            # into a SIGTERM (exit 143) and a checkpoint of the trial
            where += ["--preemption.handle_sigint", "false"]
            args = [*self.fit_args, *(setting.args if setting else ()), *TRIAL_FIT_ARGS, *where, *length]
            try:
                if setting is not None and setting.processes > 1:
                    result = self._in_subprocess(args, seconds_left)
                else:
                    result = self._in_process(args)
                if not result:
                    raise RuntimeError(
                        f"stopped before {steps} optimizer steps: out of the budget's time, or the run is shorter"
                    )
                trial = Trial(
                    images_per_sec=float(result["images_per_sec"]),
                    data_wait=float(result["data_wait"]),
                    peak_memory_mb=float(result["peak_memory_mb"]),
                )
            except torch.OutOfMemoryError:
                trial = Trial(error="out of memory")
            except SIGTERMException:
                raise  # a SystemExit, but the user stopping tune itself, not a failed trial
            except (Exception, SystemExit) as error:  # a failed trial is a result: the table shows why
                lines = str(error).strip().splitlines()
                trial = Trial(error=f"{type(error).__name__}: {lines[-1] if lines else ''}"[:160])
        trial.seconds = time.perf_counter() - started
        return trial

    def _in_process(self, args: list[str]) -> dict[str, Any]:
        from lit_accel.cli import LitAccelCLI

        timer = FitTimer(self.warmup_steps, self.timed_steps)

        class _TrialCLI(LitAccelCLI):
            @override
            def instantiate_classes(self) -> None:
                super().instantiate_classes()
                self.trainer.callbacks.append(timer)  # type: ignore[attr-defined]  # set by a Lightning connector

        threads = torch.get_num_threads()
        try:
            with quiet():
                _TrialCLI(args=["fit", *args])
        finally:
            torch.set_num_threads(threads)
        return dict(timer.result)

    def _in_subprocess(self, args: list[str], seconds_left: float) -> dict[str, Any]:
        # max_time bounds the training; start-up and set-up get a minute on top
        return fit_in_process_tree(args, self.warmup_steps, self.timed_steps, timeout=seconds_left + 60)
