"""Helpers for timing runs in-process: quiet Lightning output and this process's peak memory.

Shared by ``lit-accel tune`` and the benchmarks in ``tools/``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

__all__ = ["peak_rss_mb", "quiet", "reset_peak_rss"]


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
