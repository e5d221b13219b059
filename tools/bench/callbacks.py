"""What lit_accel's own callbacks cost together: ``lit-accel fit`` with ThroughputMeter, DivergenceGuard
and DynamicBatchLR against none (one callback alone, with less noise: ``callback_overhead``).

    python -m tools.bench callbacks --reps 9
"""

from __future__ import annotations

from typing import Any

from tools.bench.fits import Run, Settings, lit_run


def _all_callbacks() -> list[Any]:
    from lit_accel.callbacks import DivergenceGuard, DynamicBatchLR, ThroughputMeter

    return [ThroughputMeter(), DivergenceGuard(), DynamicBatchLR()]


def variants(s: Settings) -> dict[str, Run]:
    return {"no callbacks": lit_run(s), "meter + guard + dynamic": lit_run(s, callbacks=_all_callbacks)}
