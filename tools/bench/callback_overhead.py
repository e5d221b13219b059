"""Training-throughput cost of a callback: training with it on vs off, same process, alternating.

Model and data: ``lit_accel.models.SeedCNN`` on random CIFAR-shaped tensors in a plain
``TensorDataset`` DataLoader (nothing from lit_accel's data module), SGD, per-step loss logging to
TensorBoard as in a normal run.

Two modes, both reporting the median over repetitions of the paired ratio (with ÷ without
throughput; 1.00 = free, 0.99 = 1% slower):

- ``blocks`` (default): ONE fit. After ``--skip`` batches (callback on, so one-off costs such as the
  meter's FLOP-counting batch fall there), the callback's per-batch hooks are switched on and off
  in adjacent blocks of ``--block`` batches, alternating which comes first in each pair. Adjacent
  blocks are a fraction of a second apart, so a busy machine's drifting load mostly cancels.
  Epoch-level hooks always run (they belong to both arms).
- ``fits``: separate fits with and without the callback, alternating which goes first; includes the
  one-off costs (set-up, FLOP counting) in the whole-fit wall time, but is much noisier.

It also reports the share of the timed window spent inside the callback's own hooks: a low-noise
lower bound on its cost (it misses indirect costs such as a device sync stalling a GPU pipeline).
The device is synchronized only at block boundaries, the same in both arms. Run-to-run noise on a
shared 2-core CPU is several percent per run (DESIGN.md); note the load average printed at the end.

Usage::

    python -m tools.bench callback_overhead --callback meter
    python -m tools.bench callback_overhead --callback meter --pairs 40 --block 10 --threads 1
    python -m tools.bench callback_overhead --callback meter --mode fits --reps 7
    python -m tools.bench callback_overhead --callback my_pkg.callbacks:MyCallback --init_args '{"k": 1}'
    python -m tools.bench callback_overhead --list

Callbacks come from ``REGISTRY`` (name -> class path and default arguments) or any ``module:Class``
/ ``module.Class`` path. Nothing is imported until chosen, so a registered entry whose module does
not exist yet fails (with a message) only when it is chosen.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_accel.measure import median, rounds
from lit_accel.models import SeedCNN

# name -> (class path, default init args from the parsed command line). Add other callbacks here as
# they land: nothing is imported until one is chosen, so a missing module fails only when chosen.
REGISTRY: dict[str, tuple[str, Callable[[argparse.Namespace], dict[str, Any]]]] = {
    "meter": (
        "lit_accel.callbacks.throughput_meter:ThroughputMeter",
        lambda args: {"log_every_n_steps": args.log_every, "print_summary": False},
    ),
    "guard": ("lit_accel.callbacks.divergence_guard:DivergenceGuard", lambda args: {}),
}

# Hooks Lightning calls once per training batch; in ``blocks`` mode only these are switched off.
_BATCH_HOOKS = frozenset(
    {
        "on_train_batch_start",
        "on_train_batch_end",
        "on_before_backward",
        "on_after_backward",
        "on_before_optimizer_step",
        "on_before_zero_grad",
    }
)


def _import(path: str) -> Any:
    """``pkg.mod:Name`` or ``pkg.mod.Name`` -> the object."""
    module, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def make_callback(name: str, args: argparse.Namespace) -> Callback:
    """A fresh callback from a registry name or a ``module:Class`` path; ``--init_args`` override."""
    target, defaults = REGISTRY.get(name, (name, lambda _: {}))
    return _import(target)(**{**defaults(args), **args.init_args})


def _importable(name: str) -> str | None:
    """None if the callback's class can be imported, else why not."""
    target = REGISTRY[name][0] if name in REGISTRY else name
    try:
        _import(target)
    except (ImportError, AttributeError, ValueError) as err:
        return f"{target}: {err}"
    return None


class _Classifier(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.net = SeedCNN()
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)  # the usual per-step logging, in both arms
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class _Schedule(Callback):
    """Stopwatch and switch. Put first in ``callbacks`` so its timestamps come before the callback's
    hooks. Batch ``i`` (0-based, fit-wide) is timed from its ``on_train_batch_start`` to the next
    batch's (end of fit for the last), so a block's time holds all of its batches' work and hooks.

    ``block=None``: one timed window from batch ``skip`` to the end, callback always on.
    """

    def __init__(self, skip: int, block: int | None) -> None:
        self.skip = skip
        self.block = block
        self.enabled = True
        self.seen = 0
        self.marks: list[tuple[float, int, bool]] = []  # (time, samples so far, on) at block starts
        self.samples = 0
        self.t0: float | None = None
        self.t1: float | None = None

    def _now(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        i = self.seen - self.skip
        if i >= 0 and (self.block is None and i == 0 or self.block is not None and i % self.block == 0):
            now = self._now(pl_module)
            if self.t0 is None:
                self.t0 = now
            if self.block is not None:
                b = i // self.block
                on_first = (b // 2) % 2 == 0
                self.enabled = (b % 2 == 0) == on_first
                self.marks.append((now, self.samples, self.enabled))
        if i >= 0:
            self.samples += len(batch[0])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.seen += 1
        if self.seen >= trainer.max_steps:
            self.t1 = self._now(pl_module)
            self.marks.append((self.t1, self.samples, self.enabled))

    @property
    def window_open(self) -> bool:
        return self.t0 is not None and self.t1 is None

    def pair_ratios(self) -> list[float]:
        """Per pair of adjacent blocks: samples/s with the callback ÷ without."""
        rates = [((s1 - s0) / (t1 - t0), on) for (t0, s0, on), (t1, s1, _) in zip(self.marks, self.marks[1:])]
        ratios = []
        for k in range(0, len(rates) - 1, 2):
            (r_a, on_a), (r_b, _) = rates[k], rates[k + 1]
            ratios.append(r_a / r_b if on_a else r_b / r_a)
        return ratios


class _Switched(Callback):
    """Forwards every hook to ``inner``; the per-batch training hooks only while ``schedule.enabled``.
    Also sums the time spent in ``inner``'s hooks while the schedule's window is open."""

    def __init__(self, inner: Callback, schedule: _Schedule) -> None:
        self.inner = inner
        self.schedule = schedule
        self.hook_seconds = 0.0
        names = [n for n in dir(Callback) if n.startswith("on_") or n in ("setup", "teardown")]
        for name in names + ["state_dict", "load_state_dict"]:
            setattr(self, name, self._forward(name))

    @property
    def state_key(self) -> str:
        return self.inner.state_key

    def _forward(self, name: str) -> Callable[..., Any]:
        target = getattr(self.inner, name)
        per_batch = name in _BATCH_HOOKS

        def hook(*args: Any, **kwargs: Any) -> Any:
            if per_batch and not self.schedule.enabled:
                return None
            if not self.schedule.window_open:
                return target(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return target(*args, **kwargs)
            finally:
                self.hook_seconds += time.perf_counter() - t0

        return hook


def _fit(args: argparse.Namespace, data: TensorDataset, steps: int, block: int | None, with_callback: bool, root: str):
    torch.manual_seed(args.seed)
    schedule = _Schedule(args.skip, block)
    callbacks: list[Callback] = [schedule]
    switched = None
    if with_callback:
        switched = _Switched(make_callback(args.callback, args), schedule)
        callbacks.append(switched)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_steps=args.skip + steps,
        max_epochs=-1,
        logger=TensorBoardLogger(root, name="bench"),
        log_every_n_steps=args.log_every,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
    )
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
    start = time.perf_counter()
    trainer.fit(_Classifier(args.lr), loader)
    return schedule, switched, time.perf_counter() - start


def _run_blocks(args: argparse.Namespace, data: TensorDataset, root: str) -> dict[str, Any]:
    schedule, switched, _ = _fit(args, data, 2 * args.pairs * args.block, args.block, True, root)
    ratios = schedule.pair_ratios()
    on_seconds = sum(t1 - t0 for (t0, _, on), (t1, _, _) in zip(schedule.marks, schedule.marks[1:]) if on)
    for k, r in enumerate(ratios):
        print(f"pair {k:3d}: ratio {r:.4f}", flush=True)
    return {
        "median_ratio": median(ratios),
        "ratios": ratios,
        "hook_share": switched.hook_seconds / on_seconds,
    }


def _run_fits(args: argparse.Namespace, data: TensorDataset, root: str) -> dict[str, Any]:
    rows = []
    for rep, order in rounds([False, True], args.reps):
        result = {}
        for with_callback in order:
            schedule, switched, wall = _fit(args, data, args.steps, None, with_callback, root)
            window = schedule.t1 - schedule.t0
            result[with_callback] = (
                schedule.samples / window,
                wall,
                switched.hook_seconds / window if switched else float("nan"),
            )
        (on, wall_on, share), (off, wall_off, _) = result[True], result[False]
        rows.append({"on": on, "off": off, "ratio": on / off, "wall_ratio": wall_off / wall_on, "hook_share": share})
        print(
            f"rep {rep}: off {off:8.1f} samples/s  on {on:8.1f} samples/s  ratio {on / off:.4f}  "
            f"whole-fit {wall_off / wall_on:.4f}  (first: {'on' if order[0] else 'off'})",
            flush=True,
        )
    return {
        "median_ratio": median(r["ratio"] for r in rows),
        "median_wall_ratio": median(r["wall_ratio"] for r in rows),
        "hook_share": median(r["hook_share"] for r in rows),
        "reps": rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench callback_overhead", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--callback", default="meter", help=f"one of {sorted(REGISTRY)} or module:Class")
    parser.add_argument("--init_args", type=json.loads, default={}, help="JSON kwargs for the callback")
    parser.add_argument("--mode", choices=("blocks", "fits"), default="blocks")
    parser.add_argument("--pairs", type=int, default=30, help="blocks mode: pairs of (on, off) blocks")
    parser.add_argument("--block", type=int, default=10, help="blocks mode: batches per block")
    parser.add_argument("--reps", type=int, default=7, help="fits mode: pairs of fits (with, without)")
    parser.add_argument("--steps", type=int, default=60, help="fits mode: timed batches per fit")
    parser.add_argument("--skip", type=int, default=10, help="untimed batches at the start (callback on)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=4096, help="size of the random in-memory dataset")
    parser.add_argument("--log_every", type=int, default=10, help="trainer's and meter's log_every_n_steps")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--list", action="store_true", help="list the registered callbacks and exit")
    args = parser.parse_args(argv)

    if args.list:
        for name, (target, _) in REGISTRY.items():
            print(f"{name:8s} {target}  {'available' if _importable(name) is None else 'not available yet'}")
        return {}
    problem = _importable(args.callback)
    if problem is not None:
        parser.error(f"--callback {args.callback!r} cannot be used ({problem}); registered: {sorted(REGISTRY)}")
    if min(args.pairs, args.block, args.reps, args.steps, args.batch_size, args.log_every) < 1 or args.skip < 0:
        parser.error("--pairs, --block, --reps, --steps, --batch_size, --log_every must be >= 1; --skip >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit banners between runs
    warnings.filterwarnings("ignore")
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.samples, 3, 32, 32, generator=g)
    data = TensorDataset(images, torch.randint(0, 10, (args.samples,), generator=g))

    with tempfile.TemporaryDirectory() as root:
        warm = argparse.Namespace(**{**vars(args), "skip": 1})
        _fit(warm, data, 5, None, True, root)  # imports, allocator, thread pools
        result = (_run_blocks if args.mode == "blocks" else _run_fits)(args, data, root)

    ratio = result["median_ratio"]
    summary = {
        "callback": args.callback,
        **result,
        "config": {k: v for k, v in vars(args).items() if k not in ("list", "json")},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpus": os.cpu_count(),
    }
    extra = f"; whole-fit wall ratio {result['median_wall_ratio']:.4f}" if "median_wall_ratio" in result else ""
    print(
        f"\n{args.callback} ({args.mode}): median throughput ratio with/without = {ratio:.4f} "
        f"({(ratio - 1) * 100:+.2f}%); inside the callback's hooks: {result['hook_share']:.3%} of the "
        f"time{extra}\nbatch {args.batch_size}, precision {args.precision}, torch {torch.__version__}, "
        f"{summary['threads']} threads, load average (1 min) {summary['loadavg_1m']:.2f} on {summary['cpus']} CPUs"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
