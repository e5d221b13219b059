"""DivergenceGuard: catch NaN/Inf and loss or gradient spikes at every optimizer step, skip the bad
update, roll back with a lower learning rate when it persists, and stop cleanly when that fails too.

Imports only ``lightning``, ``torch``, the standard library, ``typing_extensions`` (for
``@override``; torch and lightning require it) and the private
``lit_accel/core`` (torch and the standard library only), so it can be copied with that package into
another project.

Cost per good step: one fused gradient norm, one all-reduce of three numbers and one
device-to-host read (a parameter norm only on bad steps and before snapshots); a snapshot is a host
copy of parameters, buffers and optimizer state. Measured figures: BENCHMARKS.md, "Callback costs".
"""

from __future__ import annotations

import copy
import logging
import math
import os
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from itertools import chain
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor
from typing_extensions import override

from lit_accel.core.checks import check_int, check_name, fmt, is_number
from lit_accel.core.dist import local_tensor
from lit_accel.core.lr_scaling import scale_learning_rates
from lit_accel.core.state_keys import adopt_older_state, identity_state_key

__all__ = ["DivergenceError", "DivergenceGuard"]

log = logging.getLogger(__name__)

# Param-group keys and scheduler attributes that hold a learning rate (or a point of the LR schedule,
# e.g. OneCycleLR's ``max_lr``/``min_lr``, CyclicLR's ``max_lrs``). Floors chosen by the user
# (CosineAnnealingLR ``eta_min``, ReduceLROnPlateau ``min_lrs``) are left alone.


class DivergenceError(RuntimeError):
    """Training diverged beyond what skipping and rolling back could fix (``on_stop="raise"``).

    The message says at which step, why, with which values, where the state was saved and what to
    try; a command-line entry point can print it alone, without a traceback.
    """


class DivergenceGuard(Callback):
    """Skip bad optimizer steps, roll back when they persist, stop with a diagnosis when that fails.

    At every optimizer step (automatic optimization) the guard looks at the loss (from
    ``on_before_backward``, summed over accumulated micro-batches) and the total gradient norm (in
    ``on_before_optimizer_step``, before clipping and before the update), agrees on them across
    ranks with one all-reduce, and classifies the step. The parameter norm is checked only when
    it matters: on a step that is already bad (non-finite weights make the loss or the gradients
    non-finite, so a broken update shows up there first), before every snapshot (a snapshot of
    broken weights would be a useless rollback target) and at the end of training:

    * **non-finite parameters** (the previous update broke the model): roll back at once;
    * **non-finite loss** or **non-finite gradient norm**: a bad step;
    * **loss spike** / **gradient-norm spike**: after ``warmup`` good steps, the value exceeds the
      median of the last ``window`` good steps by ``*_spike_factor`` (``value > median +
      (factor - 1)·|median|``) *and*, if ``spike_zscore`` is set, lies more than ``spike_zscore``
      standard deviations above their mean. Set a factor and ``spike_zscore`` to ``None`` to turn
      spike detection off for that signal;
    * **early loss spike** (``early_loss_spike_factor``): before ``warmup`` good steps, a loss above
      that multiple of the *largest* good loss so far. A learning rate far too high does its damage
      in the first few updates (measured: with the recipe's LR 40x too high, the loss went 2.3, 10,
      15, 17, then the network was dead at 2.30 for good), before a baseline for the tests above
      exists; a fresh classifier's first loss is a safe yardstick for that;
    * **slow divergence** (``drift_factor``): the median loss of the last ``window`` good steps
      exceeds the lowest such median seen in this fit by ``drift_factor`` (``median > best +
      (factor - 1)·|best|``): a loss that creeps up over hundreds of steps without a single spike
      (a learning rate too high to train well, not high enough to blow up). It rolls back at once,
      like non-finite parameters. While the median is above half that margin, no snapshot is taken,
      so the rollback lands before the drift began.

    It then acts, escalating:

    1. **skip**: the update is not applied. The gradients are set to ``None`` before
       ``optimizer.step()``, which every ``torch.optim`` optimizer treats as "no update and no state
       change for this parameter" (zeroed gradients would still move Adam and momentum). Parameters
       and optimizer state stay bit-for-bit the same.
    2. **roll back** after ``rollback_after`` bad steps in a row: parameters, buffers, optimizer
       state and LR-scheduler state are restored from the last good snapshot, then every learning
       rate is multiplied by ``lr_backoff``. Snapshots are taken every ``snapshot_every`` good steps
       (and at the start of training) into host memory: a copy of the parameters, buffers and
       optimizer state (about 3× the model size for Adam), every param-group entry and the
       schedulers' states. Under FSDP/FSDP2 each rank copies its own local shards. The backoff is
       written into the optimizer's param groups (``lr``, ``initial_lr``, ``max_lr``, ``min_lr``)
       and the schedulers' ``base_lrs``/``max_lrs``, so it persists through later scheduler steps
       and checkpoints, and into the snapshot's copy of them, so backoffs compound: a second
       rollback to the same snapshot leaves ``lr_backoff²`` of the learning rate. With
       ``rewarm_steps`` the learning rate then climbs back linearly from ``rewarm_start_factor``
       of the lowered rate to the lowered rate over that many optimizer steps (the same scaling,
       step by step, so any scheduler keeps following it), instead of resuming at full speed from
       the state that just went wrong. No snapshot is taken during the climb.
    3. **stop** when another rollback is needed after ``max_rollbacks`` of them: the current state
       is saved to ``checkpoint_path`` (default ``<trainer.log_dir>/divergence.ckpt``) for
       inspection, the model is put back to the last good snapshot, a message names the step, the
       reason, the values and what to try, and then either a ``DivergenceError`` is raised
       (``on_stop="raise"``) or ``trainer.should_stop`` is set (``on_stop="stop"``).

    Param groups are restored exactly: every entry except ``params`` gets the snapshot's value and
    entries the snapshot does not have are removed. Other callbacks that change learning rates on
    top of a schedule can rely on this protocol (no import needed): keep what they applied in an
    entry of each param group (``DynamicBatchLR`` keeps ``dynamic_lr_scale``), and after a
    rollback that entry again matches the restored learning rates; the guard's backoff stays on
    top as a plain factor.

    Distributed: the loss and gradient norm are summed across ranks in one all-reduce per step
    (the parameter norm, when it is checked, in a second one that every rank runs at the same
    step), so every rank sees the same numbers, takes the same decision and keeps the same
    snapshots; a NaN on one rank makes all ranks skip together and replicas stay identical.
    Sharded tensors (DTensor, FSDP) count each shard once.

    Mixed precision: under a GradScaler (``16-mixed``) a step with non-finite gradients is the
    scaler's business: it skips it and lowers the scale, and the guard counts a *scaler skip*
    (``guard/scaler_skips``) instead of a bad step, unless more than ``scaler_patience`` happen in a
    row. Under ``bf16-mixed`` (no scaler) the guard does the skipping itself.

    LR schedulers: on a step the guard skips, ``interval="step"`` schedulers are held (their
    ``step()`` is a no-op for that batch), so the schedule does not advance. Epoch-interval and
    ReduceLROnPlateau schedulers are not held, and on scaler skips schedulers advance as in plain
    PyTorch. ``trainer.global_step`` counts ``optimizer.step()`` calls, skipped ones included, so
    ``max_steps`` includes skipped steps.

    Cost: one all-reduce of three floats and one device-to-host read (a single sync) per good
    step, one fused norm (gradients), and every ``snapshot_every`` good steps a parameter norm (one
    more all-reduce and sync) and a host copy of the state. Bad steps also pay for a parameter
    norm.

    Limits: automatic optimization only (one optimizer); not for optimizers that re-evaluate the
    closure (LBFGS). State is restored in place, so it works with DDP, FSDP2 (ModelParallelStrategy)
    and FSDP; pipeline parallelism is not supported.

    One instance used for several ``fit`` calls keeps counting ``skipped_steps`` and ``rollbacks``
    (as Lightning's ``EarlyStopping`` keeps its counters), so ``max_rollbacks`` spans them; a new
    fit's fresh optimizer starts at ``lr_factor`` 1. Give a run that should start over a new instance.

    Args:
        rollback_after: roll back after this many bad steps in a row (1 = at the first bad step).
        max_rollbacks: stop when one more rollback is needed after this many; ``0`` stops instead of
            the first rollback, ``None`` never stops.
        lr_backoff: multiply every learning rate by this at each rollback, in ``(0, 1]``.
        snapshot_every: take a snapshot every this many good optimizer steps.
        window: number of recent good steps that form the baseline for spike detection; a shorter
            window follows a trend (gradient norms rising with the LR warm-up) more closely.
        warmup: good steps seen before spike detection starts (at most ``window``).
        loss_spike_factor: a loss spike is a loss above this multiple of the baseline median
            (``None`` turns the ratio test off).
        grad_spike_factor: same for the total gradient norm.
        spike_zscore: if set, a spike must also be this many standard deviations above the window
            mean (guards against ratio false alarms when the loss is near zero).
        early_loss_spike_factor: before ``warmup`` good steps, a loss above this multiple of the
            largest good loss so far is a spike (> 1; ``None``, the default: no test before
            ``warmup``). Off by default because some models' first losses swing widely (Lightning's
            ``BoringModel`` under plain SGD: 0.55 to 4.3 within 5 steps); a classifier trained with
            cross-entropy from scratch starts near ln(classes), which makes 4 a safe value there.
        drift_factor: roll back when the median loss of the last ``window`` good steps exceeds the
            best such median of this fit by this factor (> 1); ``None`` turns drift detection off.
        rewarm_steps: after a rollback, optimizer steps over which the learning rate climbs back to
            the lowered rate (0: no climb, the lowered rate at once).
        rewarm_start_factor: where the climb starts, as a fraction of the lowered rate, in (0, 1].
        scaler_patience: GradScaler skips in a row tolerated before they count as bad steps.
        on_stop: ``"raise"`` raises ``DivergenceError``; ``"stop"`` sets ``trainer.should_stop``.
        save_on_stop: write a checkpoint of the state the guard gave up on.
        checkpoint_path: where; ``None`` means ``<trainer.log_dir>/divergence.ckpt``.
        name: tells two instances in one Trainer apart in checkpoints (``None``: the class name
            alone). Settings are not part of the key, so a run resumed with other settings keeps
            this callback's state; state saved under an older key that listed settings is adopted.

    Logged keys (to ``trainer.loggers`` every ``log_every_n_steps`` optimizer steps and at every
    event; step = the optimizer step index, as Lightning logs):
        ``guard/skipped_steps``: updates skipped by the guard so far (cumulative, survives resume).
        ``guard/rollbacks``: rollbacks so far (cumulative, survives resume).
        ``guard/loss_baseline``: median loss of the recent good steps (once there is one).
        ``guard/grad_norm``: total gradient norm of this step (before clipping), across ranks.
        ``guard/lr_factor``: product of all backoffs applied so far.
        ``guard/rewarm_factor``: where the climb after a rollback is, 1 when there is none (only
            with ``rewarm_steps`` > 0).
        ``guard/drift_ratio``: the recent median loss over the best one (only with
            ``drift_factor``, once ``window`` good steps were seen).
        ``guard/scaler_skips``: steps the GradScaler skipped (only under a GradScaler).

    Each skip and rollback is one ``logging`` warning, and a stop one error, on rank zero, naming
    the step, the reason and the value. Scaler skips are routine under fp16 and are only counted.

    Raises:
        ValueError: an argument is out of range.
        RuntimeError: the module uses manual optimization.
        DivergenceError: (a ``RuntimeError``) training diverged beyond ``max_rollbacks`` with
            ``on_stop="raise"``; its message is the diagnosis (step, reason, values, what to try).

    Example::

        trainer:
          callbacks:
            - class_path: lit_accel.callbacks.DivergenceGuard
              init_args:
                rollback_after: 3
                max_rollbacks: 3
                lr_backoff: 0.5
                on_stop: raise
    """

    def __init__(
        self,
        rollback_after: int = 3,
        max_rollbacks: int | None = 3,
        lr_backoff: float = 0.5,
        snapshot_every: int = 100,
        # 50, not more: a median over the last 100 steps lagged a healthy 12x climb of the gradient
        # norm during OneCycle warm-up (SeedCNN) and flagged it; over 50 it did not.
        window: int = 50,
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
        check_int("rollback_after", rollback_after, 1)
        if max_rollbacks is not None:
            check_int("max_rollbacks", max_rollbacks, 0, "or None (never stop)")
        if not (is_number(lr_backoff) and 0.0 < lr_backoff <= 1.0):
            raise ValueError(f"lr_backoff={lr_backoff!r} is not allowed: use a number in (0, 1]")
        check_int("snapshot_every", snapshot_every, 1)
        check_int("window", window, 2)
        check_int("warmup", warmup, 2)
        if warmup > window:
            raise ValueError(f"warmup={warmup!r} is not allowed: use at most window={window}")
        factors = (
            ("loss_spike_factor", loss_spike_factor),
            ("grad_spike_factor", grad_spike_factor),
            ("early_loss_spike_factor", early_loss_spike_factor),
        )
        for arg, value in factors:
            if value is not None and not (is_number(value) and value > 1.0):
                raise ValueError(f"{arg}={value!r} is not allowed: use a number > 1, or None to turn it off")
        if spike_zscore is not None and not (is_number(spike_zscore) and spike_zscore > 0):
            raise ValueError(f"spike_zscore={spike_zscore!r} is not allowed: use a number > 0, or None")
        if drift_factor is not None and not (is_number(drift_factor) and drift_factor > 1.0):
            raise ValueError(f"drift_factor={drift_factor!r} is not allowed: use a number > 1, or None to turn it off")
        check_int("rewarm_steps", rewarm_steps, 0)
        if not (is_number(rewarm_start_factor) and 0.0 < rewarm_start_factor <= 1.0):
            raise ValueError(f"rewarm_start_factor={rewarm_start_factor!r} is not allowed: use a number in (0, 1]")
        check_int("scaler_patience", scaler_patience, 0)
        if not isinstance(save_on_stop, bool):
            raise ValueError(f"save_on_stop={save_on_stop!r} is not allowed: use true or false")
        if on_stop not in ("raise", "stop"):
            raise ValueError(f"on_stop={on_stop!r} is not allowed: use 'raise' or 'stop'")
        if checkpoint_path is not None and not (isinstance(checkpoint_path, str) and checkpoint_path):
            raise ValueError(f"checkpoint_path={checkpoint_path!r} is not allowed: use a file path, or None")
        check_name(name)

        self.rollback_after = rollback_after
        self.max_rollbacks = max_rollbacks
        self.lr_backoff = float(lr_backoff)
        self.snapshot_every = snapshot_every
        self.window = window
        self.warmup = warmup
        self.loss_spike_factor = loss_spike_factor
        self.grad_spike_factor = grad_spike_factor
        self.spike_zscore = spike_zscore
        self.early_loss_spike_factor = early_loss_spike_factor
        self.drift_factor = None if drift_factor is None else float(drift_factor)
        self.rewarm_steps = rewarm_steps
        self.rewarm_start_factor = float(rewarm_start_factor)
        self.scaler_patience = scaler_patience
        self.on_stop = on_stop
        self.save_on_stop = save_on_stop
        self.checkpoint_path = checkpoint_path
        self.name = name

        # Progress (saved in checkpoints).
        self.skipped_steps = 0
        self.rollbacks = 0
        self.scaler_skips = 0
        self.lr_factor = 1.0
        # The climb after a rollback: steps done, and the factor now applied on top of lr_factor.
        self.rewarm_done = 0
        self.rewarm_factor = 1.0
        self._reset_run_state()

    # ------------------------------------------------------------------ state

    @property
    @override
    def state_key(self) -> str:
        return identity_state_key(type(self).__qualname__, name=self.name)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        adopt_older_state(checkpoint, self.state_key, type(self).__qualname__, name=self.name)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": self.skipped_steps,
            "rollbacks": self.rollbacks,
            "scaler_skips": self.scaler_skips,
            "lr_factor": self.lr_factor,
            "rewarm_done": self.rewarm_done,
            "rewarm_factor": self.rewarm_factor,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.rollbacks = int(state_dict.get("rollbacks", 0))
        self.scaler_skips = int(state_dict.get("scaler_skips", 0))
        self.lr_factor = float(state_dict.get("lr_factor", 1.0))
        # The optimizer's and schedulers' saved rates already include the climb's factor.
        self.rewarm_done = int(state_dict.get("rewarm_done", 0))
        self.rewarm_factor = float(state_dict.get("rewarm_factor", 1.0))

    def _reset_run_state(self) -> None:
        # Everything below lives for one fit; the spike baseline re-warms after a resume.
        self._loss_hist: deque[float] = deque(maxlen=self.window)
        self._grad_hist: deque[float] = deque(maxlen=self.window)
        self._bad_streak = 0
        self._scaler_streak = 0
        self._good_since_snapshot = 0
        self._loss_acc: Tensor | None = None
        self._pending: _Verdict | None = None
        self._decided = False
        self._stopped = False
        self._held: list[Any] = []
        self._snapshot: _Snapshot | None = None
        self._groups: list[tuple[float, list[Tensor]]] = []
        self._last_grad_norm = float("nan")
        self._best_median = math.inf
        self._drift_ratio = float("nan")

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            # These describe the optimizer's rates, and a new fit builds fresh ones; a resumed fit
            # loads the saved values after this hook.
            self.lr_factor = 1.0
            self.rewarm_done, self.rewarm_factor = 0, 1.0

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
        self._groups = _group_by_sharing(pl_module, trainer)
        optimizer, schedulers = trainer.optimizers[0], _schedulers(trainer)
        self._snapshot = _Snapshot.take(pl_module, optimizer, schedulers, trainer.global_step)
        if self.rewarm_factor < 1.0:
            # Resumed in the middle of a climb: the restored rates carry its factor, which a
            # rollback or stop to this snapshot would otherwise keep for the rest of the run.
            scale_learning_rates(optimizer, schedulers, 1.0 / self.rewarm_factor, floors=False)
            self._snapshot.retake_learning_rates(optimizer, schedulers)
            scale_learning_rates(optimizer, schedulers, self.rewarm_factor, floors=False)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._stopped:
            return
        loss = loss.detach().float()
        scaler = _scaler(trainer)
        if scaler is not None:
            # Lightning hands this hook the scaled loss; scale(1) is the current scale, no sync.
            loss = loss / scaler.scale(torch.ones((), device=loss.device))
        self._loss_acc = loss if self._loss_acc is None else self._loss_acc + loss

    @torch.no_grad()
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        scaler = _scaler(trainer)
        scaler_owns_step = scaler is not None and _handles_unscaling(optimizer)
        if self._stopped:  # the same on every rank, so no collective is skipped on one rank only
            _drop_gradients(optimizer, scaler_owns_step)
            return
        self._decided = True
        loss, grad_norm = self._gather_stats(trainer, optimizer, scaler)
        self._last_grad_norm = grad_norm
        verdict = self._verdict(loss, grad_norm, None, scaler)
        if _needs_param_check(verdict.kind, self._good_since_snapshot, self.snapshot_every):
            # Decided from all-reduced numbers and counters that are the same on every rank, so
            # every rank joins this second all-reduce.
            verdict = self._verdict(loss, grad_norm, self._param_norm(trainer), scaler)
        action, self._bad_streak, self._scaler_streak = _escalate(
            verdict.kind,
            self._bad_streak,
            self._scaler_streak,
            self.rollbacks,
            rollback_after=self.rollback_after,
            max_rollbacks=self.max_rollbacks,
            scaler_patience=self.scaler_patience,
        )
        if action is _Action.OK:
            drift = self._accept(trainer, pl_module, optimizer, loss, grad_norm)
            if drift is not None:
                # The update runs; the rollback in on_train_batch_end replaces it with the snapshot.
                action, self._bad_streak, self._scaler_streak = _escalate(
                    drift.kind,
                    0,
                    0,
                    self.rollbacks,
                    rollback_after=self.rollback_after,
                    max_rollbacks=self.max_rollbacks,
                    scaler_patience=self.scaler_patience,
                )
                self._pending = drift._replace(action=action, step=trainer.global_step, loss=loss, grad_norm=grad_norm)
        elif action is _Action.SCALER_SKIP:
            self.scaler_skips += 1
        else:
            verdict = verdict._replace(action=action, step=trainer.global_step, loss=loss, grad_norm=grad_norm)
            self._skip(trainer, optimizer, verdict, scaler_owns_step)

    def _verdict(self, loss: float | None, grad_norm: float, param_norm: float | None, scaler: Any) -> _Verdict:
        return _classify(
            loss,
            grad_norm,
            param_norm,
            scaler_active=scaler is not None,
            loss_hist=self._loss_hist,
            grad_hist=self._grad_hist,
            warmup=self.warmup,
            early_loss_factor=self.early_loss_spike_factor,
            loss_factor=self.loss_spike_factor,
            grad_factor=self.grad_spike_factor,
            zscore=self.spike_zscore,
        )

    def _accept(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        loss: float | None,
        grad_norm: float,
    ) -> _Verdict | None:
        """Record a good step and take a snapshot when one is due; a drift verdict if the loss crept up."""
        healthy = True
        if loss is not None:  # no loss means training_step returned None: nothing to learn from
            self._loss_hist.append(loss)
            self._grad_hist.append(grad_norm)
            if self.drift_factor is not None and len(self._loss_hist) == self.window:
                median = statistics.median(self._loss_hist)
                self._best_median = min(self._best_median, median)
                self._drift_ratio = median / self._best_median if self._best_median > 0 else float("nan")
                if _drifted(median, self._best_median, self.drift_factor):
                    return _Verdict(
                        _Kind.DRIFT,
                        f"slow divergence: median loss of the last {self.window} steps over the best "
                        f"median of this fit, {fmt(self._best_median)}",
                        median,
                    )
                healthy = not _drifted(median, self._best_median, 1.0 + (self.drift_factor - 1.0) / 2)
            elif self.drift_factor is not None and math.isfinite(self._best_median):
                healthy = False  # after a drift rollback: not before a full window shows the loss is back
        self._good_since_snapshot += 1
        # No snapshot while the learning rate climbs back after a rollback or the loss drifts up:
        # a rollback should land on a state that trained well at the rate it will run at.
        if self._good_since_snapshot >= self.snapshot_every and healthy and self.rewarm_factor >= 1.0:
            # The parameters here are those after the previous update, verified finite by
            # _needs_param_check/_classify just before.
            self._snapshot = _Snapshot.take(
                pl_module, optimizer, _schedulers(trainer), trainer.global_step, reuse=self._snapshot
            )
            self._good_since_snapshot = 0
        return None

    def _skip(
        self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, verdict: _Verdict, scaler_owns_step: bool
    ) -> None:
        """Make this step's update a no-op; a rollback or stop follows in on_train_batch_end."""
        if verdict.kind is _Kind.SCALER:
            verdict = verdict._replace(
                reason=f"GradScaler skipped {self._scaler_streak} steps in a row (non-finite gradients)"
            )
        _drop_gradients(optimizer, scaler_owns_step)
        self._hold_schedulers(trainer)
        self.skipped_steps += 1
        self._pending = verdict
        step, action = verdict.step, verdict.action
        if action is _Action.SKIP and trainer.is_global_zero:
            log.warning(
                "DivergenceGuard: step %d: skipped the update (%s: %s); %d bad step(s) in a row",
                step,
                verdict.reason,
                fmt(verdict.value),
                self._bad_streak,
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
        if pending is not None and pending.action is _Action.STOP:
            self._log_metrics(trainer, force=True)
            self._stop(trainer, pl_module, pending, batch_idx)
            return
        if pending is not None and pending.action is _Action.ROLLBACK:
            self._roll_back(trainer, pl_module, pending)
        elif self.rewarm_factor < 1.0:
            self._advance_rewarm(trainer)
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

    # ------------------------------------------------------------------ actions

    def _gather_stats(
        self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, scaler: Any
    ) -> tuple[float | None, float]:
        device = trainer.strategy.root_device
        loss, self._loss_acc = self._loss_acc, None
        has_loss = torch.ones((), device=device) if loss is not None else torch.zeros((), device=device)
        loss_sum = loss.to(device) if loss is not None else torch.zeros((), device=device)
        grad_sq = self._sq_norm(trainer, params=False, device=device)
        if scaler is not None and _handles_unscaling(optimizer):
            # Fused optimizers unscale inside step(), so the gradients here are still scaled.
            grad_sq = grad_sq / scaler.scale(torch.ones((), device=device)).square()
        vec = torch.stack([loss_sum, has_loss, grad_sq])
        # The only host sync of a good step: the decision needs the numbers.
        loss_total, n_loss, grad_total = _all_sum(trainer, vec).tolist()
        mean_loss = loss_total / n_loss if n_loss > 0 else None
        return mean_loss, _sqrt(grad_total)

    def _param_norm(self, trainer: pl.Trainer) -> float:
        """Global parameter norm; a collective: every rank must call it at the same step."""
        device = trainer.strategy.root_device
        return _sqrt(_all_sum(trainer, self._sq_norm(trainer, params=True, device=device).reshape(1)).item())

    def _sq_norm(self, trainer: pl.Trainer, params: bool, device: torch.device) -> Tensor:
        """This rank's share of the global squared norm of the parameters (or gradients)."""
        world = max(trainer.world_size, 1)
        total = torch.zeros((), device=device)
        for share, tensors in self._groups:
            if params:
                local = [local_tensor(t) for t in tensors if t.is_floating_point()]
            else:
                local = [local_tensor(t.grad) for t in tensors if t.grad is not None]
            if local:
                total = total + _total_norm(local).float().to(device).square() * (share / world)
        return total

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

    def _roll_back(self, trainer: pl.Trainer, pl_module: pl.LightningModule, verdict: _Verdict) -> None:
        assert self._snapshot is not None  # taken in on_train_start
        optimizer = trainer.optimizers[0]
        schedulers = _schedulers(trainer)
        self._snapshot.restore(pl_module, optimizer, schedulers)
        scale_learning_rates(optimizer, schedulers, self.lr_backoff, floors=False)
        # The snapshot keeps the lowered rates, so the next rollback to it lowers them further
        # instead of going back to the rates it was taken with.
        self._snapshot.retake_learning_rates(optimizer, schedulers)
        self.lr_factor *= self.lr_backoff
        self.rollbacks += 1
        self._good_since_snapshot = 0
        self.rewarm_done, self.rewarm_factor = 0, 1.0
        if self.rewarm_steps > 0:
            self.rewarm_factor = self.rewarm_start_factor
            scale_learning_rates(optimizer, schedulers, self.rewarm_factor, floors=False)
        if verdict.kind is _Kind.DRIFT:
            # The recent losses were the drift's; the next window is the restored state's.
            self._loss_hist.clear()
            self._grad_hist.clear()
        if trainer.is_global_zero:
            log.warning(
                "DivergenceGuard: step %d: %s to the snapshot from step %d "
                "(%s: %s; loss %s, grad norm %s); learning rate x%g, now x%g of the original (rollback %d%s)",
                verdict.step,
                "rolled back" if verdict.kind is _Kind.DRIFT else "skipped the update and rolled back",
                self._snapshot.step,
                verdict.reason,
                fmt(verdict.value),
                fmt(verdict.loss),
                fmt(verdict.grad_norm),
                self.lr_backoff,
                self.lr_factor,
                self.rollbacks,
                "" if self.max_rollbacks is None else f" of {self.max_rollbacks}",
            )

    def _advance_rewarm(self, trainer: pl.Trainer) -> None:
        """One step of the climb back after a rollback, through the same scaling as the backoff."""
        self.rewarm_done += 1
        target = _rewarm_factor(self.rewarm_done, self.rewarm_steps, self.rewarm_start_factor)
        scale_learning_rates(trainer.optimizers[0], _schedulers(trainer), target / self.rewarm_factor, floors=False)
        self.rewarm_factor = target

    def _stop(self, trainer: pl.Trainer, pl_module: pl.LightningModule, verdict: _Verdict, batch_idx: int) -> None:
        assert self._snapshot is not None
        path = None
        if self.save_on_stop:
            path = self.checkpoint_path or os.path.join(trainer.log_dir or trainer.default_root_dir, "divergence.ckpt")
            # A collective under DDP/FSDP: every rank gets here together (the decision was all-reduced).
            trainer.save_checkpoint(path, weights_only=False)
        self._snapshot.restore(pl_module, trainer.optimizers[0], _schedulers(trainer))
        self.rewarm_done, self.rewarm_factor = 0, 1.0  # the snapshot's rates carry no climb
        self._stopped = True
        message = _stop_message(self, verdict, trainer.current_epoch, batch_idx, path, self._snapshot.step)
        if trainer.is_global_zero:
            log.error(message)
        if self.on_stop == "raise":
            raise DivergenceError(message)
        trainer.should_stop = True

    def _log_metrics(self, trainer: pl.Trainer, force: bool) -> None:
        step = trainer.global_step  # already counts this step
        if not trainer.loggers or not (force or step % max(trainer.log_every_n_steps, 1) == 0):  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
            return
        metrics = {
            "guard/skipped_steps": float(self.skipped_steps),
            "guard/rollbacks": float(self.rollbacks),
            "guard/grad_norm": self._last_grad_norm,
            "guard/lr_factor": self.lr_factor,
        }
        if self._loss_hist:
            metrics["guard/loss_baseline"] = statistics.median(self._loss_hist)
        if self.rewarm_steps > 0:
            metrics["guard/rewarm_factor"] = self.rewarm_factor
        if self.drift_factor is not None and math.isfinite(self._drift_ratio):
            metrics["guard/drift_ratio"] = self._drift_ratio
        if _scaler(trainer) is not None:
            metrics["guard/scaler_skips"] = float(self.scaler_skips)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step - 1)


# ---------------------------------------------------------------------- decisions (pure)


class _Kind(str, Enum):
    """What a step's numbers say (str values, so they read and compare as the plain words)."""

    OK = "ok"
    SCALER = "scaler"  # non-finite gradients under a GradScaler, which skips the step itself
    BAD = "bad"  # non-finite loss or gradient norm, or a spike
    BROKEN = "broken"  # non-finite parameters: no later step can recover, roll back at once
    DRIFT = "drift"  # the loss crept up over a window: roll back at once


class _Action(str, Enum):
    """What the guard does about a verdict (see ``_escalate``)."""

    OK = "ok"
    SCALER_SKIP = "scaler_skip"
    SKIP = "skip"
    ROLLBACK = "rollback"
    STOP = "stop"


class _Verdict(NamedTuple):
    """One step's verdict, an immutable record: its kind, why, the offending value, and once
    decided the action, step and the step's loss and gradient norm for the messages."""

    kind: _Kind
    reason: str = ""
    value: float = 0.0
    action: _Action | None = None
    step: int = -1
    loss: float | None = None
    grad_norm: float = float("nan")


def _is_spike(value: float, history: Sequence[float], factor: float | None, zscore: float | None, warmup: int) -> bool:
    """Whether ``value`` exceeds every enabled test against the recent good values."""
    if len(history) < warmup or (factor is None and zscore is None):
        return False
    if factor is not None:
        base = statistics.median(history)
        if not value > base + (factor - 1.0) * abs(base):
            return False
    if zscore is not None:
        n = len(history)
        mean = math.fsum(history) / n
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in history) / n)
        if not (value - mean > zscore * std if std > 0 else value > mean):
            return False
    return True


def _drifted(median: float, best: float, factor: float) -> bool:
    """Whether the recent median loss exceeds the best one by ``factor`` (``> best + (factor - 1)·|best|``)."""
    return median > best + (factor - 1.0) * abs(best)


def _rewarm_factor(done: int, steps: int, start: float) -> float:
    """The learning-rate factor ``done`` steps into a linear climb from ``start`` to 1 over ``steps``."""
    return 1.0 if done >= steps else start + (1.0 - start) * done / steps


def _needs_param_check(kind: _Kind, good_since_snapshot: int, snapshot_every: int) -> bool:
    """Whether to measure the parameter norm: on a step that is not plainly good, or before a snapshot.

    ``kind`` is the verdict without the parameter norm. Non-finite weights used in the forward make
    the loss and gradients non-finite, so a good step needs no check unless a snapshot follows.
    """
    return kind is not _Kind.OK or good_since_snapshot + 1 >= snapshot_every


def _classify(
    loss: float | None,
    grad_norm: float,
    param_norm: float | None,
    *,
    scaler_active: bool,
    loss_hist: Sequence[float],
    grad_hist: Sequence[float],
    warmup: int,
    loss_factor: float | None,
    grad_factor: float | None,
    zscore: float | None,
    early_loss_factor: float | None = None,
) -> _Verdict:
    """What is wrong with this step, if anything (numbers in, verdict out); ``param_norm`` None: not measured."""
    if param_norm is not None and not math.isfinite(param_norm):
        return _Verdict(_Kind.BROKEN, "non-finite parameters after the previous update", param_norm)
    if scaler_active and not math.isfinite(grad_norm):
        return _Verdict(_Kind.SCALER, "non-finite gradients (GradScaler skips the step)", grad_norm)
    if loss is not None and not math.isfinite(loss):
        return _Verdict(_Kind.BAD, "non-finite loss", loss)
    if not math.isfinite(grad_norm):
        return _Verdict(_Kind.BAD, "non-finite gradient norm", grad_norm)
    if loss is not None and early_loss_factor is not None and 0 < len(loss_hist) < warmup:
        largest = max(loss_hist)
        if loss > largest + (early_loss_factor - 1.0) * abs(largest):
            return _Verdict(_Kind.BAD, f"loss spike in the first steps (largest so far {fmt(largest)})", loss)
    if loss is not None and _is_spike(loss, loss_hist, loss_factor, zscore, warmup):
        return _Verdict(_Kind.BAD, f"loss spike (baseline {fmt(statistics.median(loss_hist))})", loss)
    if _is_spike(grad_norm, grad_hist, grad_factor, zscore, warmup):
        return _Verdict(_Kind.BAD, f"gradient-norm spike (baseline {fmt(statistics.median(grad_hist))})", grad_norm)
    return _Verdict(_Kind.OK)


def _escalate(
    kind: _Kind,
    bad_streak: int,
    scaler_streak: int,
    rollbacks: int,
    *,
    rollback_after: int,
    max_rollbacks: int | None,
    scaler_patience: int,
) -> tuple[_Action, int, int]:
    """Action for a verdict: ``(action, bad_streak, scaler_streak)`` with action one of
    ``ok``, ``scaler_skip``, ``skip``, ``rollback``, ``stop``."""
    if kind is _Kind.OK:
        return _Action.OK, 0, 0
    if kind is _Kind.SCALER:
        scaler_streak += 1
        if scaler_streak <= scaler_patience:
            return _Action.SCALER_SKIP, bad_streak, scaler_streak
    bad_streak += 1
    if kind in (_Kind.BROKEN, _Kind.DRIFT) or bad_streak >= rollback_after:
        if max_rollbacks is not None and rollbacks >= max_rollbacks:
            return _Action.STOP, bad_streak, scaler_streak
        return _Action.ROLLBACK, 0, 0
    return _Action.SKIP, bad_streak, scaler_streak


def _stop_message(
    guard: DivergenceGuard, verdict: _Verdict, epoch: int, batch_idx: int, path: str | None, good_step: int
) -> str:
    saved = f"The state it gave up on is saved in {path}; " if path else ""
    return (
        f"DivergenceGuard stopped training at step {verdict.step} (epoch {epoch}, batch {batch_idx}): "
        f"{verdict.reason}: {fmt(verdict.value)} (loss {fmt(verdict.loss)}, grad norm "
        f"{fmt(verdict.grad_norm)}), after {guard.rollbacks} rollback(s) that cut the learning rate to "
        f"x{guard.lr_factor:g} of the original and {guard.skipped_steps} skipped step(s). {saved}"
        f"the model was put back to the last good snapshot (step {good_step}). What to try: a lower "
        "learning rate or a longer warm-up; gradient clipping (Trainer gradient_clip_val=1.0); "
        "bf16-mixed instead of 16-mixed; checking the data of that batch; a larger lr_backoff cut or "
        "more max_rollbacks if it was recovering."
    )


# ---------------------------------------------------------------------- tensors and state


@dataclass
class _Snapshot:
    """A host-memory copy of model, optimizer and scheduler state, restored in place."""

    step: int
    tensors: dict[str, Tensor] = field(default_factory=dict)
    optimizer_state: dict[int, dict[str, Any]] = field(default_factory=dict)
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    schedulers: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def take(
        cls,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedulers: list[Any],
        step: int,
        reuse: _Snapshot | None = None,
    ) -> _Snapshot:
        old_tensors = reuse.tensors if reuse is not None else {}
        old_state = reuse.optimizer_state if reuse is not None else {}
        snap = cls(step)
        with torch.no_grad():
            for name, tensor in _named_state(module):
                snap.tensors[name] = _to_host(tensor, old_tensors.get(name))
            for index, param in enumerate(_optimizer_params(optimizer)):
                state = optimizer.state.get(param)
                if state:
                    old = old_state.get(index, {})
                    snap.optimizer_state[index] = {
                        k: _HostTensor.of(v, old.get(k)) if isinstance(v, Tensor) else copy.deepcopy(v)
                        for k, v in state.items()
                    }
        snap.retake_learning_rates(optimizer, schedulers)
        return snap

    def retake_learning_rates(self, optimizer: torch.optim.Optimizer, schedulers: list[Any]) -> None:
        """Copy the param groups (all entries but ``params``) and the scheduler states again."""
        self.param_groups = [
            {k: copy.deepcopy(v) for k, v in group.items() if k != "params"} for group in optimizer.param_groups
        ]
        self.schedulers = [copy.deepcopy(s.state_dict()) for s in schedulers]

    def restore(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, schedulers: list[Any]) -> None:
        with torch.no_grad():
            for name, tensor in _named_state(module):
                if name in self.tensors:
                    local_tensor(tensor).copy_(self.tensors[name])
            for index, param in enumerate(_optimizer_params(optimizer)):
                saved = self.optimizer_state.get(index)
                if saved is None:
                    optimizer.state.pop(param, None)
                    continue
                live = optimizer.state[param]
                for key in [k for k in live if k not in saved]:
                    del live[key]
                for key, value in saved.items():
                    live[key] = (
                        value.restore_into(live.get(key)) if isinstance(value, _HostTensor) else copy.deepcopy(value)
                    )
        for group, saved in zip(optimizer.param_groups, self.param_groups):
            # Exactly as saved: an entry another callback added after the snapshot goes away, so
            # what it stores there (e.g. DynamicBatchLR's dynamic_lr_scale) matches the restored LRs.
            for key in [k for k in group if k != "params" and k not in saved]:
                del group[key]
            for key, value in saved.items():
                if isinstance(group.get(key), Tensor) and isinstance(value, Tensor):
                    group[key].copy_(value)
                else:
                    group[key] = copy.deepcopy(value)
        for scheduler, state in zip(schedulers, self.schedulers):
            scheduler.load_state_dict(copy.deepcopy(state))


@dataclass
class _HostTensor:
    """A host copy of one optimizer-state tensor, with what it takes to rebuild it if it is gone."""

    data: Tensor
    device: torch.device
    dtensor: tuple[Any, Any, Any] | None  # (DTensor class, device mesh, placements) for a DTensor

    @classmethod
    def of(cls, tensor: Tensor, old: Any) -> _HostTensor:
        buffer = old.data if isinstance(old, _HostTensor) else None
        spec = None
        if hasattr(tensor, "device_mesh") and hasattr(tensor, "placements"):  # a DTensor
            spec = (type(tensor), tensor.device_mesh, tensor.placements)
        return cls(_to_host(tensor, buffer), local_tensor(tensor).device, spec)

    def restore_into(self, live: Tensor | None) -> Tensor:
        if live is not None and local_tensor(live).shape == self.data.shape:
            local_tensor(live).copy_(self.data)
            return live
        local = self.data.to(self.device, copy=True)
        if self.dtensor is not None:
            kind, mesh, placements = self.dtensor
            return kind.from_local(local, mesh, placements, run_check=False)
        return local


def _to_host(tensor: Tensor, buffer: Tensor | None) -> Tensor:
    src = local_tensor(tensor).detach()
    if buffer is None or buffer.shape != src.shape or buffer.dtype != src.dtype:
        buffer = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=src.is_cuda)
    # Pinned + non_blocking keeps the copy off the host's critical path; the next step's host read
    # of the all-reduced stats orders it before any restore can read the buffer.
    buffer.copy_(src, non_blocking=src.is_cuda)
    return buffer


def _named_state(module: torch.nn.Module) -> Iterable[tuple[str, Tensor]]:
    return chain(module.named_parameters(), module.named_buffers())


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _group_by_sharing(module: torch.nn.Module, trainer: pl.Trainer) -> list[tuple[float, list[Tensor]]]:
    """Group parameters and buffers by how many distinct shards of each exist across the world.

    Each rank adds ``local_norm² · shards / world`` so that the sum over ranks counts every element
    once: a replicated tensor (DDP, buffers) has 1 shard, an FSDP2 DTensor as many as its mesh
    shards it, a parameter of Lightning's FSDPStrategy one per rank.
    """
    world = max(trainer.world_size, 1)
    param_shards = world if isinstance(trainer.strategy, FSDPStrategy) else 1
    groups: dict[int, list[Tensor]] = {}
    tagged = chain(((p, param_shards) for p in module.parameters()), ((b, 1) for b in module.buffers()))
    for tensor, plain_shards in tagged:
        shards = plain_shards
        if hasattr(tensor, "placements") and hasattr(tensor, "device_mesh"):
            shards = 1
            for dim, placement in enumerate(tensor.placements):
                if placement.is_shard():
                    shards *= tensor.device_mesh.size(dim)
        groups.setdefault(shards, []).append(tensor)
    return [(float(shards), ts) for shards, ts in groups.items()]


def _total_norm(tensors: list[Tensor]) -> Tensor:
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: grouped foreach norms
        return torch.nn.utils.get_total_norm(tensors, 2.0, error_if_nonfinite=False)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t).float() for t in tensors]))


def _all_sum(trainer: pl.Trainer, vec: Tensor) -> Tensor:
    if trainer.world_size <= 1:
        return vec
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # One collective. Lightning's strategy.reduce() puts a barrier before every all-reduce,
        # which would double the collectives (and sync the host on NCCL) every step.
        torch.distributed.all_reduce(vec, op=torch.distributed.ReduceOp.SUM)
        return vec
    return trainer.strategy.reduce(vec, reduce_op="sum")


def _sqrt(x: float) -> float:
    return math.sqrt(x) if x >= 0 else float("nan")


def _scaler(trainer: pl.Trainer) -> Any:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _handles_unscaling(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def _drop_gradients(optimizer: torch.optim.Optimizer, scaler_owns_step: bool) -> None:
    """Make the coming ``optimizer.step()`` a no-op for every parameter."""
    poisoned = False
    for group in optimizer.param_groups:
        for param in group["params"]:
            if scaler_owns_step and not poisoned and param.grad is not None:
                # A fused optimizer under a GradScaler: the scaler checks gradients for inf inside
                # scaler.step() and asserts if there are none to check, so leave one and make it
                # NaN; the scaler then skips the whole step (and halves its scale).
                param.grad.fill_(float("nan"))
                poisoned = True
                continue
            param.grad = None


def _schedulers(trainer: pl.Trainer) -> list[Any]:
    return [config.scheduler for config in trainer.lr_scheduler_configs]


def _no_step(*args: Any, **kwargs: Any) -> None:
    return None
