"""DivergenceGuard: :class:`lit_accel.core.divergence.DivergenceDetector` behind Lightning's hooks: skip,
roll back to a :class:`~lit_accel.core.snapshot.Snapshot` with a lower LR, or stop (README, "The callbacks")."""

from __future__ import annotations

import inspect
import logging
import math
import os
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor
from typing_extensions import override

from lit_accel.core.checks import check_name, fmt, require
from lit_accel.core.dist import all_sum, shard_groups, squared_norm_share
from lit_accel.core.divergence import Action, DivergenceDetector, Verdict, back_off, drop_gradients
from lit_accel.core.lr_scaling import scale_learning_rates
from lit_accel.core.snapshot import Snapshot
from lit_accel.core.state_keys import identity_state_key

__all__ = ["DivergenceError", "DivergenceGuard"]

log = logging.getLogger(__name__)

_Pending = tuple[Verdict, int, "float | None", float]  # a verdict to act on, its step, loss and gradient norm


class DivergenceError(RuntimeError):
    """Training diverged beyond what skipping and rolling back could fix (``on_stop="raise"``).

    The message says at which step, why, with which values, where the state was saved and what to
    try; a command-line entry point can print it alone, without a traceback.
    """


def _detector_attr(name: str) -> Any:
    """The detector's attribute ``name``, read and written as the guard's own."""
    return property(lambda self: getattr(self.detector, name), lambda self, value: setattr(self.detector, name, value))


class DivergenceGuard(Callback):
    """Skip bad optimizer steps, roll back when they persist, stop with a diagnosis when that fails.

    Each optimizer step's loss and gradient norm (summed across ranks) go to a
    :class:`~lit_accel.core.divergence.DivergenceDetector`: a bad step is skipped (parameters and
    optimizer state untouched), ``rollback_after`` in a row restore the last host snapshot with
    every learning rate times ``lr_backoff``, and a rollback needed after ``max_rollbacks`` stops.

    Args:
        rollback_after: roll back after this many bad steps in a row (1 = at the first bad step).
        max_rollbacks: stop when one more rollback is needed after this many; ``0`` stops instead of
            the first rollback, ``None`` never stops.
        lr_backoff: multiply every learning rate by this at each rollback, in ``(0, 1]``.
        snapshot_every: take a snapshot every this many good optimizer steps.
        window: number of recent good steps that form the baseline for spike and drift detection.
        warmup: good steps seen before spike detection starts (at most ``window``).
        loss_spike_factor: a loss spike is a loss above this multiple of the baseline median
            (``None`` turns the ratio test off).
        grad_spike_factor: same for the total gradient norm.
        spike_zscore: if set, a spike must also be this many standard deviations above the window
            mean (guards against ratio false alarms when the loss is near zero).
        early_loss_spike_factor: before ``warmup`` good steps, a loss above this multiple of the
            largest good loss so far is a spike (> 1; ``None``: no test before ``warmup``).
        drift_factor: roll back when the median loss of the last ``window`` good steps exceeds the
            best such median of this fit by this factor (> 1); ``None`` turns drift detection off.
        rewarm_steps: after a rollback, optimizer steps over which the learning rate climbs back to
            the lowered rate (0: no climb, the lowered rate at once).
        rewarm_start_factor: where the climb starts, as a fraction of the lowered rate, in (0, 1].
        scaler_patience: GradScaler skips in a row tolerated before they count as bad steps.
        on_stop: ``"raise"`` raises ``DivergenceError``; ``"stop"`` sets ``trainer.should_stop``.
        save_on_stop: write a checkpoint of the state the guard gave up on.
        checkpoint_path: where; ``None`` means ``<trainer.log_dir>/divergence.ckpt``.
        name: tells two instances in one Trainer apart in checkpoints (settings are not part of
            the key: a run resumed with other settings keeps the state).

    Logged keys (every ``log_every_n_steps`` optimizer steps and at every event):
        ``guard/skipped_steps``: updates skipped by the guard so far (cumulative, survives resume).
        ``guard/rollbacks``: rollbacks so far (cumulative, survives resume).
        ``guard/loss_baseline``: median loss of the recent good steps (once there is one).
        ``guard/grad_norm``: total gradient norm of this step (before clipping), across ranks.
        ``guard/lr_factor``: product of all backoffs applied so far.
        ``guard/rewarm_factor``: where the climb after a rollback is (only with ``rewarm_steps``).
        ``guard/drift_ratio``: the recent median loss over the best one (only with ``drift_factor``).
        ``guard/scaler_skips``: steps the GradScaler skipped (only under a GradScaler).

    Raises:
        ValueError: an argument is out of range.
        RuntimeError: the module uses manual optimization.
        DivergenceError: training diverged beyond ``max_rollbacks`` with ``on_stop="raise"``.

    Example::

        trainer:
          callbacks:
            - class_path: lit_accel.callbacks.DivergenceGuard
              init_args: {rollback_after: 3, max_rollbacks: 3, lr_backoff: 0.5, on_stop: raise}
    """

    def __init__(
        self,
        rollback_after: int = 3,
        max_rollbacks: int | None = 3,
        lr_backoff: float = 0.5,
        snapshot_every: int = 100,
        window: int = 50,  # not more: a longer median lags a healthy rise of the norm in an LR warm-up
        warmup: int = 20,
        loss_spike_factor: float | None = 3.0,
        grad_spike_factor: float | None = 10.0,
        spike_zscore: float | None = 4.0,
        early_loss_spike_factor: float | None = None,
        drift_factor: float | None = None,
        rewarm_steps: int = 0,
        rewarm_start_factor: float = 0.1,
        scaler_patience: int = 20,
        on_stop: Literal["raise", "stop"] = "raise",
        save_on_stop: bool = True,
        checkpoint_path: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.detector = DivergenceDetector(
            rollback_after=rollback_after,
            max_rollbacks=max_rollbacks,
            lr_backoff=lr_backoff,
            snapshot_every=snapshot_every,
            window=window,
            warmup=warmup,
            loss_spike_factor=loss_spike_factor,
            grad_spike_factor=grad_spike_factor,
            spike_zscore=spike_zscore,
            early_loss_spike_factor=early_loss_spike_factor,
            drift_factor=drift_factor,
            rewarm_steps=rewarm_steps,
            rewarm_start_factor=rewarm_start_factor,
            scaler_patience=scaler_patience,
        )
        require(isinstance(save_on_stop, bool), "save_on_stop", save_on_stop, "true or false")
        require(on_stop in ("raise", "stop"), "on_stop", on_stop, "'raise' or 'stop'")
        ok = checkpoint_path is None or (isinstance(checkpoint_path, str) and bool(checkpoint_path))
        require(ok, "checkpoint_path", checkpoint_path, "a file path, or None")
        check_name(name)
        self.on_stop = on_stop
        self.save_on_stop = save_on_stop
        self.checkpoint_path = checkpoint_path
        self.name = name
        self._reset_run_state()

    # ------------------------------------------------------------------ state

    @property
    @override
    def state_key(self) -> str:
        return identity_state_key(type(self).__qualname__, name=self.name)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.detector.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The optimizer's and schedulers' saved rates already include the backoff and the climb.
        self.detector.load_state_dict(state_dict)

    def _reset_run_state(self) -> None:
        # One fit only; the spike baseline re-warms after a resume.
        self.detector.reset()
        self._loss_acc: Tensor | None = None
        self._pending: _Pending | None = None
        self._decided = False
        self._stopped = False
        self._held: list[Any] = []
        self._snapshot: Snapshot | None = None
        self._groups: list[tuple[float, list[Tensor]]] = []
        self._last_grad_norm = float("nan")

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a new fit builds a fresh optimizer; a resumed one loads the saved factors after this
            self.detector.reset_learning_rate()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "DivergenceGuard needs automatic optimization: it skips steps from inside the "
                "optimizer step Lightning runs. Remove it or set `automatic_optimization = True`."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset_run_state()
        world = max(trainer.world_size, 1)
        self._groups = shard_groups(pl_module, world, params_sharded=isinstance(trainer.strategy, FSDPStrategy))
        optimizer, schedulers = trainer.optimizers[0], _schedulers(trainer)
        self._snapshot = Snapshot.take(pl_module, optimizer, schedulers, trainer.global_step)
        climb = self.detector.rewarm_factor
        if climb < 1.0:
            # Resumed in the middle of a climb: the restored rates carry its factor, which a
            # rollback or stop to this snapshot would otherwise keep for the rest of the run.
            scale_learning_rates(optimizer, schedulers, 1.0 / climb, floors=False)
            self._snapshot.retake_learning_rates(optimizer, schedulers)
            scale_learning_rates(optimizer, schedulers, climb, floors=False)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._stopped:
            return
        loss = loss.detach().float()
        scaler = _scaler(trainer)
        if scaler is not None:
            # Lightning hands this hook the scaled loss; scale(1) is the current scale, no sync.
            loss = loss / scaler.scale(torch.ones((), device=loss.device))
        self._loss_acc = loss if self._loss_acc is None else self._loss_acc + loss  # accumulated micro-batches

    @torch.no_grad()
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        scaler = _scaler(trainer)
        scaler_owns_step = scaler is not None and _handles_unscaling(optimizer)
        if self._stopped:  # the same on every rank, so no collective is skipped on one rank only
            drop_gradients(optimizer, scaler_owns_step)
            return
        self._decided = True
        loss, grad_norm = self._gather_stats(trainer, optimizer, scaler)
        self._last_grad_norm = grad_norm
        # The parameter norm is a second all-reduce; the detector asks for it only on what is the
        # same on every rank, so every rank joins it.
        verdict = self.detector.check(
            loss, grad_norm, lambda: self._param_norm(trainer), scaler_active=scaler is not None
        )
        if verdict.snapshot_due:  # the parameters here are those after the previous update, verified finite
            self._snapshot = Snapshot.take(
                pl_module, optimizer, _schedulers(trainer), trainer.global_step, reuse=self._snapshot
            )
        if verdict.action in (Action.OK, Action.SCALER_SKIP):
            return
        self._pending = (verdict, trainer.global_step, loss, grad_norm)
        if not verdict.drops_update:
            return  # a drift: the update runs, and the rollback in on_train_batch_end replaces it
        drop_gradients(optimizer, scaler_owns_step)
        self._hold_schedulers(trainer)
        if verdict.action is Action.SKIP and trainer.is_global_zero:
            log.warning(
                "DivergenceGuard: step %d: skipped the update (%s: %s); %d bad step(s) in a row",
                trainer.global_step,
                verdict.reason_text,
                fmt(verdict.value),
                self.detector.bad_streak,
            )

    @torch.no_grad()
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._decided:  # an accumulation micro-batch, or the guard has stopped
            return
        self._decided = False
        self._release_schedulers()
        pending, self._pending = self._pending, None
        if pending is not None and pending[0].action is Action.STOP:
            self._log_metrics(trainer, force=True)
            self._stop(trainer, pl_module, pending, batch_idx)
            return
        if pending is not None and pending[0].action is Action.ROLLBACK:
            self._roll_back(trainer, pl_module, pending)
        elif self.detector.rewarm_factor < 1.0:
            ratio = self.detector.advance_rewarm()
            scale_learning_rates(trainer.optimizers[0], _schedulers(trainer), ratio, floors=False)
        self._log_metrics(trainer, force=pending is not None)

    @torch.no_grad()
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release_schedulers()
        if self._stopped or self._snapshot is None:
            return
        # The last update has not been checked yet: the next step's loss would have shown it.
        if not math.isfinite(self._param_norm(trainer)):
            self._snapshot.restore(pl_module, trainer.optimizers[0], _schedulers(trainer))
            if trainer.is_global_zero:
                log.warning(
                    "DivergenceGuard: step %d: the last update made the parameters non-finite; restored "
                    "the snapshot from step %d",
                    trainer.global_step - 1,
                    self._snapshot.step,
                )

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release_schedulers()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # free the host copy of the model and the references to its tensors
            self._release_schedulers()
            self._snapshot = None
            self._groups = []

    # ------------------------------------------------------------------ numbers and actions

    def _gather_stats(
        self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, scaler: Any
    ) -> tuple[float | None, float]:
        device = trainer.strategy.root_device
        loss, self._loss_acc = self._loss_acc, None
        has_loss = torch.ones((), device=device) if loss is not None else torch.zeros((), device=device)
        loss_sum = loss.to(device) if loss is not None else torch.zeros((), device=device)
        grad_sq = squared_norm_share(self._groups, trainer.world_size, device, grads=True)
        if scaler is not None and _handles_unscaling(optimizer):
            # Fused optimizers unscale inside step(), so the gradients here are still scaled.
            grad_sq = grad_sq / scaler.scale(torch.ones((), device=device)).square()
        # The only host sync of a good step: the decision needs the numbers.
        loss_total, n_loss, grad_total = _all_sum(trainer, torch.stack([loss_sum, has_loss, grad_sq])).tolist()
        return (loss_total / n_loss if n_loss > 0 else None), _sqrt(grad_total)

    def _param_norm(self, trainer: pl.Trainer) -> float:
        """Global parameter norm; a collective: every rank must call it at the same step."""
        share = squared_norm_share(self._groups, trainer.world_size, trainer.strategy.root_device, grads=False)
        return _sqrt(_all_sum(trainer, share.reshape(1)).item())

    def _hold_schedulers(self, trainer: pl.Trainer) -> None:
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if config.interval == "step" and "step" not in vars(scheduler):
                # An instance attribute shadows the method for this one batch; released in
                # on_train_batch_end, before any checkpoint can pickle the scheduler.
                vars(scheduler)["step"] = _no_step
                self._held.append(scheduler)

    def _release_schedulers(self) -> None:
        for scheduler in self._held:
            vars(scheduler).pop("step", None)
        self._held.clear()

    def _roll_back(self, trainer: pl.Trainer, pl_module: pl.LightningModule, pending: _Pending) -> None:
        assert self._snapshot is not None  # taken in on_train_start
        verdict, step, loss, grad_norm = pending
        back_off(self._snapshot, pl_module, trainer.optimizers[0], _schedulers(trainer), self.detector)
        if trainer.is_global_zero:
            detector = self.detector
            log.warning(
                "DivergenceGuard: step %d: %s to the snapshot from step %d "
                "(%s: %s; loss %s, grad norm %s); learning rate x%g, now x%g of the original (rollback %d%s)",
                step,
                "skipped the update and rolled back" if verdict.drops_update else "rolled back",
                self._snapshot.step,
                verdict.reason_text,
                fmt(verdict.value),
                fmt(loss),
                fmt(grad_norm),
                detector.lr_backoff,
                detector.lr_factor,
                detector.rollbacks,
                "" if detector.max_rollbacks is None else f" of {detector.max_rollbacks}",
            )

    def _stop(self, trainer: pl.Trainer, pl_module: pl.LightningModule, pending: _Pending, batch_idx: int) -> None:
        assert self._snapshot is not None
        verdict, step, loss, grad_norm = pending
        path = None
        if self.save_on_stop:
            path = self.checkpoint_path or os.path.join(trainer.log_dir or trainer.default_root_dir, "divergence.ckpt")
            # A collective under DDP/FSDP: every rank gets here together (the decision was all-reduced).
            trainer.save_checkpoint(path, weights_only=False)
        self._snapshot.restore(pl_module, trainer.optimizers[0], _schedulers(trainer))
        self.detector.stopped()
        self._stopped = True
        d = self.detector
        saved = f"The state it gave up on is saved in {path}; " if path else ""
        message = (
            f"DivergenceGuard stopped training at step {step} (epoch {trainer.current_epoch}, batch {batch_idx}): "
            f"{verdict.reason_text}: {fmt(verdict.value)} (loss {fmt(loss)}, grad norm {fmt(grad_norm)}), after "
            f"{d.rollbacks} rollback(s) that cut the learning rate to x{d.lr_factor:g} of the original and "
            f"{d.skipped_steps} skipped step(s). {saved}the model was put back to the last good snapshot "
            f"(step {self._snapshot.step}). What to try: a lower learning rate or a longer warm-up; gradient "
            "clipping (Trainer gradient_clip_val=1.0); bf16-mixed instead of 16-mixed; checking the data of "
            "that batch; a larger lr_backoff cut or more max_rollbacks if it was recovering."
        )
        if trainer.is_global_zero:
            log.error(message)
        if self.on_stop == "raise":
            raise DivergenceError(message)
        trainer.should_stop = True

    def _log_metrics(self, trainer: pl.Trainer, force: bool) -> None:
        step = trainer.global_step  # already counts this step
        if not trainer.loggers or not (force or step % max(trainer.log_every_n_steps, 1) == 0):  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
            return
        d = self.detector
        metrics = {
            "guard/skipped_steps": float(d.skipped_steps),
            "guard/rollbacks": float(d.rollbacks),
            "guard/grad_norm": self._last_grad_norm,
            "guard/lr_factor": d.lr_factor,
        }
        if d.loss_baseline is not None:
            metrics["guard/loss_baseline"] = d.loss_baseline
        if d.rewarm_steps > 0:
            metrics["guard/rewarm_factor"] = d.rewarm_factor
        if d.drift_factor is not None and math.isfinite(d.drift_ratio):
            metrics["guard/drift_ratio"] = d.drift_ratio
        if _scaler(trainer) is not None:
            metrics["guard/scaler_skips"] = float(d.scaler_skips)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step - 1)


# The detector's settings and progress (skipped_steps, rollbacks, lr_factor, ...) read as the guard's.
for _name in (*inspect.signature(DivergenceDetector).parameters, *DivergenceDetector().state_dict()):
    setattr(DivergenceGuard, _name, _detector_attr(_name))


def _all_sum(trainer: pl.Trainer, vec: Tensor) -> Tensor:
    if trainer.world_size <= 1:
        return vec
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return all_sum(vec)
    return trainer.strategy.reduce(vec, reduce_op="sum")


def _sqrt(x: float) -> float:
    return math.sqrt(x) if x >= 0 else float("nan")


def _scaler(trainer: pl.Trainer) -> Any:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _handles_unscaling(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def _schedulers(trainer: pl.Trainer) -> list[Any]:
    return [config.scheduler for config in trainer.lr_scheduler_configs]


def _no_step(*args: Any, **kwargs: Any) -> None:
    return None
