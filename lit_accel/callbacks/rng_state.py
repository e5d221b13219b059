"""Save and restore the random number generators with each checkpoint."""

from __future__ import annotations

import random
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["RNGStateCheckpoint"]


class RNGStateCheckpoint(Callback):
    """Puts Python's, NumPy's and torch's (CPU and CUDA) RNG states into every checkpoint.

    Lightning restores weights, optimizer, scheduler and loop progress, but not the random number
    generators, so a resumed run draws different augmentations and dropout masks than the run it
    continues. With this callback (and data loaders that do not draw from the global generator,
    like lit_accel's: a ``DataLoader`` without its own ``generator`` draws one number from torch's
    global generator every time an epoch starts) a run resumed from a mid-epoch checkpoint trains
    exactly like the uninterrupted run on a CPU or a single device. The states are captured when
    the checkpoint is written and applied at ``on_train_start``, just before the first resumed
    step. They are stored as plain Python values and tensors, so the checkpoint loads with
    ``torch.load(weights_only=True)``, as Lightning loads it. A checkpoint without some of the
    states (written without NumPy, or on a machine without CUDA) restores the others.

    Limitation (distributed): the checkpoint holds rank 0's states and every rank gets them on
    resume. For the CPU generators that is what ranks seeded alike (``seed_everything``) hold
    anyway. The CUDA states are those rank 0's process saw for all its visible devices, so on
    multi-GPU DDP each rank gets back rank 0's view, not its own device's generator: an exact
    resume is guaranteed on CPU and on a single device only. CUDA states are restored only when the
    number of visible devices matches the checkpoint's.

    Args:
        None; the callback takes no arguments.

    Logged metrics: none.

    Raises:
        Nothing of its own; ``torch.set_rng_state``/``random.setstate`` reject a corrupted state.

    Example::

        trainer:
          callbacks:
            - class_path: lit_accel.callbacks.RNGStateCheckpoint
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, Any] | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss_next = random.getstate()
        state: dict[str, Any] = {
            # Plain types and tensors only: checkpoints must load with torch.load(weights_only=True).
            "python": (int(version), tuple(internal), gauss_next),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        numpy_state = _numpy_state()
        if numpy_state is not None:
            state["numpy"] = numpy_state
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied at on_train_start: the checkpoint is loaded before Lightning's own set-up draws.
        self._pending = dict(state_dict)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        _apply(state)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._pending = None  # a state loaded for a run that never trained must not reach a later fit


def _numpy_state() -> dict[str, Any] | None:
    try:
        import numpy  # optional for torch, so not a hard dependency of this file
    except ImportError:
        return None
    # legacy=True (the default, spelled out for the stubs): the global RandomState's MT19937 tuple.
    state = cast("tuple[str, Any, int, int, float]", numpy.random.get_state(legacy=True))
    kind, keys, position, has_gauss, cached_gaussian = state
    return {
        "kind": str(kind),
        "keys": torch.from_numpy(keys.astype("int64")),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _apply(state: dict[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        saved = state["numpy"]
        keys = saved["keys"].numpy().astype("uint32")
        numpy.random.set_state((saved["kind"], keys, saved["position"], saved["has_gauss"], saved["cached_gaussian"]))
