"""Precision: 32-true against bf16-mixed and 16-mixed (which runs as bf16-mixed on a CPU).

python -m tools.bench precision --full
"""

from __future__ import annotations

from tools.bench.fits import Run, Settings, lit_run


def variants(s: Settings) -> dict[str, Run]:
    label = "16-mixed" if s.device == "cuda" else "16-mixed (runs as bf16-mixed on CPU)"
    return {
        "32-true": lit_run(s),
        "bf16-mixed": lit_run(s, "--trainer.precision", "bf16-mixed"),
        label: lit_run(s, "--trainer.precision", "16-mixed"),
    }
