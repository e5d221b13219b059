"""DDP scaling: 1 process against 2 with the same global batch, each ``lit-accel fit`` its own process
tree (global images/s; scaling efficiency = ratio / 2).

    python -m tools.bench ddp --full
"""

from __future__ import annotations

from tools.bench.fits import Run, Settings, subprocess_run


def variants(s: Settings) -> dict[str, Run]:
    return {"1 process": subprocess_run(s, 1), "DDP, 2 processes": subprocess_run(s, 2)}
