"""Cost of seeding each sample's augmentation in the DataLoader pipeline (exact resume, any workers).

Fetches ``--samples`` training samples in batches of ``--batch_size`` (``__getitems__``, as the
DataLoader does) through the pipeline's per-sample transform (the recipe's flip, plus random crop
and cutout), with the per-sample seed (``seed`` set, as the data module builds it) and without it
(the transform draws from the global RNG), alternating the two for ``--reps`` rounds in one
process. Prints each variant's median microseconds per sample and the
median of the paired ratios (BENCHMARKS.md quotes them).

Usage::

    python tools/bench_sample_seed.py
    python tools/bench_sample_seed.py --samples 5000 --reps 9
"""

from __future__ import annotations

import argparse
import statistics
import time

from lit_accel import CIFAR10DataModule
from lit_accel.data.datasets import TransformedTensorDataset


def _microseconds_per_sample(dataset: TransformedTensorDataset, batch_size: int) -> float:
    start = time.perf_counter()
    for first in range(0, len(dataset), batch_size):
        dataset.__getitems__(range(first, min(first + batch_size, len(dataset))))
    return (time.perf_counter() - start) / len(dataset) * 1e6


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=3000, help="samples fetched per round and variant")
    parser.add_argument("--reps", type=int, default=7, help="rounds; each fetches with and without the seed")
    parser.add_argument("--batch_size", type=int, default=256, help="samples per batched fetch (the recipe's batch)")
    args = parser.parse_args(argv)
    if min(args.samples, args.reps, args.batch_size) < 1:
        parser.error(f"--samples {args.samples}, --reps {args.reps}, --batch_size {args.batch_size}: use 1 or more")
    data = CIFAR10DataModule(
        synthetic=True, synthetic_size=args.samples + 1, val_size=0, random_crop=True, cutout=8, pipeline="dataloader"
    )
    data.setup("fit")
    images, labels = data._splits["train"]
    transform = data._per_sample_transform(train=True)
    variants = {
        "seeded": TransformedTensorDataset(images, labels, transform, seed=0),
        "global RNG": TransformedTensorDataset(images, labels, transform, seed=None),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(args.reps):
        order = list(variants) if rep % 2 == 0 else list(variants)[::-1]
        for name in order:
            times[name].append(_microseconds_per_sample(variants[name], args.batch_size))
    ratio = statistics.median(a / b for a, b in zip(times["seeded"], times["global RNG"]))
    print("| variant | median us per sample |")
    print("| --- | ---: |")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} |")
    print(f"median paired ratio seeded / global RNG: {ratio:.3f} ({args.reps} rounds of {args.samples} samples)")
    return {"ratio": ratio, **{name: statistics.median(values) for name, values in times.items()}}


if __name__ == "__main__":
    main()
