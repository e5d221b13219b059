"""Helpers for timing runs in-process: the overrides of a timed trial, quiet Lightning output and this
process's peak memory.

Shared by ``lit-accel tune`` and the benchmarks in ``tools/``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

__all__ = ["NO_CHECKPOINT_ARGS", "TRIAL_FIT_ARGS", "peak_rss_mb", "quiet", "reset_peak_rss"]

# `lit-accel fit` overrides that write no checkpoint: a timed run's figures must not include saving.
NO_CHECKPOINT_ARGS = [
    "--checkpoint.monitor",
    "null",
    "--checkpoint.save_top_k",
    "0",
    "--checkpoint.save_last",
    "false",
    "--step_checkpoint.every_n_train_steps",
    "0",
]

# `lit-accel fit` overrides for a timed trial: no validation, progress bar, summary or checkpoint, and
# the log in the trial's own (temporary) working folder, whatever the recipe logs to.
TRIAL_FIT_ARGS = [
    "--trainer.limit_val_batches",
    "0",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    # A logger is needed (the CLI's LearningRateMonitor refuses to run without one): a CSV one in
    # the trial's temporary folder, whatever the recipe logs to.
    "--trainer.logger",
    "lightning.pytorch.loggers.CSVLogger",
    "--trainer.logger.init_args.save_dir",
    ".",
    *NO_CHECKPOINT_ARGS,
]


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB since the last :func:`reset_peak_rss` (Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # not on Windows; ru_maxrss is the peak over the process's life

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Linux >= 4.0: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep Lightning's per-run banners, warnings and printed output out of a caller's own output."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric", "lit_accel")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
