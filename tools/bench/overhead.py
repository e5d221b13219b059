"""What the trainer costs: tools/plain_loop.py against ``lit-accel fit`` (recipe callbacks off), same
network, batch, optimizer and data.

    python -m tools.bench overhead --reps 9
"""

from __future__ import annotations

from tools.bench.fits import Run, Settings, lit_run, plain_run


def variants(s: Settings) -> dict[str, Run]:
    return {"plain PyTorch loop": plain_run(s), "lit-accel fit": lit_run(s)}
