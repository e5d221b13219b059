"""DynamicBatchLR: the Lightning adapter of :class:`lit_accel.core.batch_plan.BatchPlan`.

It reads the batch and the monitored metric at Lightning's hooks, agrees on them across ranks,
asks the plan, and acts: sets the batch on its holder and asks Lightning for a new training
DataLoader, sets ``trainer.accumulate_grad_batches``, and keeps the plan's LR multiplier on the
optimizers (:func:`lit_accel.core.lr_scaling.apply_lr_scale`). The README ("Dynamic batch size")
says how it works and when it pays.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr, lightning_setattr
from typing_extensions import override

from lit_accel.callbacks.shared import RunSettingsError, notify_batch_size_changed
from lit_accel.core.batch_plan import BatchDecision, BatchPlan, BatchPlanError, LRScaling, Policy
from lit_accel.core.checks import require
from lit_accel.core.lr_scaling import apply_lr_scale
from lit_accel.core.state_keys import identity_state_key

__all__ = ["DynamicBatchLR"]

log = logging.getLogger(__name__)


class DynamicBatchLR(Callback):
    """Grow the batch or lower the learning rate on a plateau, or grow the batch by a table.

    At the end of each training epoch (after its validation) the plateau policy sees the
    ``monitor`` metric averaged over the ranks, and the tables the next epoch's entry; a change
    takes effect from the next epoch on every rank. The per-device batch is the public
    ``batch_size`` of the data module or the LightningModule (as ``BatchSizeFinder`` finds it),
    which ``train_dataloader()`` must read; past ``max_batch_size`` ``accumulate_grad_batches``
    grows instead. The LR multiplier applies on top of any torch scheduler, to every param group
    (one added during fit too). Other callbacks with ``on_batch_size_changed`` are told
    (:class:`~lit_accel.callbacks.shared.BatchSizeListener`). Resumable, also across ``fit`` calls.

    Args:
        monitor: the metric watched for plateaus (a key of ``trainer.callback_metrics``).
        mode: ``"min"`` if a lower ``monitor`` is better, ``"max"`` if higher is better.
        policy: what a plateau does: ``"lr"`` (default), ``"batch"``, ``"batch_then_lr"`` (grow
            the batch to its maximum, then lower the LR) or ``"none"`` (tables only).
        patience: the ``patience``-th consecutive epoch without improvement is a plateau (>= 1).
        min_delta: the smallest change of ``monitor`` that counts as an improvement (absolute).
        cooldown: epochs after a plateau during which none is counted.
        lr_factor: the LR multiplier of an ``"lr"`` action, in (0, 1).
        min_lr: the LR is never lowered below this (the largest of the param groups).
        batch_factor: the multiplier of samples per optimizer step of a ``"batch"`` action (> 1).
        max_batch_size: most samples per ``training_step`` on one device; ``None``: no limit.
        max_effective_batch_size: most samples per optimizer step over all devices (reached by
            accumulation); ``None``: growth stops at ``max_batch_size``.
        lr_scaling: how the LR follows the batch: ``"none"``, ``"linear"`` or ``"sqrt"``.
        batch_size_schedule: ``{epoch: per-device samples per optimizer step}``.
        batch_size_progress: ``{fraction of the run in (0, 1): per-device samples per optimizer
            step}``, growing; needs ``trainer.max_epochs``.

    Logged keys (at the start of every training epoch, and after another callback changed the
    LRs, at ``trainer.global_step``: the first optimizer step the value applies to):
        ``dynamic/batch_size``: per-device batch (samples per ``training_step``).
        ``dynamic/effective_batch_size``: samples per optimizer step over all devices.
        ``dynamic/lr_scale``: the multiplier on top of the LR schedule.

    Raises:
        ValueError: an argument outside its allowed range, a batch policy without a maximum, or
            two batch tables or policies at once.
        RunSettingsError: at the start of training, a ``batch_size_progress`` the run cannot meet,
            maxima below the starting batch, or accumulation that manual optimization or the
            strategy cannot do; the message says what to change.

    Example::

        trainer:
          callbacks:
            - class_path: lit_accel.callbacks.DynamicBatchLR
              init_args:
                policy: batch_then_lr
                max_batch_size: 512
                max_effective_batch_size: 2048
    """

    def __init__(
        self,
        monitor: str = "val/loss",
        mode: Literal["min", "max"] = "min",
        policy: Policy = "lr",
        patience: int = 2,
        min_delta: float = 0.0,
        cooldown: int = 0,
        lr_factor: float = 0.5,
        min_lr: float = 0.0,
        batch_factor: float = 2.0,
        max_batch_size: int | None = None,
        max_effective_batch_size: int | None = None,
        lr_scaling: LRScaling = "none",
        batch_size_schedule: dict[int, int] | None = None,
        batch_size_progress: dict[float, int] | None = None,
    ) -> None:
        super().__init__()
        require(isinstance(monitor, str) and monitor != "", "monitor", monitor, "a metric name")
        self.monitor = monitor
        self.mode = mode
        self.plan = BatchPlan(
            policy,
            mode=mode,
            patience=patience,
            min_delta=min_delta,
            cooldown=cooldown,
            lr_factor=lr_factor,
            min_lr=min_lr,
            batch_factor=batch_factor,
            max_batch_size=max_batch_size,
            max_effective_batch_size=max_effective_batch_size,
            lr_scaling=lr_scaling,
            batch_size_schedule=batch_size_schedule,
            batch_size_progress=batch_size_progress,
        )
        self._holder: str | None = None  # "datamodule" | "module" | None (the DataLoader's own batch)
        self._pending_apply = False  # a checkpoint's batch still to be set on its holder
        self._notified_batch: int | None = None
        self._val_ran = False
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        # Identity, as Lightning's EarlyStopping: what it watches; not the policy or its settings,
        # so a run resumed with another policy keeps the batch size and LR scale it reached.
        return identity_state_key(type(self).__qualname__, monitor=self.monitor, mode=self.mode)

    @override
    def state_dict(self) -> dict[str, Any]:
        # applied_lr_scale: what the optimizers hold (their param groups carry the live value).
        return {**self.plan.state_dict(), "applied_lr_scale": self.plan.lr_scale}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.plan.load_state_dict(state_dict)
        # Most strategies restore callbacks before on_fit_start; FSDP/ModelParallel/DeepSpeed after it
        # (strategy.restore_checkpoint_after_setup), then on_train_start applies the state.
        self._pending_apply = True

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._warned = set()
        self._holder = _find_batch_size_holder(trainer, pl_module)
        if self._holder is None:
            return  # the DataLoader's own batch is known only once it is built: on_train_start
        configured = _read_batch_size(trainer, pl_module, self._holder)
        self._notified_batch = configured
        self._start_plan(trainer, pl_module, configured, fixed=False)
        self._write_batch(trainer, pl_module)
        self._pending_apply = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._holder is None:
            loader_batch = _loader_batch_size(trainer)
            self._notified_batch = loader_batch
            self._start_plan(trainer, pl_module, loader_batch, fixed=True)
            if self.plan.grows_batch and "fixed" not in self._warned:
                self._warned.add("fixed")
                rank_zero_warn(
                    "DynamicBatchLR: no integer `batch_size` attribute on the data module or the LightningModule, so"
                    f" the DataLoader's batch ({loader_batch}) stays fixed and the batch grows only through"
                    " `accumulate_grad_batches` (up to max_effective_batch_size). Expose a public `batch_size` that"
                    " train_dataloader() reads to change the real batch."
                )
            trainer.accumulate_grad_batches = self.plan.accumulate
        elif self._pending_apply:  # the checkpoint was restored after on_fit_start
            self._write_batch(trainer, pl_module)
            _request_train_dataloader_reload(trainer)
        self._pending_apply = False
        if self.plan.accumulate > 1 and not _can_accumulate(trainer, pl_module):
            raise RunSettingsError(self._accumulation_error(trainer, pl_module))
        self._sync_lr(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_ran = False
        self._sync_lr(trainer)
        batch = self.plan.batch_size
        if batch is not None and batch != self._notified_batch:
            self._notified_batch = batch
            self._check_loader_batch(trainer)
            notify_batch_size_changed(trainer, pl_module, batch, exclude=self)
        self._log(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Every batch: another callback may have restored older param groups (a rollback) since
        # the last one, or added a group. A no-op costs one lookup per param group.
        if self._sync_lr(trainer) and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
            self._log(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_ran = True

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every rank takes the same decisions from the same numbers; they act from the next epoch.
        epoch = trainer.current_epoch
        decisions: list[tuple[str, BatchDecision]] = []
        if self.plan.policy != "none" and (self._val_ran or not trainer.enable_validation):
            value, lr = self._agreed_inputs(trainer)
            decision = None if value is None else self.plan.observe(value, lr)
            if decision is not None:
                plateau = self.plan.plateau
                reason = (
                    f"epoch {epoch}: {self.monitor} plateaued ({self.monitor}={value:.5g}, best"
                    f" {_fmt(plateau.best)}, {plateau.patience} epoch(s) without improvement)"
                )
                decisions.append((reason, decision))
        table = self.plan.at_epoch(epoch + 1)
        if table is not None:
            decisions.append((f"epoch {epoch + 1}: {table.reason.value}", table))
        changed = False
        for reason, decision in decisions:
            changed |= decision.changed
            if trainer.is_global_zero:
                log.info(_describe(reason, decision, trainer.world_size))
        if changed:
            self._write_batch(trainer, pl_module)
            self._sync_lr(trainer)

    # ---------------------------------------------------------------------------------- internals
    def _start_plan(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, configured: int | None, fixed: bool
    ) -> None:
        try:
            self.plan.start(
                configured,
                int(trainer.accumulate_grad_batches),
                world_size=trainer.world_size,
                can_accumulate=_can_accumulate(trainer, pl_module),
                fixed=fixed,
                max_epochs=trainer.max_epochs,
            )
        except BatchPlanError as err:
            raise RunSettingsError(f"DynamicBatchLR: {err}") from None

    def _agreed_inputs(self, trainer: pl.Trainer) -> tuple[float | None, float]:
        """The monitored metric's mean over the ranks that have it (warned about once if none has)
        and rank 0's largest LR; every rank calls one reduce and one broadcast."""
        value = trainer.callback_metrics.get(self.monitor)
        pair = torch.tensor(
            [0.0 if value is None else float(value), 0.0 if value is None else 1.0],
            dtype=torch.float64,
            device=trainer.strategy.root_device,
        )
        total, count = trainer.strategy.reduce(pair, reduce_op="sum").tolist()
        lrs = [float(group["lr"]) for optimizer in trainer.optimizers for group in optimizer.param_groups]
        mean, lr = trainer.strategy.broadcast((total / count if count > 0 else None, max(lrs, default=0.0)), src=0)
        if mean is None and "missing" not in self._warned:
            self._warned.add("missing")
            rank_zero_warn(
                f"DynamicBatchLR: monitor={self.monitor!r} is not among the logged metrics"
                f" {sorted(trainer.callback_metrics)}; no plateau check until it is logged"
            )
        return mean, lr

    def _accumulation_error(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        if not pl_module.automatic_optimization:
            who = "manual optimization (automatic_optimization = False) does not accumulate gradients"
        else:
            strategy = type(trainer.strategy).__name__
            who = f"{strategy} handles gradient accumulation itself and cannot change it during fit"
        batch, accumulate = self.plan.batch_size, self.plan.accumulate
        samples = (batch or 0) * accumulate
        return (
            f"DynamicBatchLR needs accumulate_grad_batches={accumulate} (batch {batch} × {accumulate} = {samples}"
            f" samples per optimizer step on each device, the batch being capped at"
            f" max_batch_size={self.plan.max_batch_size}), but {who}. Raise max_batch_size to at least {samples} if"
            " that fits in memory, or keep every batch_size_schedule value at or below max_batch_size (and resume only"
            " from checkpoints of runs that did not accumulate)."
        )

    def _write_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.accumulate_grad_batches = self.plan.accumulate
        batch = self.plan.batch_size
        if self._holder is None or batch is None:
            return
        if _read_batch_size(trainer, pl_module, self._holder) != batch:
            _write_batch_size(trainer, pl_module, self._holder, batch)
            _request_train_dataloader_reload(trainer)

    def _sync_lr(self, trainer: pl.Trainer) -> bool:
        """Bring every optimizer's multiplier to the plan's; True if any LR changed."""
        changed = False
        for optimizer in trainer.optimizers:
            schedulers = [
                config.scheduler
                for config in trainer.lr_scheduler_configs
                if (getattr(config.scheduler, "optimizer", None) or trainer.optimizers[0]) is optimizer
            ]
            changed |= apply_lr_scale(optimizer, schedulers, self.plan.lr_scale)
        return changed

    def _check_loader_batch(self, trainer: pl.Trainer) -> None:
        actual = _loader_batch_size(trainer)
        if actual is not None and actual != self.plan.batch_size and "loader" not in self._warned:
            self._warned.add("loader")
            rank_zero_warn(
                f"DynamicBatchLR set batch_size={self.plan.batch_size} on the {self._holder} but the rebuilt training"
                f" DataLoader has batch_size={actual}: does train_dataloader() read self.batch_size?"
            )

    def _log(self, trainer: pl.Trainer) -> None:
        if not trainer.loggers:
            return
        metrics = {"dynamic/lr_scale": self.plan.lr_scale}
        setting = self.plan.setting
        if setting.batch_size is not None and setting.samples is not None:
            metrics["dynamic/batch_size"] = float(setting.batch_size)
            metrics["dynamic/effective_batch_size"] = float(setting.samples * trainer.world_size)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def _fmt(value: float | None) -> str:
    return "None" if value is None else f"{value:.5g}"


def _describe(reason: str, decision: BatchDecision, world_size: int) -> str:
    """One line for people: what changed and why."""
    if not decision.changed:
        return f"DynamicBatchLR: {reason}; nothing left to change (batch and LR at their limits)"
    a, b = decision.before, decision.after
    parts = [f"DynamicBatchLR: {reason}"]
    if decision.batch_changed:
        parts.append(
            f"batch {a.batch_size}×{a.accumulate} → {b.batch_size}×{b.accumulate} per device (batch × accumulation),"
            f" effective {(a.samples or 0) * world_size} → {(b.samples or 0) * world_size} from the next epoch"
        )
    if decision.lr_changed:
        parts.append(f"lr scale {a.lr_scale:.4g} → {b.lr_scale:.4g}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- Lightning seams
def _find_batch_size_holder(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and isinstance(getattr(datamodule, "batch_size", None), int):
        return "datamodule"
    if lightning_hasattr(pl_module, "batch_size") and isinstance(lightning_getattr(pl_module, "batch_size"), int):
        return "module"
    return None


def _read_batch_size(trainer: pl.Trainer, pl_module: pl.LightningModule, holder: str) -> int:
    if holder == "datamodule":
        return int(trainer.datamodule.batch_size)  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
    # Typed Optional[Any]: the holder was chosen because this is an int (_find_batch_size_holder).
    return int(cast("int", lightning_getattr(pl_module, "batch_size")))


def _write_batch_size(trainer: pl.Trainer, pl_module: pl.LightningModule, holder: str, value: int) -> None:
    if holder == "datamodule":
        trainer.datamodule.batch_size = value  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
    else:
        lightning_setattr(pl_module, "batch_size", value)


def _request_train_dataloader_reload(trainer: pl.Trainer) -> None:
    # FitLoop.setup_data(), called at every epoch start, rebuilds the training DataLoader (calling
    # train_dataloader() again, re-injecting the DistributedSampler, recounting batches) when no
    # loader is cached; Lightning's BatchSizeFinder uses the same seam (tuner/batch_size_scaling.py).
    if not hasattr(trainer.fit_loop, "_combined_loader"):
        raise RuntimeError(
            "DynamicBatchLR cannot ask this Lightning version to rebuild the training DataLoader"
            " (FitLoop._combined_loader is gone); set Trainer(reload_dataloaders_every_n_epochs=1) and report it"
        )
    trainer.fit_loop._combined_loader = None


def _loader_batch_size(trainer: pl.Trainer) -> int | None:
    batch_size = getattr(trainer.train_dataloader, "batch_size", None)
    return batch_size if isinstance(batch_size, int) else None


def _can_accumulate(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    return pl_module.automatic_optimization and not trainer.strategy.handles_gradient_accumulation
