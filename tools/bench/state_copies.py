"""Cost of the host copies the callbacks take of a model: GeneralizationMonitor's best weights
(parameters and buffers) and DivergenceGuard's snapshot (those plus the optimizer state).

Times ``--copies`` copies of each and prints min and median in ms (BENCHMARKS.md quotes them).
The optimizer state is created by one real SGD-with-momentum step, as in a run.

Usage::

    python -m tools.bench state_copies                        # LiteCNN width 16 (the recipe's)
    python -m tools.bench state_copies --net SeedCNN --copies 100
"""

from __future__ import annotations

import argparse
import time

import torch

from lit_accel import models
from lit_accel.core.snapshot import Snapshot, host_weights
from lit_accel.measure import markdown_table, median


def _times_ms(fn, copies: int) -> list[float]:
    fn()  # first call allocates; the callbacks reuse their buffers afterwards where they can
    times = []
    for _ in range(copies):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench state_copies",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--net", default="LiteCNN", help="a network of lit_accel.models")
    parser.add_argument("--width", type=int, default=16, help="network width, for networks that take one")
    parser.add_argument("--copies", type=int, default=50)
    args = parser.parse_args(argv)
    net_class = getattr(models, args.net)
    try:
        net = net_class(width=args.width)
    except TypeError:
        net = net_class()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net(torch.randn(8, 3, 32, 32)).sum().backward()
    optimizer.step()
    numbers = sum(t.numel() for t in [*net.parameters(), *net.buffers()])
    snapshot = Snapshot.take(net, optimizer, [], 0)
    rows = {
        "GeneralizationMonitor best-weights copy": _times_ms(lambda: host_weights(net), args.copies),
        "DivergenceGuard snapshot (buffers reused)": _times_ms(
            lambda: Snapshot.take(net, optimizer, [], 0, reuse=snapshot), args.copies
        ),
        "DivergenceGuard restore": _times_ms(lambda: snapshot.restore(net, optimizer, []), args.copies),
    }
    print(
        f"# {args.net}: {numbers / 1e6:.2f} M parameter and buffer numbers, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.copies} copies"
    )
    cells = [[name, f"{min(times):.2f}", f"{median(times):.2f}"] for name, times in rows.items()]
    print(markdown_table(["copy", "min ms:", "median ms:"], cells))


if __name__ == "__main__":
    main()
