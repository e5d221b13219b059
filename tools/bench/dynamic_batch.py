"""Evidence for DynamicBatchLR: on a plateau, decay the learning rate or grow the batch?

Two cases on the same seeded, learnable synthetic CIFAR-shaped data (``lit_accel.data``'s
generator through ``CIFAR10DataModule(synthetic=True)``, preload pipeline) and the same network:

* ``lr_decay``: fixed batch; on a ``val/loss`` plateau the learning rate is multiplied by
  ``1 / factor`` (``DynamicBatchLR(policy="lr")``);
* ``batch_growth``: fixed learning rate; on a plateau the batch is multiplied by ``factor``
  instead (``DynamicBatchLR(policy="batch", lr_scaling="none")``, Smith et al. 2017).

Both see the same epochs (same number of training images), so the comparison is wall time and
final validation accuracy for the same data budget. Runs alternate between the cases (ABBA order
within each repeat) and the table reports medians, because the machine may be shared.

    python -m tools.bench dynamic_batch --quick           # ~1-2 minutes on 2 CPU cores
    python -m tools.bench dynamic_batch                   # the fuller run (~10-15 minutes)
    python -m tools.bench dynamic_batch --json out.json   # also write every run

Results and what they mean: BENCHMARKS.md, "Dynamic batch size vs LR decay".
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from functools import partial

import torch
from lightning.pytorch import Trainer, seed_everything

from lit_accel.callbacks.dynamic_batch_lr import DynamicBatchLR
from lit_accel.data import CIFAR10DataModule
from lit_accel.measure import markdown_table, median, rounds, spread
from lit_accel.models import BatchNormCNN, ImageClassifier, SeedCNN

CASES = ("lr_decay", "batch_growth")


@dataclass
class Run:
    case: str
    repeat: int
    seconds: float
    val_acc: float
    val_loss: float
    optimizer_steps: int
    changes: int
    final_batch_size: int
    final_lr: float


class _CountChanges(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "plateaued" in record.getMessage() and "nothing left" not in record.getMessage():
            self.count += 1


def _callback(case: str, args: argparse.Namespace) -> DynamicBatchLR:
    common = {"monitor": "val/loss", "patience": args.patience, "min_delta": args.min_delta, "cooldown": args.cooldown}
    if case == "lr_decay":
        return DynamicBatchLR(policy="lr", lr_factor=1.0 / args.factor, **common)
    return DynamicBatchLR(
        policy="batch",
        batch_factor=args.factor,
        max_batch_size=args.batch_size * args.max_growth,
        lr_scaling="none",
        **common,
    )


def run_once(case: str, repeat: int, args: argparse.Namespace) -> Run:
    seed_everything(args.seed + repeat, workers=True, verbose=False)
    net = SeedCNN() if args.net == "seedcnn" else BatchNormCNN(width=args.width)
    model = ImageClassifier(
        net=net,
        optimizer=partial(torch.optim.SGD, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4),
    )
    data = CIFAR10DataModule(
        synthetic=True,
        synthetic_size=args.train_size + args.val_size,
        synthetic_test_size=16,
        val_size=args.val_size,
        batch_size=args.batch_size,
        eval_batch_size=512,
        pipeline="preload",
        augment=args.augment,
        seed=args.seed,
    )
    callback = _callback(case, args)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
    )
    counter = _CountChanges()
    cb_logger = logging.getLogger("lit_accel.callbacks.dynamic_batch_lr")
    cb_logger.addHandler(counter)
    cb_logger.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=data)
    finally:
        cb_logger.removeHandler(counter)
    seconds = time.perf_counter() - start
    metrics = trainer.callback_metrics
    return Run(
        case=case,
        repeat=repeat,
        seconds=seconds,
        val_acc=float(metrics["val/acc"]),
        val_loss=float(metrics["val/loss"]),
        optimizer_steps=trainer.global_step,
        changes=counter.count,
        final_batch_size=int(data.batch_size),
        final_lr=float(trainer.optimizers[0].param_groups[0]["lr"]),
    )


def _table(runs: list[Run]) -> str:
    columns = ["case", "runs:", "wall s (median):", "val acc (median):", "val acc (min–max):", "val loss (median):"]
    columns += ["optimizer steps:", "plateau actions:", "final batch:", "final lr:"]
    cells = []
    for case in CASES:
        rs = [r for r in runs if r.case == case]
        if not rs:
            continue
        acc = spread(r.val_acc for r in rs)
        cells.append(
            [
                case,
                str(len(rs)),
                f"{median(r.seconds for r in rs):.1f}",
                f"{acc.median:.4f}",
                f"{acc.low:.4f}–{acc.high:.4f}",
                f"{median(r.val_loss for r in rs):.4f}",
                f"{median(r.optimizer_steps for r in rs):.0f}",
                f"{median(r.changes for r in rs):.0f}",
                f"{median(r.final_batch_size for r in rs):.0f}",
                f"{median(r.final_lr for r in rs):.4g}",
            ]
        )
    return markdown_table(columns, cells)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench dynamic_batch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small budget: a few minutes on 2 CPU cores")
    parser.add_argument("--repeats", type=int, default=None, help="runs per case (quick: 2, full: 3)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (quick: 6, full: 12)")
    parser.add_argument("--train_size", type=int, default=None, help="training images (quick: 4000, full: 10000)")
    parser.add_argument("--val_size", type=int, default=None, help="validation images (quick: 1000, full: 2000)")
    parser.add_argument("--net", choices=("seedcnn", "bncnn"), default="seedcnn")
    parser.add_argument("--width", type=int, default=16, help="BatchNormCNN width")
    parser.add_argument("--batch_size", type=int, default=64, help="starting per-device batch")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--factor", type=float, default=2.0, help="batch growth factor = 1 / LR decay factor")
    parser.add_argument("--max_growth", type=int, default=16, help="max batch = batch-size × this")
    parser.add_argument("--patience", type=int, default=1)
    parser.add_argument("--min_delta", type=float, default=0.0)
    parser.add_argument("--cooldown", type=int, default=0)
    parser.add_argument("--augment", action="store_true", help="random crop + flip on the device")
    # On a shared 2-core machine two intra-op threads spin against other processes and run up to
    # 6x slower than one (measured here); use --threads 2 on an idle machine.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write every run to this file")
    args = parser.parse_args(argv)
    quick = {"repeats": 2, "epochs": 6, "train_size": 4000, "val_size": 1000}
    full = {"repeats": 3, "epochs": 12, "train_size": 10000, "val_size": 2000}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    print(f"settings: {vars(args)}; torch threads {torch.get_num_threads()}", flush=True)
    runs: list[Run] = []
    for repeat, order in rounds(CASES, args.repeats):  # alternating: drift hits both cases alike
        for case in order:
            run = run_once(case, repeat, args)
            runs.append(run)
            print(
                f"repeat {repeat} {case:>12}: {run.seconds:6.1f} s  val acc {run.val_acc:.4f}  val loss"
                f" {run.val_loss:.4f}  steps {run.optimizer_steps}  actions {run.changes}  batch"
                f" {run.final_batch_size}  lr {run.final_lr:.4g}",
                flush=True,
            )
    print()
    print(_table(runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "runs": [asdict(r) for r in runs]}, f, indent=1)


if __name__ == "__main__":
    main()
