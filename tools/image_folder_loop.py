"""The reference for training on a folder of image files: torchvision's ``ImageFolder`` + ``DataLoader``,
every file decoded, resized and augmented in the loader's workers every epoch, as most PyTorch
tutorials and torchvision's reference scripts do it.

Per sample (``transforms.v2``): decoded by ``ImageFolder``'s loader (Pillow, converted to RGB),
``ToImage``, ``Resize`` (shorter side to ``size``, antialiased) and ``CenterCrop(size)`` (the rule
lit_accel's image folders use), ``RandomHorizontalFlip``, ``ToDtype(float32, scale=True)``,
``Normalize``. The network comes from lit_accel (the only thing shared with it), trained with AdamW,
cross-entropy with label smoothing and, by default, channels-last, as the shipped recipe does.
``python -m tools.bench image_folder`` runs this script against ``lit-accel fit`` on the same
folder; used alone it prints each epoch's images/s::

    python -m tools.image_folder_loop /tmp/folder64/train --size 64 --epochs 3 --batch_size 256

An epoch's clock starts when its loader iterator is created (the workers' start-up counts) and
stops after its last optimizer step (the device synchronized); the first epoch's also counts
``ImageFolder``'s scan of the folder.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from tools.plain_loop import MEAN, STD


@dataclass
class Epoch:
    seconds: float
    images: int

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds


def transform(size: int) -> nn.Module:
    """The per-sample training transform: the usual ``transforms.v2`` pipeline on a decoded image."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, antialias=True),
            v2.CenterCrop(size),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


def train(
    root: str,
    size: int,
    epochs: int,
    batch_size: int = 256,
    net: str = "LiteCNN",
    workers: int = 2,
    precision: str = "32-true",
    channels_last: bool = True,
    lr: float = 0.004,
    weight_decay: float = 0.01,
    label_smoothing: float = 0.1,
    device: str = "cpu",
    seed: int = 0,
) -> list[Epoch]:
    """Train ``epochs`` epochs on the ``ImageFolder`` at ``root``; each epoch's seconds and images."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    import lit_accel.models as nets

    torch.manual_seed(seed)
    dev = torch.device(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = getattr(nets, net)().to(dev).to(memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    if precision == "16-mixed" and dev.type == "cpu":
        autocast_dtype = torch.bfloat16  # as Lightning does on a CPU
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "16-mixed" and dev.type == "cuda")

    results = []
    started = time.perf_counter()
    dataset = ImageFolder(root, transform=transform(size))
    loader = DataLoader(dataset, batch_size, shuffle=True, num_workers=workers, pin_memory=dev.type == "cuda")
    for _ in range(epochs):
        if results:
            started = time.perf_counter()
        images = 0
        for x, y in loader:
            x = x.to(dev, non_blocking=True).contiguous(memory_format=memory_format)
            y = y.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            images += len(y)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        results.append(Epoch(time.perf_counter() - started, images))
    return results


def main(argv: list[str] | None = None) -> list[Epoch]:
    parser = argparse.ArgumentParser(
        prog="python -m tools.image_folder_loop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("root", help="an ImageFolder: one sub-folder of images per class (e.g. DIR/train)")
    parser.add_argument("--size", type=int, default=64, help="pixels per side after resize and crop")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--net", default="LiteCNN", help="a network of lit_accel.models")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed", "16-mixed"))
    parser.add_argument("--channels_last", default="true", choices=("true", "false"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the epochs to this file")
    args = parser.parse_args(argv)
    for name in ("size", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: use 1 or more")
    if args.workers < 0:
        parser.error(f"--workers {args.workers}: use 0 or more")
    if not Path(args.root).is_dir():
        parser.error(f"{args.root}: not a folder (give the one holding the class folders)")
    epochs = train(
        args.root,
        args.size,
        args.epochs,
        args.batch_size,
        args.net,
        args.workers,
        args.precision,
        args.channels_last == "true",
        device=args.device,
    )
    for number, epoch in enumerate(epochs, 1):
        print(f"epoch {number}: {epoch.images} images in {epoch.seconds:.2f} s, {epoch.images_per_sec:,.0f} images/s")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(e) for e in epochs]))
    return epochs


if __name__ == "__main__":
    main()
