"""Save and restore the random number generators with each checkpoint."""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["RNGStateCheckpoint"]


class RNGStateCheckpoint(Callback):
    """Puts Python's, NumPy's and torch's (CPU and CUDA) RNG states into every checkpoint.

    Lightning restores weights, optimizer, scheduler and loop progress, but not the random number
    generators, so a resumed run draws different augmentations and dropout masks than the run it
    continues. With this callback (and data loaders that do not draw from the global generator,
    like lit_accel's) a run resumed from a mid-epoch checkpoint trains exactly like the
    uninterrupted run on a CPU. The states are applied at ``on_train_start``, just before the first
    resumed step.

    The checkpoint holds rank 0's states; every rank gets them on resume. With a common seed all
    ranks draw the same numbers anyway (``seed_everything`` seeds each rank alike).

    Logged metrics: none.

    Example::

        trainer:
          callbacks:
            - class_path: lit_accel.callbacks.RNGStateCheckpoint
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        try:
            import numpy

            kind, keys, position, has_gauss, cached_gaussian = numpy.random.get_state()
            # Plain types and tensors only: checkpoints must load with torch.load(weights_only=True).
            state["numpy"] = {
                "kind": str(kind),
                "keys": torch.from_numpy(keys.astype("int64")),
                "position": int(position),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached_gaussian),
            }
        except ImportError:  # numpy is optional for torch
            pass
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        if "python" in state:
            random.setstate(state["python"])
        if "torch" in state:
            torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        if "numpy" in state:
            import numpy

            saved = state["numpy"]
            keys = saved["keys"].numpy().astype("uint32")
            numpy.random.set_state(
                (saved["kind"], keys, saved["position"], saved["has_gauss"], saved["cached_gaussian"])
            )
