"""The input pipelines: preload (the default) against the DataLoader one with 0, 1 and 2 workers.

python -m tools.bench pipeline --full --net BatchNormCNN
"""

from __future__ import annotations

from tools.bench.fits import Run, Settings, lit_run


def variants(s: Settings) -> dict[str, Run]:
    runs = {"preload": lit_run(s)}
    for workers in (0, 1, 2):
        dataloader = ("--data.pipeline", "dataloader", "--data.num_workers", str(workers))
        runs[f"dataloader, {workers} workers"] = lit_run(s, *dataloader)
    return runs
