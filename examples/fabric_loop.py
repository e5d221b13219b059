"""lit_accel's guard and meter engines in a Lightning Fabric training loop.

The same engines as ``plain_pytorch_loop.py``, with Fabric doing the device, precision and
processes: ``fabric.backward``, and the loss, the meter's figures and the guard's numbers reduced
over the ranks with ``fabric.all_reduce``, so every rank takes the same decision.

    python examples/fabric_loop.py                    # CPU, one process, a few seconds on 2 cores
    python examples/fabric_loop.py --nan_at 25        # step 25's loss is NaN: skipped
    python examples/fabric_loop.py --devices 2        # two CPU processes (DDP, gloo)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric

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
    p = argparse.ArgumentParser(description="lit_accel's guard and meter engines in a Lightning Fabric loop")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3, help="steps the meter does not time (>= 1: step 0 counts FLOPs)")
    p.add_argument("--snapshot_every", type=int, default=20, help="good steps between rollback snapshots")
    p.add_argument("--log_every", type=int, default=20)
    p.add_argument("--nan_at", type=int, nargs="*", default=[], help="steps whose loss (and gradients) become NaN")
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
    fabric = Fabric(accelerator=args.accelerator, devices=args.devices, precision=args.precision)
    fabric.launch()
    torch.manual_seed(args.seed)
    images, labels = make_synthetic_cifar(8 * args.batch_size, seed=args.seed, split=fabric.global_rank)
    loader = batches(images, labels, args.batch_size, torch.Generator().manual_seed(args.seed))
    net = SeedCNN()
    model, optimizer = fabric.setup(net, torch.optim.AdamW(net.parameters(), lr=args.lr))
    params = list(model.parameters())

    detector = DivergenceDetector(rollback_after=3, max_rollbacks=2, snapshot_every=args.snapshot_every)
    snapshot = Snapshot.take(model, optimizer, step=0)
    meter, flops = Throughput(fabric.device, warmup_steps=args.warmup), BatchFlops()
    began = time.perf_counter()

    for step in range(args.steps):
        x, y = fabric.to_device(next(loader))
        if step == 0:
            flops.start(len(x))
        meter.start(samples=len(x), flops=flops.counted.get(len(x)))

        loss = F.cross_entropy(model(x), y)
        if step in args.nan_at:
            loss = loss * float("nan")
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        # DDP has averaged the gradients (the same norm on every rank); the loss is each rank's own.
        grad_norm = total_norm([p.grad for p in params if p.grad is not None]).item()
        mean_loss = fabric.all_reduce(loss.detach(), reduce_op="mean").item()
        verdict = detector.check(mean_loss, grad_norm, lambda: total_norm(params).item())
        if verdict.drops_update:
            drop_gradients(optimizer)
        optimizer.step()
        if verdict.snapshot_due:
            snapshot = Snapshot.take(model, optimizer, step=step + 1, reuse=snapshot)
        elif verdict.action is Action.ROLLBACK:
            back_off(snapshot, model, optimizer, [], detector)
        elif verdict.action is Action.STOP:
            snapshot.restore(model, optimizer)
            fabric.print(f"step {step}: stopped ({verdict.reason_text}); weights of step {snapshot.step} restored")
            break
        if verdict.action is not Action.OK:
            fabric.print(f"step {step}: {verdict.action.value} ({verdict.reason_text})")

        if step == 0:
            flops.stop()
        meter.stop()
        if on_step is not None:
            on_step(step, len(x), model, optimizer, verdict)
        if (step + 1) % args.log_every == 0:
            rate = throughput_metrics(meter.take_interval()).get("samples_per_sec", float("nan"))
            fabric.print(f"{step + 1} steps: loss {mean_loss:.3f}, {rate:,.0f} images/s on rank 0")

    def reduce(values: list[float], op: str) -> list[float]:
        return fabric.all_reduce(torch.tensor(values, device=fabric.device), reduce_op=op).tolist()

    meter.flush()
    peak = device_peak_flops(fabric.device, args.precision) if args.mfu else None
    memory = peak_memory_mb(fabric.device)
    metrics = throughput_metrics(meter.total, peak.flops if peak else None, memory, fabric.world_size, reduce)
    wall = time.perf_counter() - began
    note = peak.note if peak else "--no_mfu"
    fabric.print(format_summary(metrics, fabric.world_size, meter.total.batches, meter.total.seconds, wall, note))
    fabric.print(f"Guard: {detector.skipped_steps} steps skipped, {detector.rollbacks} rollbacks")
    return {"model": model, "detector": detector, "tally": meter.total, "metrics": metrics}


if __name__ == "__main__":
    main()
