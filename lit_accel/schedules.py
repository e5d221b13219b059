"""Learning-rate schedules sized from the run itself, so no recipe holds a schedule length.

:class:`WarmupDecayLR` warms the learning rate up and decays it to its end value over however many
optimizer steps the run has: ``trainer.max_epochs``, ``trainer.max_steps``, ``limit_train_batches``,
gradient accumulation, the number of processes and a batch size that changes mid-fit
(``DynamicBatchLR``) all change the number of steps, and the schedule follows. The shape is the
one of the short-budget CIFAR-10 records (Page's DAWNBench ResNet-9, airbench: a short linear
warm-up, then a decay to about zero at the last step).

Who sizes it: :class:`~lit_accel.models.ImageClassifier` calls :meth:`WarmupDecayLR.plan` when it
configures its optimizer, and again before a training batch whenever
:func:`optimizer_steps_left` says the run's length changed (a grown batch, a resumed run of
another length, steps DivergenceGuard skipped or rolled back). Another LightningModule can do the
same in a few lines (see the class docstring).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from typing_extensions import override

from lit_accel.errors import ConfigurationError

__all__ = ["WarmupDecayLR", "lr_factor", "optimizer_steps_left"]

Decay = Literal["cosine", "linear"]
_DECAYS = ("cosine", "linear")


def lr_factor(progress: float, warmup: float, decay: str, start_factor: float, end_factor: float) -> float:
    """The learning-rate multiplier at ``progress`` (0: first optimizer step, 1: last step).

    Linear warm-up from ``start_factor`` to 1 over ``[0, warmup]``, then a ``"cosine"`` or
    ``"linear"`` decay from 1 to ``end_factor`` over ``[warmup, 1]``.
    """
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return start_factor + (1.0 - start_factor) * progress / warmup
    remaining = (progress - warmup) / (1.0 - warmup) if warmup < 1.0 else 1.0
    if decay == "cosine":
        return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + math.cos(math.pi * remaining))
    return 1.0 - (1.0 - end_factor) * remaining


class WarmupDecayLR(LRScheduler):
    """Warm-up, then decay to ``end_factor`` × the base LR exactly at the run's last optimizer step.

    Steps once per optimizer step. Progress runs from 0 at the first step to 1 at the last one of
    the *planned* run; :meth:`plan` sets (or changes) how many steps the run has. A change mid-run
    (the batch grew, so the epochs left have fewer steps) keeps the learning rate continuous: the
    progress still to go is spread over the steps still to go. The plan is part of
    ``state_dict()``, so a resumed run, mid-epoch too, continues on the same curve.

    Args:
        optimizer: the wrapped optimizer; its ``lr`` is the peak learning rate.
        warmup_fraction: share of the run spent warming up, in [0, 1).
        warmup_steps: warm-up length in optimizer steps instead (0: use ``warmup_fraction``); it
            must be shorter than the run.
        decay: ``"cosine"`` or ``"linear"`` from the peak to the end value.
        start_factor: with a warm-up, the first step's learning rate as a fraction of the peak,
            in (0, 1] (without one, the first step runs at the peak).
        end_factor: the last step's learning rate as a fraction of the peak, in [0, 1]. With the
            default 0 a run of a single optimizer step (``fast_dev_run``) updates nothing.
        last_epoch: as for every torch scheduler (``-1``: a fresh start).

    Raises:
        ConfigurationError: (a ``ValueError``) for a value outside the ranges above, both warm-up arguments set,
            or (from :meth:`plan`) a run of no steps or a warm-up longer than the run.

    Example::

        model:
          lr_scheduler:
            class_path: lit_accel.schedules.WarmupDecayLR
            init_args: {warmup_fraction: 0.1, decay: cosine}

    In a LightningModule of your own::

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=2e-3)
            scheduler = WarmupDecayLR(optimizer, warmup_fraction=0.1)
            scheduler.plan(self.trainer.estimated_stepping_batches)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

        def on_train_batch_start(self, batch, batch_idx):  # when the run's length can change
            scheduler = self.lr_schedulers()
            total = scheduler.last_epoch + optimizer_steps_left(self.trainer, batch_idx)
            if total != scheduler.total_steps:
                scheduler.plan(total)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_fraction: float = 0.0,
        warmup_steps: int = 0,
        decay: Decay = "cosine",
        start_factor: float = 0.1,
        end_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        _require(
            _is_fraction(warmup_fraction, upper_open=True),
            "warmup_fraction",
            warmup_fraction,
            "a fraction of the run in [0, 1)",
        )
        _require(
            isinstance(warmup_steps, int) and not isinstance(warmup_steps, bool) and warmup_steps >= 0,
            "warmup_steps",
            warmup_steps,
            "0 or more optimizer steps",
        )
        _require(
            not (warmup_steps > 0 and warmup_fraction > 0),
            "warmup_steps",
            warmup_steps,
            f"0 when warmup_fraction is set ({warmup_fraction}): give one of the two",
        )
        _require(decay in _DECAYS, "decay", decay, "'cosine' or 'linear'")
        _require(
            _is_fraction(start_factor) and start_factor > 0,
            "start_factor",
            start_factor,
            "a fraction of the peak LR in (0, 1]",
        )
        _require(_is_fraction(end_factor), "end_factor", end_factor, "a fraction of the peak LR in [0, 1]")
        self.warmup_fraction = float(warmup_fraction)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        self.start_factor = float(start_factor)
        self.end_factor = float(end_factor)
        # The plan: total optimizer steps, and the (step, progress) it was last changed at.
        self.total_steps: int | None = None
        self.anchor_step = 0
        self.anchor_progress = 0.0
        self.warmup = self.warmup_fraction  # in progress units; warmup_steps is converted by plan()
        super().__init__(optimizer, last_epoch)

    def plan(self, total_steps: int | float) -> None:
        """Make the run ``total_steps`` optimizer steps long in all (steps already taken included).

        The first call fixes the warm-up of ``warmup_steps``; later calls keep the learning rate
        continuous at the current step. A schedule that already reached its end stays there: the
        steps added to it run at the end value (a warning says so).
        """
        if not (isinstance(total_steps, (int, float)) and math.isfinite(total_steps) and total_steps >= 1):
            raise ConfigurationError(
                f"WarmupDecayLR: a run of {total_steps} optimizer steps cannot be scheduled: its length must be "
                "known (set trainer.max_epochs or trainer.max_steps, with a training loader that has a length) "
                "and at least one batch"
            )
        total = int(total_steps)
        step = max(self.last_epoch, 0)
        if self.total_steps is None:
            if self.warmup_steps > 0:
                if self.warmup_steps >= total:
                    raise ConfigurationError(
                        f"WarmupDecayLR warmup_steps={self.warmup_steps} is not allowed: the run has only {total} "
                        f"optimizer steps. Use fewer warm-up steps, or warmup_fraction (a share of the run)."
                    )
                self.warmup = self.warmup_steps / max(total - 1, 1)
        elif total != self.total_steps:
            self.anchor_progress, self.anchor_step = self.progress(step), step
            if self.anchor_progress >= 1.0 and total > step + 1:
                warnings.warn(
                    f"WarmupDecayLR: the schedule already ended (step {step}), so the {total - step} steps added to "
                    f"the run use the end value, {self.end_factor} x the peak LR. To train longer at a useful LR, "
                    "start a new run from the checkpoint's weights instead of resuming it.",
                    stacklevel=2,
                )
        self.total_steps = total
        self._apply(self.get_lr())

    def progress(self, step: int | None = None) -> float:
        """Where ``step`` (default: the next one) lies in the planned run: 0 first, 1 last."""
        step = max(self.last_epoch, 0) if step is None else step
        if self.total_steps is None:
            return 0.0
        steps_left = self.total_steps - 1 - self.anchor_step
        if steps_left <= 0:
            return 1.0
        return min(1.0, self.anchor_progress + (1.0 - self.anchor_progress) * (step - self.anchor_step) / steps_left)

    @override
    def get_lr(self) -> list[float | Tensor]:
        factor = lr_factor(self.progress(), self.warmup, self.decay, self.start_factor, self.end_factor)
        return [base_lr * factor for base_lr in self.base_lrs]

    def _apply(self, lrs: list[float | Tensor]) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = list(lrs)


def optimizer_steps_left(trainer: Any, batch_idx: int = 0) -> float:
    """Optimizer steps from training batch ``batch_idx`` of the current epoch to the end of the run.

    The smaller of what ``trainer.max_epochs`` leaves (the rest of this epoch plus the epochs to
    go, at the current batches per epoch and ``accumulate_grad_batches``; Lightning steps the
    optimizer at an epoch's last batch even when an accumulation is incomplete) and what
    ``trainer.max_steps`` leaves; ``inf`` when neither bounds the run or the loader has no
    length. Valid once Lightning has built the epoch's training DataLoader.
    """
    batches = trainer.num_training_batches
    accumulate = max(1, trainer.accumulate_grad_batches)
    bounds = [math.inf]
    if trainer.max_epochs is not None and trainer.max_epochs >= 0 and math.isfinite(batches):
        per_epoch = math.ceil(batches / accumulate)
        epochs_left = trainer.max_epochs - trainer.current_epoch
        bounds.append(max(0, epochs_left * per_epoch - batch_idx // accumulate) if epochs_left > 0 else 0)
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        bounds.append(max(0, trainer.max_steps - trainer.global_step))
    return min(bounds)


def _is_fraction(value: object, upper_open: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigurationError(f"WarmupDecayLR {name}={value!r} is not allowed: use {allowed}")
