"""The reference: the same training as ``lit-accel fit``, written as a plain PyTorch loop.

It shares nothing with lit_accel's training code except the network definition (and the synthetic
data generator, which is data, not training): its own batching, per-sample augmentation (random
crop with 4-pixel zero padding, horizontal flip), normalization, loss, optimizer and precision
handling. ``python -m tools.bench overhead`` times it against ``lit-accel fit`` with the same
settings (and measures its memory from outside); used alone it prints its own throughput::

    python tools/plain_loop.py --net SeedCNN --batch_size 128 --steps 100 --precision 32-true
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import lit_accel.models as nets
from lit_accel.data import make_synthetic_cifar

# CIFAR-10 channel statistics (the values torchvision's examples use), repeated here on purpose:
# this file must not import lit_accel's data pipeline.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


@dataclass
class LoopResult:
    images_per_sec: float  # training images per second over the timed steps
    timed_steps: int
    final_loss: float


def _augment(images: Tensor, padding: int = 4) -> Tensor:
    """Per-sample random crop (zero padding ``padding``; 0: no crop) and horizontal flip."""
    n, c, h, w = images.shape
    if padding == 0:
        flip = torch.rand(n, 1, 1, 1, device=images.device) < 0.5
        return torch.where(flip, images.flip(3), images)
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1, 1), device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1, 1), device=images.device)
    rows = dy + torch.arange(h, device=images.device).view(1, 1, h, 1)
    cols = dx + torch.arange(w, device=images.device).view(1, 1, 1, w)
    cropped = padded.gather(2, rows.expand(n, c, h, w + 2 * padding)).gather(3, cols.expand(n, c, h, w))
    flip = torch.rand(n, 1, 1, 1, device=images.device) < 0.5
    return torch.where(flip, cropped.flip(3), cropped)


def train(
    net: nn.Module,
    images: Tensor,
    labels: Tensor,
    batch_size: int = 128,
    warmup_steps: int = 5,
    timed_steps: int = 50,
    lr: float = 0.02,
    label_smoothing: float = 0.1,
    precision: str = "32-true",
    device: str = "cpu",
    seed: int = 0,
    channels_last: bool = False,
    data_on_device: bool = False,
    compile: bool = False,
    compile_options: dict[str, Any] | None = None,
    optimizer_name: str = "sgd",
    weight_decay: float | None = None,
    random_crop: bool = True,
) -> LoopResult:
    """Train ``warmup_steps + timed_steps`` steps; time the last ``timed_steps``.

    The device is synchronized before each clock reading, as the Lightning side's timer does.
    ``channels_last`` keeps the network and inputs in NHWC, ``data_on_device`` copies the images
    to the device once (batches are then cut there), ``compile`` wraps the network in
    ``torch.compile(**compile_options)``: the hand-written counterparts of the GPU recipe's settings.
    ``optimizer_name`` ``"sgd"`` (momentum 0.9, Nesterov, weight decay 5e-4) or ``"adamw"`` (weight
    decay 0.01, as the shipped recipe); ``random_crop`` off leaves the flips only (the recipe's).
    """
    if optimizer_name not in ("sgd", "adamw"):
        raise ValueError(f"optimizer_name={optimizer_name!r} is not allowed: use 'sgd' or 'adamw'")
    torch.manual_seed(seed)
    dev = torch.device(device)
    net = net.to(dev).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    model = torch.compile(net, **(compile_options or {})) if compile else net
    if data_on_device:
        images, labels = images.to(dev), labels.to(dev)
    optimizer: torch.optim.Optimizer
    if optimizer_name == "adamw":
        decay = 0.01 if weight_decay is None else weight_decay
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=decay)
    else:
        decay = 5e-4 if weight_decay is None else weight_decay
        optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=decay)
    padding = 4 if random_crop else 0
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=dev).view(1, 3, 1, 1)
    autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    if precision == "16-mixed" and dev.type == "cpu":
        autocast_dtype = torch.bfloat16  # as Lightning does on a CPU
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "16-mixed" and dev.type == "cuda")

    order = torch.randperm(images.shape[0]).to(images.device)
    position = 0
    started = 0.0
    loss = torch.zeros(())
    for step in range(warmup_steps + timed_steps):
        if step == warmup_steps:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            started = time.perf_counter()
        if position + batch_size > images.shape[0]:
            order, position = torch.randperm(images.shape[0]).to(images.device), 0
        index = order[position : position + batch_size]
        position += batch_size
        x = images[index].to(dev, non_blocking=True)
        y = labels[index].to(dev, non_blocking=True)
        x = ((_augment(x, padding).float().div_(255) - mean) / std).contiguous(memory_format=memory_format)
        with torch.autocast(dev.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elapsed = time.perf_counter() - started
    return LoopResult(
        images_per_sec=timed_steps * batch_size / elapsed,
        timed_steps=timed_steps,
        final_loss=float(loss.detach()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="SeedCNN", choices=("SeedCNN", "BatchNormCNN", "ResNet9"))
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100, help="timed steps (after 5 warm-up steps)")
    parser.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed", "16-mixed"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    images, labels = make_synthetic_cifar(max(args.batch_size * (args.steps + 5), 1024), seed=0)
    result = train(
        getattr(nets, args.net)(),
        images,
        labels,
        args.batch_size,
        5,
        args.steps,
        precision=args.precision,
        device=args.device,
    )
    print(
        f"{args.net} {args.precision} batch {args.batch_size} on {args.device}: {result.images_per_sec:,.0f} images/s"
    )


if __name__ == "__main__":
    main()
