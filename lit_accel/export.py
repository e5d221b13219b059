"""``lit-accel-export``: a checkpoint → self-contained model files for serving, without lit_accel.

Two artifacts, each holding the network, its weights and CIFAR-10's normalization:

* ``model.pt2`` — ``torch.export`` (load with ``torch.export.load(path).module()``). Takes the
  dtype chosen at export (``--input_dtype``, default uint8).
* ``model.torchscript.pt`` — TorchScript (``torch.jit.load(path)``, also from C++/LibTorch). Takes
  uint8 or float input. TorchScript is deprecated in recent PyTorch; it is kept for serving stacks
  that still need it.

Input contract: images ``(N, 3, S, S)``, RGB, any batch size N ≥ 1, where S is the image size the
checkpoint was trained at (``checkpoint["image_size"]``; 32 for CIFAR-10 and for checkpoints that
record none), brought to S×S the way ``lit-accel predict`` does (shorter side to S, center crop);
either uint8 in 0…255 or float32 in [0, 1]. Output: class probabilities ``(N, num_classes)``
(softmax; rows sum to 1), float32. ``metadata.json`` states S (``input.shape``).
Each file carries ``metadata.json`` (class names, input contract, normalization, source
checkpoint), also written next to them: ``torch.export.load(path, extra_files={"metadata.json":
""})`` or ``torch.jit.load(path, _extra_files={"metadata.json": ""})`` fills it in.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from typing_extensions import override

from lit_accel.checkpoints import (
    CHECKPOINT_ALIASES,
    check_import_paths,
    find_checkpoint,
    read_checkpoint,
    verify_distributed_checkpoint,
)
from lit_accel.data.augment import CIFAR10_MEAN, CIFAR10_STD
from lit_accel.data.cifar10 import CIFAR10_CLASSES
from lit_accel.errors import CheckpointError, LitAccelUserError

if TYPE_CHECKING:  # for annotations only: load_classifier imports it when called
    from lit_accel.models import ImageClassifier

__all__ = [
    "CheckpointError",
    "ServingModel",
    "check_export_folder",
    "export_checkpoint",
    "export_model",
    "load_classifier",
    "main",
]

IMAGE_SIZE = 32  # the default side of the input images (CIFAR-10's); a checkpoint's own wins
PT2_NAME = "model.pt2"
TORCHSCRIPT_NAME = "model.torchscript.pt"
METADATA_NAME = "metadata.json"
Format = Literal["pt2", "torchscript"]
FORMATS: tuple[Format, ...] = ("pt2", "torchscript")
# Largest batch the .pt2 accepts; torch.export needs a bound, this one is far above any serving batch.
_MAX_BATCH = 65536
# float32 differences between the exported graph and eager PyTorch (op fusion, summation order).
_CHECK_TOLERANCE = 1e-4


class ServingModel(nn.Module):
    """The network with the input normalization folded in: images → class probabilities.

    Args:
        net: ``(N, 3, H, W)`` normalized float images → ``(N, C)`` logits.
        mean: per-channel mean of the [0, 1] pixel values the network was trained with.
        std: per-channel standard deviation of the same.
        flip_tta: average the logits of each image and of its mirror image, as ``ImageClassifier``
            does with ``flip_tta`` in validation, test and predict.

    ``forward(images)``: uint8 ``(N, 3, H, W)`` in 0…255, or float in [0, 1] → float32
    probabilities ``(N, C)``. Computes ``softmax(net((images / 255 - mean) / std))``, the same
    arithmetic as training's ``lit_accel.data.augment.normalize``.
    """

    if TYPE_CHECKING:  # buffers, registered in __init__; no class annotation at run time, which TorchScript would read
        mean: Tensor
        std: Tensor

    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        flip_tta: bool = False,
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in [*mean, *std]) or min(std) <= 0:
            raise ValueError(
                f"mean={list(mean)!r}, std={list(std)!r} is not allowed: use 3 finite values each (one per RGB "
                "channel), std positive"
            )
        self.net = net
        self.flip_tta = flip_tta
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    @override
    def forward(self, images: Tensor) -> Tensor:
        x = images.to(torch.float32) / 255.0 if images.dtype == torch.uint8 else images.to(torch.float32)
        x = (x - self.mean) / self.std
        logits = self.net(x)
        if self.flip_tta:
            logits = 0.5 * (logits + self.net(torch.flip(x, [-1])))
        return torch.softmax(logits.to(torch.float32), dim=-1)


# ------------------------------------------------------------------------------- loading
def resolve_checkpoint(checkpoint: str, runs_dir: str = "runs") -> str:
    """A checkpoint path, or ``best``/``last`` of the newest run under ``runs_dir``.

    Unlike ``lit-accel --ckpt_path``, which looks only in its config's experiment
    (``runs/<name>/``), this takes the newest run of any experiment below ``runs_dir``: pass
    ``runs_dir="runs/cifar10"`` for one experiment's.
    """
    if checkpoint in CHECKPOINT_ALIASES and not os.path.exists(checkpoint):
        # hpc_ckpt_<n>.ckpt (SLURM requeue) lie in the Trainer's default_root_dir: the working directory
        found = find_checkpoint(runs_dir, checkpoint, hpc_dir=os.getcwd())
        if found is None:
            raise CheckpointError(
                f"no {checkpoint!r} checkpoint found under {runs_dir}/. Train first with "
                f"'lit-accel fit --config …', pass --runs_dir with the logger's save_dir, or pass the .ckpt file."
            )
        return found
    if not os.path.exists(checkpoint):
        raise CheckpointError(
            f"checkpoint {checkpoint!r} not found ({os.path.abspath(checkpoint)}). Pass a .ckpt file written by "
            f"'lit-accel fit' (runs/<name>/version_<n>/checkpoints/), or 'best'/'last' for the newest run's."
        )
    return checkpoint


def load_classifier(checkpoint: str) -> ImageClassifier:
    """An ``ImageClassifier`` rebuilt from a ``lit-accel fit`` checkpoint, on the CPU, in eval mode.

    Accepts a ``.ckpt`` file or an FSDP2 checkpoint folder (``.distcp`` shards, from
    ``configs/strategy/fsdp.yaml``), consolidated in memory.

    The classes its hyperparameters name are checked before any is imported
    (:func:`~lit_accel.checkpoints.check_import_paths`): only those of lit_accel, torch and
    torchvision are rebuilt.

    Raises:
        CheckpointError: if the checkpoint is missing, unreadable, names a class outside those
            packages, or does not describe its network.
    """
    from lit_accel.models import ImageClassifier

    if os.path.isdir(checkpoint):
        contents = _consolidated(checkpoint)
        source: Any = io.BytesIO()
        torch.save(contents, source)
        source.seek(0)
    else:
        source = checkpoint
        contents = read_checkpoint(checkpoint)
    hparams = contents.get("hyper_parameters") if isinstance(contents, dict) else None
    if not isinstance(contents, dict) or "state_dict" not in contents:
        raise CheckpointError(f"{checkpoint!r} is not a Lightning checkpoint (it has no 'state_dict').")
    if not isinstance(hparams, dict) or "net" not in hparams:
        raise CheckpointError(
            f"checkpoint {checkpoint!r} does not record its network (no 'net' in its hyperparameters): it was not "
            f"written by 'lit-accel fit'. For a model built in Python, call "
            f"lit_accel.export.export_model(model.net, out_dir) instead."
        )
    # Rebuilding imports every class the hyperparameters name: only trusted packages' (no config here).
    check_import_paths(contents, checkpoint)
    try:
        model = ImageClassifier.load_from_checkpoint(source, map_location="cpu", weights_only=True)
    except (KeyError, RuntimeError, TypeError, ValueError, ImportError, AttributeError, argparse.ArgumentError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"checkpoint {checkpoint!r} could not be rebuilt as a lit_accel ImageClassifier "
            f"({type(err).__name__}: {message}). Was it written by another version of the network's code?"
        ) from err
    return model.eval()


def _consolidated(folder: str) -> dict[str, Any]:
    """An FSDP2 (ModelParallelStrategy) checkpoint folder → one full checkpoint, in memory.

    The folder is verified first (:func:`~lit_accel.checkpoints.verify_distributed_checkpoint`):
    torch's reader would unpickle a crafted folder's contents without restriction.
    """
    if not os.path.isfile(os.path.join(folder, ".metadata")):
        raise CheckpointError(
            f"{folder!r} is a folder, not a checkpoint (a distributed checkpoint folder holds a .metadata file). "
            f"Pass a .ckpt file, or 'best'/'last' for the newest run's."
        )
    verify_distributed_checkpoint(folder)
    from lightning.fabric.utilities.load import _load_distributed_checkpoint
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        checkpoint = _load_distributed_checkpoint(Path(folder))
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        raise CheckpointError(
            f"{folder!r} is not a readable distributed checkpoint ({type(err).__name__}). "
            f"Pass a .ckpt file or the checkpoint folder that ModelCheckpoint wrote under FSDP."
        ) from err
    return checkpoint


# ------------------------------------------------------------------------------- exporting
def export_model(
    net: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    formats: Sequence[Format] = FORMATS,
    input_dtype: Literal["uint8", "float32"] = "uint8",
    source: str = "",
    flip_tta: bool = False,
    overwrite: bool = False,
    image_size: int = IMAGE_SIZE,
) -> dict[str, Path]:
    """Write ``net`` (normalized images → logits) as serving artifacts; returns ``{format: path}``.

    Each artifact is checked against the eager model on a random batch of another size than
    the one traced.

    Args:
        net: the network, e.g. ``ImageClassifier.net``.
        out_dir: folder for ``model.pt2``, ``model.torchscript.pt`` and ``metadata.json``, created if
            needed: a new or empty folder, or one holding only an earlier export (recognized by
            its ``metadata.json``), see :func:`check_export_folder`. The files are written into a
            temporary folder beside it and moved in only when complete and checked: a failed export
            leaves the folder as it was. An artifact of a format not written this time (the earlier
            export's, of other weights) is removed, so the folder holds one export that its
            ``metadata.json`` describes.
        classes: class names, in output order (default: the indices).
        mean: normalization mean of [0, 1] pixels, folded into the artifact.
        std: normalization standard deviation, folded into the artifact.
        formats: which of ``"pt2"``, ``"torchscript"`` to write.
        input_dtype: the dtype the ``.pt2`` takes (``"uint8"``: 0…255, ``"float32"``: [0, 1]).
        source: where the weights came from, recorded in the metadata.
        flip_tta: fold test-time flip averaging into the artifact (see :class:`ServingModel`).
        overwrite: also write into a folder holding other files: ``model.pt2``,
            ``model.torchscript.pt`` and ``metadata.json`` there are replaced (or removed, for a format
            not written), whoever wrote them; other files are kept.
        image_size: side of the square input images: the artifacts take ``(N, 3, image_size,
            image_size)`` (the ``.pt2`` only that size).

    Raises:
        ValueError: for an unknown format or input dtype, an ``image_size`` below 1, or a
            ``mean``/``std`` that is not 3 finite values (``std`` positive).
        LitAccelUserError: if ``out_dir`` is a file, lies inside one, cannot be created or written,
            or holds files that are not an earlier export's (without ``overwrite``).
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats={list(formats)!r} is not allowed: use one or both of {list(FORMATS)}")
    if input_dtype not in ("uint8", "float32"):
        raise ValueError(f"input_dtype={input_dtype!r} is not allowed: use 'uint8' or 'float32'")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} is not allowed: use a positive number of pixels")
    check_export_folder(out_dir, overwrite=overwrite)
    # No parameter requires grad: outputs of the artifacts carry no autograd graph when served.
    model = ServingModel(_plain_copy(net), mean, std, flip_tta=flip_tta).eval().requires_grad_(False)
    example = _example_batch(4, input_dtype, image_size)
    with torch.no_grad():
        num_classes = model(example).shape[1]
    names = [str(c) for c in classes] if classes is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"classes has {len(names)} names but the network has {num_classes} outputs")
    metadata = _metadata(names, mean, std, input_dtype, source, flip_tta, formats, image_size)
    out = Path(out_dir)
    staging = _staging_folder(out)
    try:
        (staging / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        extra = {METADATA_NAME: json.dumps(metadata)}
        if "pt2" in formats:
            _export_pt2(model, example, staging / PT2_NAME, extra)
        if "torchscript" in formats:
            _export_torchscript(model, staging / TORCHSCRIPT_NAME, extra, image_size)
        # Only checked, complete files reach the folder, each in one rename; other files stay.
        out.mkdir(exist_ok=True)
        written: dict[str, Path] = {}
        for name in (PT2_NAME, TORCHSCRIPT_NAME, METADATA_NAME):
            if (staging / name).exists():
                os.replace(staging / name, out / name)
        for fmt, name in (("pt2", PT2_NAME), ("torchscript", TORCHSCRIPT_NAME)):
            if fmt in formats:
                written[fmt] = out / name
            elif (out / name).is_file():
                (out / name).unlink()
                print(
                    f"lit-accel-export: removed {out / name}: an earlier export's, not these weights'", file=sys.stderr
                )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def check_export_folder(out_dir: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Refuse, before any work, an output folder that an export cannot use or must not touch.

    The folder may be new (its missing folders are created), empty, or hold only an earlier export:
    a ``metadata.json`` that lit-accel-export wrote and the artifacts it lists. Anything else in it
    is the user's (their own ``model.pt2``, notes, …), and an export would replace or remove it;
    ``overwrite`` allows that for the export's own three file names. The folder (or, for a new
    one, the nearest folder that exists) and its parent, where the files are staged, must be
    writable.

    Raises:
        LitAccelUserError: naming the folder and what is in the way.
    """
    out = Path(out_dir)
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            where = "is a file" if folder == out else f"is inside {folder}, which is a file"
            raise LitAccelUserError(
                f"output folder {out} {where}: pass a folder path with -o (it is created if needed)."
            )
    absolute = out.absolute()
    nearest = next(folder for folder in absolute.parents if folder.exists())
    for folder in (absolute, nearest) if absolute.exists() else (nearest,):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise LitAccelUserError(
                f"output folder {out} cannot be written: {folder} is not writable (read-only, or no permission). "
                "Pass a folder you can write in with -o."
            )
    if not out.is_dir() or overwrite:
        return
    foreign = sorted(set(os.listdir(out)) - _earlier_export(out))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise LitAccelUserError(
            f"output folder {out} holds files that are not an earlier lit-accel-export's ({shown}): an export there "
            "would replace or remove them. Pass a new or empty folder with -o, or add --overwrite to replace "
            f"{PT2_NAME}, {TORCHSCRIPT_NAME} and {METADATA_NAME} there (other files are kept)."
        )


def _earlier_export(out: Path) -> set[str]:
    """The file names in ``out`` that an earlier export wrote: its ``metadata.json`` and the
    artifacts that lists, when the metadata is lit-accel-export's; else none."""
    try:
        metadata = json.loads((out / METADATA_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    own_keys = {"classes", "files", "input", "output", "normalization", "source_checkpoint", "torch_version"}
    files = metadata.get("files") if isinstance(metadata, dict) else None
    if not own_keys <= set(metadata) or not isinstance(files, list) or not set(files) <= {PT2_NAME, TORCHSCRIPT_NAME}:
        return set()
    return {METADATA_NAME, *files}


def _staging_folder(out: Path) -> Path:
    """A fresh folder beside ``out`` (checked by :func:`check_export_folder`) to write the artifacts
    into before they are moved there.

    Raises:
        LitAccelUserError: if it cannot be created.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}-export-", dir=out.parent))
    except OSError as err:
        raise LitAccelUserError(
            f"output folder {out} cannot be created ({err.strerror}): pass a writable folder with -o."
        ) from None


def export_checkpoint(
    checkpoint: str,
    out_dir: str | os.PathLike[str],
    *,
    formats: Sequence[Format] = FORMATS,
    input_dtype: Literal["uint8", "float32"] = "uint8",
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Export a ``lit-accel fit`` checkpoint (see :func:`export_model`; ``out_dir`` is checked first).

    Class names: ``classes`` when given, else those the checkpoint was trained with
    (``ImageClassifier.class_names``), else, for a checkpoint from before they were saved,
    CIFAR-10's for 10 outputs and the indices otherwise. Input size: the image size the
    checkpoint was trained at (``ImageClassifier.image_size``; 32 when it records none).

    Raises:
        CheckpointError: if the checkpoint is missing, unreadable, or does not describe its network.
    """
    check_export_folder(out_dir, overwrite=overwrite)
    model = load_classifier(checkpoint)
    num_classes = int(model.hparams.get("num_classes", 10))
    if classes is None:
        classes = model.class_names
    if classes is None and num_classes == len(CIFAR10_CLASSES):
        classes = CIFAR10_CLASSES
    flip_tta = bool(model.hparams.get("flip_tta", False))
    return export_model(
        model.net,
        out_dir,
        classes=classes,
        formats=formats,
        input_dtype=input_dtype,
        source=str(checkpoint),
        flip_tta=flip_tta,
        overwrite=overwrite,
        image_size=model.image_size or IMAGE_SIZE,
    )


def _plain_copy(net: nn.Module) -> nn.Module:
    """A copy of the network as a plain eval-mode CPU module (a ``torch.compile`` wrapper unwrapped)."""
    net = getattr(net, "_orig_mod", net)
    return copy.deepcopy(net).to("cpu").eval()


def _example_batch(size: int, input_dtype: str, image_size: int) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (size, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    return images if input_dtype == "uint8" else images.to(torch.float32) / 255.0


def _export_pt2(model: ServingModel, example: Tensor, path: Path, extra: dict[str, str]) -> Path:
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    program = torch.export.export(model, (example,), dynamic_shapes={"images": {0: batch}})
    torch.export.save(program, str(path), extra_files=extra)
    _check(model, torch.export.load(str(path)).module(), example.dtype, path, example.shape[-1])
    return path


def _export_torchscript(model: ServingModel, path: Path, extra: dict[str, str], image_size: int) -> Path:
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export; TorchScript is written on purpose here.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # The network is traced (works for any traceable network); the wrapper is scripted, so its
        # uint8-or-float branch survives. Tracing at batch 2 keeps the batch dimension symbolic.
        traced = torch.jit.trace(model.net, torch.zeros(2, 3, image_size, image_size), check_trace=False)
        wrapper = ServingModel(traced, model.mean.flatten().tolist(), model.std.flatten().tolist(), model.flip_tta)
        scripted = torch.jit.script(wrapper.eval().requires_grad_(False))
        torch.jit.save(scripted, str(path), _extra_files=extra)
        loaded = torch.jit.load(str(path))
    for dtype in (torch.uint8, torch.float32):
        _check(model, loaded, dtype, path, image_size)
    return path


def _check(model: nn.Module, exported: Any, dtype: torch.dtype, path: Path, image_size: int) -> None:
    images = _example_batch(3, "uint8" if dtype == torch.uint8 else "float32", image_size)
    with torch.no_grad():
        expected, got = model(images), exported(images)
    difference = float((expected - got).abs().max())
    if got.shape != expected.shape or difference > _CHECK_TOLERANCE:
        raise RuntimeError(
            f"{path} does not reproduce the model: output {tuple(got.shape)} vs {tuple(expected.shape)}, "
            f"largest difference {difference:.2e} (allowed {_CHECK_TOLERANCE:.0e})"
        )


def _metadata(
    classes: list[str],
    mean: Sequence[float],
    std: Sequence[float],
    input_dtype: str,
    source: str,
    flip_tta: bool,
    formats: Sequence[Format] = FORMATS,
    image_size: int = IMAGE_SIZE,
) -> dict[str, Any]:
    takes = {
        PT2_NAME: "uint8 in 0..255" if input_dtype == "uint8" else "float32 in [0, 1]",
        TORCHSCRIPT_NAME: "uint8 in 0..255, or float in [0, 1]",
    }
    files = [name for fmt, name in (("pt2", PT2_NAME), ("torchscript", TORCHSCRIPT_NAME)) if fmt in formats]
    return {
        "classes": classes,
        "files": files,
        "input": {
            "shape": ["N", 3, image_size, image_size],
            "layout": (
                f"NCHW, RGB; images brought to {image_size}x{image_size} by scaling the shorter side to "
                f"{image_size}, then a center crop"
            ),
            **{name: takes[name] for name in files},
        },
        "output": {"shape": ["N", len(classes)], "meaning": "class probabilities (softmax), float32"},
        "normalization": {"mean": list(mean), "std": list(std), "applied_inside": True},
        "flip_tta": {"applied_inside": flip_tta, "meaning": "logits averaged over each image and its mirror image"},
        "source_checkpoint": source,
        "torch_version": torch.__version__,
    }


# ------------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-accel-export",
        description=(
            "Export a lit-accel checkpoint for serving without lit_accel: torch.export (model.pt2) and "
            "TorchScript (model.torchscript.pt), normalization included. Input: (N, 3, S, S) RGB images at the "
            "size S the checkpoint was trained at (32 for CIFAR-10; metadata.json says), uint8 0..255 (or float "
            "[0, 1]); output: class probabilities (N, classes)."
        ),
    )
    parser.add_argument(
        "checkpoint", help="a .ckpt file (or FSDP checkpoint folder), or 'best'/'last': the newest run's"
    )
    parser.add_argument("-o", "--out_dir", default="exported", help="folder for the files (default: %(default)s)")
    parser.add_argument(
        "--format", choices=[*FORMATS, "both"], default="both", help="what to write (default: %(default)s)"
    )
    parser.add_argument(
        "--input_dtype",
        choices=["uint8", "float32"],
        default="uint8",
        help="the input dtype of model.pt2 (TorchScript takes both; default: %(default)s)",
    )
    parser.add_argument(
        "--classes",
        nargs="+",
        help="class names in output order (default: those the checkpoint was trained with; for an older checkpoint"
        " without them, CIFAR-10's for 10 classes)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"write into a folder that holds other files than an earlier export: {PT2_NAME}, {TORCHSCRIPT_NAME} and "
        f"{METADATA_NAME} there are replaced, other files kept (default: refuse)",
    )
    parser.add_argument(
        "--runs_dir",
        default="runs",
        help="where 'best'/'last' are looked for: the newest run of any experiment below it (default: %(default)s)",
    )
    return parser


# lit-accel-export 0.1.0 spelled its options --kebab-case; lit-accel (LightningCLI) spells them --snake_case.
_DEPRECATED_FLAGS = {"--out-dir": "--out_dir", "--input-dtype": "--input_dtype", "--runs-dir": "--runs_dir"}


def _modern_flags(args: Sequence[str]) -> list[str]:
    """``args`` with the old ``--kebab-case`` options renamed; says once which were used."""
    renamed: list[str] = []
    used: list[str] = []
    for index, arg in enumerate(args):
        if arg == "--":  # what follows is positional
            renamed += args[index:]
            break
        flag, equals, value = arg.partition("=")
        if flag in _DEPRECATED_FLAGS:
            used.append(flag)
            arg = _DEPRECATED_FLAGS[flag] + equals + value
        renamed.append(arg)
    if used:
        flags = list(dict.fromkeys(used))
        old, new = ", ".join(flags), ", ".join(_DEPRECATED_FLAGS[flag] for flag in flags)
        print(
            f"lit-accel-export: warning: {old} {'is' if len(flags) == 1 else 'are'} deprecated and will be removed in "
            f"a future release: use {new} "
            "(options are spelled as in lit-accel).",
            file=sys.stderr,
        )
    return renamed


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``lit-accel-export``. A user error ends in one message and exit status 2."""
    options = _parser().parse_args(_modern_flags(sys.argv[1:] if args is None else list(args)))
    formats: tuple[Format, ...] = FORMATS if options.format == "both" else (options.format,)
    try:
        check_export_folder(options.out_dir, overwrite=options.overwrite)
        checkpoint = resolve_checkpoint(options.checkpoint, options.runs_dir)
        written = export_checkpoint(
            checkpoint,
            options.out_dir,
            formats=formats,
            input_dtype=options.input_dtype,
            classes=options.classes,
            overwrite=options.overwrite,
        )
    except (LitAccelUserError, ValueError) as err:
        print(f"lit-accel-export: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {checkpoint}:")
    for path in written.values():
        print(f"  {path}")
    print(f"  {Path(options.out_dir) / METADATA_NAME}")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


if __name__ == "__main__":
    main()
