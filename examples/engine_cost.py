"""What lit_accel's guard and meter engines cost in a plain PyTorch loop, against the bare loop.

Four variants of the step of ``plain_pytorch_loop.py`` (SeedCNN, AdamW, host-side flips): bare,
guard (loss and gradient norm read every step, a snapshot every ``--snapshot_every`` good steps),
meter (timed steps, an interval read every ``--log_every``), guard + meter. Each has its own model
and data. They run in rounds whose order alternates (``lit_accel.measure``: as listed, then
reversed), each variant ``--steps`` steps per round timed by ``time.perf_counter`` around them (the
device synchronized first); a variant's figure is the median over rounds of its images/s divided
by the same round's bare loop. Target: guard + meter at >= 0.98 of the bare loop.

    python examples/engine_cost.py                 # the figures (on a quiet machine; minutes)
    python examples/engine_cost.py --rounds 1 --steps 2 --warmup 1 --batch_size 8   # a smoke run
"""

from __future__ import annotations

import argparse
import time
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
    drop_gradients,
    throughput_metrics,
    total_norm,
)
from lit_accel.measure import alternate, cell, markdown_table, paired_ratios, spread

VARIANTS = {"bare": (False, False), "guard": (True, False), "meter": (False, True), "guard + meter": (True, True)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="the guard's and the meter's cost in a plain PyTorch loop")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=50, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant before the first round")
    p.add_argument("--snapshot_every", type=int, default=100, help="the guard's (DivergenceDetector's default)")
    p.add_argument("--log_every", type=int, default=50, help="steps between the meter's interval reads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("batch_size", "steps", "rounds", "snapshot_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: use 1 or more")
    if args.warmup < 0:
        p.error(f"--warmup {args.warmup}: use 0 or more")
    return args


class Loop:
    """One variant: its model, optimizer, data and engines; :meth:`run` trains and returns images/s."""

    def __init__(self, args: argparse.Namespace, guard: bool, meter: bool) -> None:
        torch.manual_seed(args.seed)
        self.args, self.device = args, torch.device(args.device)
        self.images, self.labels = make_synthetic_cifar(8 * args.batch_size, seed=args.seed)
        self.gen = torch.Generator().manual_seed(args.seed)
        self.model = SeedCNN().to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.params = list(self.model.parameters())
        self.detector = DivergenceDetector(snapshot_every=args.snapshot_every) if guard else None
        self.snapshot = Snapshot.take(self.model, self.optimizer) if guard else None
        self.meter = Throughput(self.device) if meter else None
        self.flops = BatchFlops()
        self.steps = 0

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.images), (self.args.batch_size,), generator=self.gen)
        x = self.images[idx].float().div_(255)
        flip = torch.rand(len(idx), generator=self.gen) < 0.5
        x[flip] = x[flip].flip(-1)
        return ((x - 0.5) / 0.25).to(self.device, non_blocking=True), self.labels[idx].to(self.device)

    def step(self) -> None:
        x, y = self.batch()
        counting = self.meter is not None and not self.flops.counted  # once, in the warm-up
        if counting:
            self.flops.start(len(x))
        if self.meter is not None:
            self.meter.start(samples=len(x), flops=self.flops.counted.get(len(x)))
        loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        verdict = None
        if self.detector is not None:
            grad_norm = total_norm([p.grad for p in self.params if p.grad is not None]).item()
            verdict = self.detector.check(loss.item(), grad_norm, lambda: total_norm(self.params).item())
            if verdict.drops_update:
                drop_gradients(self.optimizer)
        self.optimizer.step()
        if verdict is not None and self.detector is not None and self.snapshot is not None:
            if verdict.snapshot_due:
                self.snapshot = Snapshot.take(self.model, self.optimizer, step=self.steps, reuse=self.snapshot)
            elif verdict.action is Action.ROLLBACK:  # none without injected faults
                back_off(self.snapshot, self.model, self.optimizer, [], self.detector)
        if counting:
            self.flops.stop()
        self.steps += 1
        if self.meter is not None:
            self.meter.stop()
            if self.steps % self.args.log_every == 0:
                throughput_metrics(self.meter.take_interval())

    def run(self, steps: int) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        began = time.perf_counter()
        for _ in range(steps):
            self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return steps * self.args.batch_size / (time.perf_counter() - began)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Prints the table; returns the loops and each variant's images/s per round."""
    args = parse_args(argv)
    loops = {name: Loop(args, guard, meter) for name, (guard, meter) in VARIANTS.items()}
    for loop in loops.values():
        loop.run(args.warmup)
    rates = alternate({name: lambda loop=loop: loop.run(args.steps) for name, loop in loops.items()}, args.rounds)
    rows = []
    for name in VARIANTS:
        ratio = spread(paired_ratios(rates[name], rates["bare"]))
        rows.append(
            [
                name,
                cell(spread(rates[name]).median),
                cell(ratio.median, "{:.3f}"),
                f"{ratio.low:.3f}-{ratio.high:.3f}",
                cell(1 - ratio.median, "{:+.1%}"),
            ]
        )
    columns = ["variant", "images/s (median):", "ratio to bare (median):", "range:", "cost:"]
    print(f"{args.rounds} rounds x {args.steps} steps, batch {args.batch_size}, {args.device}; target: cost <= 2 %")
    print(markdown_table(columns, rows))
    return {"loops": loops, "rates": rates}


if __name__ == "__main__":
    main()
