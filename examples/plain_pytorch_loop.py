"""lit_accel's guard and meter engines in a plain PyTorch training loop (no Lightning).

The guard (``lit_accel.core.DivergenceDetector``) judges every step from its loss and gradient
norm: a NaN/inf or spiking step's update is dropped (weights and optimizer state untouched);
``rollback_after`` bad steps in a row restore the last ``Snapshot`` with a lower learning rate;
a rollback needed after ``max_rollbacks`` stops. The meter (``lit_accel.core.throughput``) times
every step after a warm-up, split into data wait and compute: images/s, FLOP/s, MFU (on a CPU
relative to a measured matmul peak), peak memory.

    python examples/plain_pytorch_loop.py                   # a few seconds on 2 CPU cores
    python examples/plain_pytorch_loop.py --nan_at 25       # step 25's loss is NaN: skipped
    python examples/plain_pytorch_loop.py --nan_at 25 26 27 # three bad steps in a row: roll back
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from lit_accel import SeedCNN, make_synthetic_cifar
from lit_accel.core import (
    Action,
    BatchFlops,
    DivergenceDetector,
    Snapshot,
    Throughput,
    back_off,
    device_peak_flops,
    drop_gradients,
    format_summary,
    peak_memory_mb,
    throughput_metrics,
    total_norm,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="lit_accel's guard and meter engines in a plain PyTorch loop")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3, help="steps the meter does not time (>= 1: step 0 counts FLOPs)")
    p.add_argument("--snapshot_every", type=int, default=20, help="good steps between rollback snapshots")
    p.add_argument("--log_every", type=int, default=20)
    p.add_argument("--nan_at", type=int, nargs="*", default=[], help="steps whose loss (and gradients) become NaN")
    p.add_argument("--spike_at", type=int, nargs="*", default=[], help="steps whose loss is made 100x larger")
    p.add_argument("--no_mfu", dest="mfu", action="store_false", help="skip the CPU matmul peak (0.2-1 s)")
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error(f"--warmup {args.warmup}: use 1 or more (step 0 counts FLOPs and runs slower)")
    for name in ("steps", "batch_size", "snapshot_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: use 1 or more")
    return args


def batches(images: torch.Tensor, labels: torch.Tensor, size: int, gen: torch.Generator) -> Iterator[Any]:
    """Endless shuffled full batches, normalized and flipped at random on the host (the data wait)."""
    while True:
        order = torch.randperm(len(images), generator=gen)
        for i in range(0, len(order) - size + 1, size):
            idx = order[i : i + size]
            x = images[idx].float().div_(255)
            flip = torch.rand(size, generator=gen) < 0.5
            x[flip] = x[flip].flip(-1)
            yield (x - 0.5) / 0.25, labels[idx]


def main(argv: list[str] | None = None, on_step: Callable[..., None] | None = None) -> dict[str, Any]:
    """Trains; ``on_step(step, images, model, optimizer, verdict)`` runs after every step (tests use it)."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    images, labels = make_synthetic_cifar(8 * args.batch_size, seed=args.seed)
    loader = batches(images, labels, args.batch_size, torch.Generator().manual_seed(args.seed))
    model = SeedCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    params = list(model.parameters())

    detector = DivergenceDetector(rollback_after=3, max_rollbacks=2, snapshot_every=args.snapshot_every)
    snapshot = Snapshot.take(model, optimizer, step=0)  # the first rollback target
    meter, flops = Throughput("cpu", warmup_steps=args.warmup), BatchFlops()
    began = time.perf_counter()

    for step in range(args.steps):
        x, y = next(loader)
        if step == 0:
            flops.start(len(x))  # count this real step's FLOPs once (it runs slower: in the warm-up)
        meter.start(samples=len(x), flops=flops.counted.get(len(x)))  # not timed in the warm-up

        loss = F.cross_entropy(model(x), y)
        if step in args.nan_at:
            loss = loss * float("nan")  # a bad batch: NaN loss and NaN gradients
        if step in args.spike_at:
            loss = loss * 100.0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = total_norm([p.grad for p in params if p.grad is not None]).item()
        verdict = detector.check(loss.item(), grad_norm, lambda: total_norm(params).item())
        if verdict.drops_update:
            drop_gradients(optimizer)  # gradients None: step() changes no weight and no Adam state
        optimizer.step()
        if verdict.snapshot_due:
            snapshot = Snapshot.take(model, optimizer, step=step + 1, reuse=snapshot)
        elif verdict.action is Action.ROLLBACK:
            back_off(snapshot, model, optimizer, [], detector)  # weights of step snapshot.step, LR lowered
        elif verdict.action is Action.STOP:
            snapshot.restore(model, optimizer)
            print(f"step {step}: stopped ({verdict.reason_text}); weights of step {snapshot.step} restored")
            break
        if verdict.action is not Action.OK:
            print(f"step {step}: {verdict.action.value} ({verdict.reason_text})")

        if step == 0:
            flops.stop()
        meter.stop()
        if on_step is not None:
            on_step(step, len(x), model, optimizer, verdict)
        if (step + 1) % args.log_every == 0:
            rate = throughput_metrics(meter.take_interval()).get("samples_per_sec", float("nan"))
            print(f"{step + 1} steps: loss {loss.item():.3f}, {rate:,.0f} images/s")

    meter.flush()
    peak = device_peak_flops("cpu", "32-true") if args.mfu else None
    metrics = throughput_metrics(meter.total, peak.flops if peak else None, peak_memory_mb())
    wall = time.perf_counter() - began
    note = peak.note if peak else "--no_mfu"
    print(format_summary(metrics, 1, meter.total.batches, meter.total.seconds, wall, note, "Meter"))
    print(f"Guard: {detector.skipped_steps} steps skipped, {detector.rollbacks} rollbacks")
    return {"model": model, "detector": detector, "tally": meter.total, "metrics": metrics}


if __name__ == "__main__":
    main()
