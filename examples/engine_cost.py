"""What lit_accel's guard and meter engines cost in a plain PyTorch loop, against the bare loop.

Four variants of the step of ``plain_pytorch_loop.py`` (SeedCNN, AdamW, host-side flips): bare,
guard (loss and gradient norm read every step, a snapshot every ``--snapshot_every`` good steps),
meter (timed steps, an interval read every ``--log_every``), guard + meter. They share one model,
optimizer and data stream and run in rounds whose order alternates (``lit_accel.measure``: as
listed, then reversed), each variant ``--steps`` steps per round timed by ``time.perf_counter``
around them (the device synchronized first). Two figures per variant: the median over rounds of
its images/s divided by the same round's bare loop (noisy: a few percent between rounds on a
shared CPU), and the share of its time spent inside the engines' calls (their direct cost, without
that noise; on a GPU a sync inside them would also stall the queue, which the ratio shows).
Target: guard + meter at <= 2 % of the bare loop's time.

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
    """One model, optimizer and data stream; :meth:`run` trains with the chosen engines on or off.

    The variants share the loop, so they differ only in the engines' calls (separate models per
    variant added several percent of noise between them). The time spent inside the engines' calls
    is summed per variant: on a CPU, where nothing runs asynchronously, that is their direct cost
    measured without the round-to-round noise of two clocked runs.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        torch.manual_seed(args.seed)
        self.args, self.device = args, torch.device(args.device)
        self.images, self.labels = make_synthetic_cifar(8 * args.batch_size, seed=args.seed)
        self.gen = torch.Generator().manual_seed(args.seed)
        self.model = SeedCNN().to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.params = list(self.model.parameters())
        self.detector = DivergenceDetector(snapshot_every=args.snapshot_every)
        self.snapshot = Snapshot.take(self.model, self.optimizer)
        self.meter = Throughput(self.device)
        self.flops = BatchFlops()
        self.steps = 0
        self.engine_seconds = 0.0  # inside the engines' calls, since the last run() began

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.images), (self.args.batch_size,), generator=self.gen)
        x = self.images[idx].float().div_(255)
        flip = torch.rand(len(idx), generator=self.gen) < 0.5
        x[flip] = x[flip].flip(-1)
        return ((x - 0.5) / 0.25).to(self.device, non_blocking=True), self.labels[idx].to(self.device)

    def step(self, guard: bool, meter: bool) -> None:
        clock = time.perf_counter
        x, y = self.batch()
        began = clock()
        counting = meter and not self.flops.counted  # once, in the warm-up
        if counting:
            self.flops.start(len(x))
        if meter:
            self.meter.start(samples=len(x), flops=self.flops.counted.get(len(x)))
        inside = clock() - began
        loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        verdict = None
        if guard:
            began = clock()
            grad_norm = total_norm([p.grad for p in self.params if p.grad is not None]).item()
            verdict = self.detector.check(loss.item(), grad_norm, lambda: total_norm(self.params).item())
            if verdict.drops_update:
                drop_gradients(self.optimizer)
            inside += clock() - began
        self.optimizer.step()
        began = clock()
        if verdict is not None:
            if verdict.snapshot_due:
                self.snapshot = Snapshot.take(self.model, self.optimizer, step=self.steps, reuse=self.snapshot)
            elif verdict.action is Action.ROLLBACK:  # none without injected faults
                back_off(self.snapshot, self.model, self.optimizer, [], self.detector)
        if counting:
            self.flops.stop()
        self.steps += 1
        if meter:
            self.meter.stop()
            if self.steps % self.args.log_every == 0:
                throughput_metrics(self.meter.take_interval())
        if guard or meter:
            self.engine_seconds += inside + clock() - began

    def run(self, steps: int, guard: bool, meter: bool) -> tuple[float, float]:
        """Trains ``steps`` steps; returns images/s and the share of the time spent in the engines' calls."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.engine_seconds = 0.0
        began = time.perf_counter()
        for _ in range(steps):
            self.step(guard, meter)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - began
        return steps * self.args.batch_size / elapsed, self.engine_seconds / elapsed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Prints the table; returns the loop and each variant's (images/s, engine share) per round."""
    args = parse_args(argv)
    loop = Loop(args)
    for guard, meter in VARIANTS.values():
        loop.run(args.warmup, guard, meter)
    runs = alternate(
        {name: lambda flags=flags: loop.run(args.steps, *flags) for name, flags in VARIANTS.items()}, args.rounds
    )
    rates = {name: [rate for rate, _ in results] for name, results in runs.items()}
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
                cell(spread([share for _, share in runs[name]]).median, "{:.2%}"),
            ]
        )
    columns = ["variant", "images/s (median):", "ratio to bare (median):", "range:", "cost:", "in engine calls:"]
    print(f"{args.rounds} rounds x {args.steps} steps, batch {args.batch_size}, {args.device}; target: cost <= 2 %")
    print(markdown_table(columns, rows))
    return {"loop": loop, "rates": rates, "shares": {name: [s for _, s in r] for name, r in runs.items()}}


if __name__ == "__main__":
    main()
