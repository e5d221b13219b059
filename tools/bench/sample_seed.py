"""Cost of seeding each sample's augmentation in the DataLoader pipeline (exact resume, any workers).

Fetches ``--samples`` training samples in batches of ``--batch_size`` (``__getitems__``, as the
DataLoader does) through the pipeline's per-sample transform (the recipe's flip, plus random crop
and cutout), with the per-sample seed (``seed`` set, as the data module builds it) and without it
(the transform draws from the global RNG), alternating the two for ``--reps`` rounds in one
process. Prints each variant's median microseconds per sample and the
median of the paired ratios (BENCHMARKS.md quotes them).

Usage::

    python -m tools.bench sample_seed
    python -m tools.bench sample_seed --samples 5000 --reps 9
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from lit_accel import CIFAR10DataModule
from lit_accel.data.datasets import TransformedTensorDataset
from lit_accel.measure import alternate, markdown_table, median, paired_ratios


def _microseconds_per_sample(dataset: TransformedTensorDataset, batch_size: int) -> float:
    start = time.perf_counter()
    for first in range(0, len(dataset), batch_size):
        dataset.__getitems__(range(first, min(first + batch_size, len(dataset))))
    return (time.perf_counter() - start) / len(dataset) * 1e6


def _fetch(dataset: TransformedTensorDataset, batch_size: int) -> Callable[[], float]:
    return lambda: _microseconds_per_sample(dataset, batch_size)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench sample_seed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    times = alternate({name: _fetch(dataset, args.batch_size) for name, dataset in variants.items()}, args.reps)
    ratio = median(paired_ratios(times["seeded"], times["global RNG"]))
    print(markdown_table(["variant", "median us per sample:"], [[n, f"{median(v):.1f}"] for n, v in times.items()]))
    print(f"median paired ratio seeded / global RNG: {ratio:.3f} ({args.reps} rounds of {args.samples} samples)")
    return {"ratio": ratio, **{name: median(values) for name, values in times.items()}}


if __name__ == "__main__":
    main()
