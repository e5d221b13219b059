"""ImageClassifier: one LightningModule for every network, strategy and precision."""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.optim.lr_scheduler import ConstantLR, ReduceLROnPlateau
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lit_accel.errors import ConfigurationError
from lit_accel.models.nets import SeedCNN
from lit_accel.schedules import WarmupDecayLR, optimizer_steps_left

__all__ = [
    "EXAMPLE_IMAGE_SIZE",
    "ImageClassifier",
    "LR_LOG_KEY",
    "MONITORABLE_METRICS",
    "checkpoint_image_size",
    "example_batch",
]

# The key LearningRateMonitor logs the scheduled learning rate under (the scheduler config's
# "name"), whatever the optimizer: Lightning's default would be "lr-<OptimizerClass>".
LR_LOG_KEY = "train/lr"
# The side of the square images of example_input_array (Lightning's model summary) when the data
# module gives no image_size, and of a checkpoint that records none: CIFAR-10's.
EXAMPLE_IMAGE_SIZE = 32
# The metrics ImageClassifier logs once per epoch: what a ReduceLROnPlateau scheduler can follow.
MONITORABLE_METRICS = ("val/loss", "val/acc", "train/loss", "train/acc")


class ImageClassifier(LightningModule):
    """Trains any image network with cross-entropy; serves one device, DDP and FSDP2 alike.

    Batches are ``(images, labels)`` with images already normalized (the data module does that on
    the device). Under Lightning's ``ModelParallelStrategy`` the network is sharded with FSDP2
    (``fully_shard``) in :meth:`configure_model`: each unit from the network's ``fsdp_units()``
    (when it has one), then the whole network.

    Args:
        net: the network, ``(N, 3, S, S)`` → ``(N, num_classes)`` logits (default: SeedCNN).
            Built in Python (not by LightningCLI) it is not saved as a hyperparameter: load such a
            checkpoint with ``ImageClassifier.load_from_checkpoint(path, net=LiteCNN())``.
        num_classes: number of classes, for the accuracy metric.
        optimizer: builds the optimizer from the parameters (YAML: ``class_path`` + ``init_args``).
        lr_scheduler: builds an LR scheduler from the optimizer, or ``null`` for a constant LR. Any
            torch scheduler works; :class:`~lit_accel.schedules.WarmupDecayLR` is sized from the
            run (``trainer.max_epochs`` / ``max_steps``, batch count, accumulation) when the
            optimizer is configured, and again before any batch at which the steps left changed
            (a grown batch, a resumed run of another length, steps DivergenceGuard skipped).
        lr_scheduler_interval: step the scheduler every ``"epoch"`` or every optimizer ``"step"``;
            ``null`` (default): ``"step"`` for ``WarmupDecayLR``, ``"epoch"`` for other schedulers.
        lr_scheduler_monitor: the metric a scheduler that follows one (``ReduceLROnPlateau``) is
            stepped with: one of ``val/loss`` (default), ``val/acc``, ``train/loss``, ``train/acc``
            (for an accuracy, give the scheduler ``mode: max``). Other schedulers ignore it.
        label_smoothing: cross-entropy label smoothing, in [0, 1).
        channels_last: keep the network and the inputs in NHWC memory layout (faster convolutions
            with tensor cores and on most CPUs' oneDNN kernels). Under FSDP2, which shards only
            contiguous parameters, the inputs alone.
        flip_tta: test-time augmentation for validation, test and predict: average the logits of
            each image and of its mirror image (as airbench does). Costs a second forward pass at
            evaluation only; pair it with flip augmentation in training. ``lit-accel-export`` folds it
            into the exported model (``export_model(..., flip_tta=True)`` from Python).
        compile: compile the network with ``torch.compile`` (in place: checkpoint keys unchanged).
        compile_options: keyword arguments for ``torch.compile``, e.g. ``{mode: max-autotune}``.

    Lightning's model summary (``trainer.enable_model_summary``, on by default) counts the FLOPs of
    one forward pass over ``example_input_array``: one blank ``(images, labels)`` batch of one
    image, as the data loaders yield it (float, ``3×32×32`` or the data module's ``image_size``, in
    the dtype of a ``*-true`` precision), so "Total FLOPs" is the network's forward FLOPs per
    image. Lightning passes that batch through the data module's batch hooks like a training
    batch: with lit_accel's data modules it draws that batch's augmentation (one random flip per
    run), so a run with the summary on draws other random numbers than the same run with it off;
    resumes stay exact (RNGStateCheckpoint restores the generators after the summary). Not set
    with ``compile``, whose first forward would compile the network once more for the summary.

    The training data module's ``classes`` (when it has that attribute) are kept as
    ``class_names`` and saved in every checkpoint (``checkpoint["class_names"]``), so prediction
    and ``lit-accel-export`` name the outputs the way the training data did, without that data.
    Likewise its ``image_size`` (the side of its square images, when it has that attribute) is
    kept as ``image_size`` and saved as ``checkpoint["image_size"]``, so ``lit-accel predict`` and
    ``lit-accel-export`` feed the network images of the size it was trained at; a checkpoint
    without it loads as 32 (CIFAR-10's). A resumed ``fit``
    keeps its data's size, not the checkpoint's.

    Logged metrics: ``train/loss_step`` (this rank's loss, every logged step); ``train/loss``,
    ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc`` (per epoch, over all
    ranks; ``train/loss`` and ``train/acc`` leave out steps whose loss is not finite, the steps
    DivergenceGuard skips). A LearningRateMonitor logs the learning rate as ``train/lr`` (the
    scheduler config's ``name``), also with ``lr_scheduler: null``, which runs a ``ConstantLR``
    with factor 1 for that reason.

    Raises:
        ConfigurationError: at setup, for data with more classes than ``num_classes``, or images
            smaller than the network's ``min_image_size`` (when it has one).
        ValueError: for ``num_classes`` < 2, ``label_smoothing`` outside [0, 1), an unknown
            ``lr_scheduler_interval`` or ``lr_scheduler_monitor``, or ``compile_options`` that
            ``torch.compile`` does not take; when the optimizers are configured, for
            ``WarmupDecayLR`` with ``"epoch"`` interval or a run that cannot be sized (see
            :meth:`WarmupDecayLR.plan`).

    Example::

        model:
          net:
            class_path: lit_accel.models.BatchNormCNN
          optimizer:
            class_path: torch.optim.AdamW
            init_args: {lr: 0.002, weight_decay: 0.05}
          lr_scheduler:
            class_path: lit_accel.schedules.WarmupDecayLR
            init_args: {warmup_fraction: 0.1}
    """

    if TYPE_CHECKING:  # set in __init__ by setattr (one pair per stage); no run-time class annotation
        train_loss: MeanMetric
        train_acc: MulticlassAccuracy

    def __init__(
        self,
        net: nn.Module | None = None,
        num_classes: int = 10,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] | None = None,
        lr_scheduler_monitor: str = "val/loss",
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        flip_tta: bool = False,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} is not allowed: use 2 or more classes")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing!r} is not allowed: use a value in [0, 1)")
        if lr_scheduler_interval not in ("epoch", "step", None):
            raise ValueError(
                f"lr_scheduler_interval={lr_scheduler_interval!r} is not allowed: "
                "use 'epoch', 'step' or null (automatic)"
            )
        if lr_scheduler_monitor not in MONITORABLE_METRICS:
            raise ValueError(
                f"lr_scheduler_monitor={lr_scheduler_monitor!r} is not allowed: use a metric ImageClassifier logs "
                f"every epoch, one of {', '.join(MONITORABLE_METRICS)}"
            )
        try:  # a wrong key would otherwise fail only when the network is compiled, after start-up
            inspect.signature(torch.compile).bind(None, **(compile_options or {}))
        except TypeError as err:
            raise ValueError(
                f"compile_options={compile_options!r} is not allowed: use keyword arguments of torch.compile ({err})"
            ) from None
        # Under LightningCLI the hyperparameters are the config (class paths included), so a
        # checkpoint rebuilds its own network with ImageClassifier.load_from_checkpoint(path).
        # Built in Python, the network and factories are objects: keep them out of hparams.
        self.save_hyperparameters(ignore=[] if _built_by_cli() else ["net", "optimizer", "lr_scheduler"])
        self.net = net if net is not None else SeedCNN(num_classes=num_classes)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor
        self.num_classes = num_classes
        self.channels_last = channels_last
        self.flip_tta = flip_tta
        self.compile_net = compile
        self.compile_options = dict(compile_options or {})
        # The names of the outputs, from the training data; saved in checkpoints (not an hparam:
        # they are known only once the data is set up).
        self.class_names: tuple[str, ...] | None = None
        # The side of the square training images, from the training data or the checkpoint
        # (None: not known, i.e. EXAMPLE_IMAGE_SIZE for a checkpoint); saved like class_names.
        self.image_size: int | None = None
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        # torchmetrics objects sum over the epoch locally and reduce across ranks once, at epoch
        # end: correct global numbers without a collective per step.
        # validate_args=False and nan_strategy="disable": their checks (torch.unique, isnan().any())
        # force a device-to-host sync every step; labels come from our own data, and NaN losses
        # are the DivergenceGuard's business.
        for stage in ("train", "val", "test"):
            accuracy = MulticlassAccuracy(
                num_classes=num_classes, average="micro", validate_args=False, ignore_index=_SKIPPED_LABEL
            )
            setattr(self, f"{stage}_acc", accuracy)
            setattr(self, f"{stage}_loss", _WeightedMean(nan_strategy="disable"))
        self._configured = False
        self.example_input_array = None if compile else example_batch(EXAMPLE_IMAGE_SIZE)

    @override
    def setup(self, stage: str) -> None:
        # The data module is set up before the model: a data set with more classes than the network
        # has outputs would otherwise fail deep in the loss with an index error.
        classes = getattr(getattr(self.trainer, "datamodule", None), "classes", None)
        if classes is not None and len(classes) > self.num_classes:
            raise ConfigurationError(
                f"the data has {len(classes)} classes but model.num_classes={self.num_classes}: pass "
                f"--model.num_classes {len(classes)} (and the network's num_classes, e.g. --model.net.num_classes)."
            )
        data_size = getattr(getattr(self.trainer, "datamodule", None), "image_size", None)
        smallest = getattr(self.net, "min_image_size", None)
        if isinstance(data_size, int) and isinstance(smallest, int) and data_size < smallest:
            raise ConfigurationError(
                f"the data's image_size={data_size} is below the {smallest}×{smallest} pixels "
                f"{type(self.net).__name__} takes: pass --data.image_size {smallest} or more."
            )
        if stage == "fit" and classes is not None:
            self.class_names = tuple(str(name) for name in classes)
        if stage == "fit" and isinstance(data_size, int):
            # Set before a resumed run's checkpoint is restored: the data trained on wins.
            self.image_size = data_size
        if stage == "fit" and self.example_input_array is not None:
            size = data_size if isinstance(data_size, int) else EXAMPLE_IMAGE_SIZE
            # A batch as the loaders yield it, in the dtype Lightning makes every float input
            # (float16 for 16-true): the summary's forward skips that conversion.
            images, labels = example_batch(size)
            self.example_input_array = (self.trainer.precision_plugin.convert_input(images), labels)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.class_names is not None:
            checkpoint["class_names"] = list(self.class_names)
        if self.image_size is not None:
            checkpoint["image_size"] = self.image_size

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        names = checkpoint.get("class_names")
        if isinstance(names, (list, tuple)) and all(isinstance(name, str) for name in names):
            self.class_names = tuple(names)
        if self.image_size is None or not self._fitting():
            self.image_size = checkpoint_image_size(checkpoint)

    def _fitting(self) -> bool:
        """Whether a Trainer is fitting this module (its data's image_size, set at setup, stays)."""
        trainer = self._trainer
        return trainer is not None and trainer.state.fn == TrainerFn.FITTING

    @override
    def configure_model(self) -> None:
        """Memory layout, FSDP2 sharding (when the strategy gives a device mesh) and compilation.

        Lightning may call this more than once (``fit`` then ``test``); it acts only the first time.
        """
        if self._configured:
            return
        self._configured = True
        mesh = self.device_mesh
        # FSDP2 shards only contiguous (NCHW) parameters; under it channels_last applies to the
        # inputs alone (the convolutions then pick their layout from the input).
        if self.channels_last and mesh is None:
            self.net.to(memory_format=torch.channels_last)
        if mesh is not None:
            from torch.distributed.fsdp import fully_shard

            data_parallel_mesh = mesh["data_parallel"] if mesh.mesh_dim_names else mesh
            fsdp_units = getattr(self.net, "fsdp_units", None)
            units = fsdp_units() if fsdp_units is not None else []
            for unit in units:
                fully_shard(unit, mesh=data_parallel_mesh)
            fully_shard(self.net, mesh=data_parallel_mesh)
        if self.compile_net:
            self.net.compile(**self.compile_options)

    @override
    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """The logits ``(N, num_classes)`` of ``images``. ``labels`` is not used: it lets Lightning's
        model summary call the module with a whole ``(images, labels)`` batch."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def evaluation_logits(self, images: Tensor) -> Tensor:
        """Logits for evaluation: with ``flip_tta``, the mean of the image's and its mirror's."""
        logits = self(images)
        if self.flip_tta:
            logits = 0.5 * (logits + self(images.flip(-1)))
        return logits

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> tuple[Tensor, Tensor]:
        images, labels = batch
        logits = self(images) if stage == "train" else self.evaluation_logits(images)
        loss = self.loss_fn(logits, labels)
        mean_loss: MeanMetric = getattr(self, f"{stage}_loss")
        accuracy: MulticlassAccuracy = getattr(self, f"{stage}_acc")
        loss_value, weight = loss.detach(), torch.full_like(loss, labels.shape[0], dtype=torch.float32).detach()
        if stage == "train":
            # A non-finite loss is a step DivergenceGuard skips: keep it out of the epoch's loss and
            # accuracy (masked on the device, no host sync). Validation and test keep NaN visible.
            finite = torch.isfinite(loss_value)
            loss_value, weight = torch.where(finite, loss_value, 0.0), torch.where(finite, weight, 0.0)
            labels = torch.where(finite, labels, _SKIPPED_LABEL)
        mean_loss.update(loss_value, weight=weight)
        accuracy.update(logits.detach(), labels)
        if stage == "train":
            # Training logs only on the steps the loggers write: each self.log call costs Lightning
            # bookkeeping (BENCHMARKS.md, "Trainer overhead and callbacks"), and the epoch values
            # are logged once, at epoch end. Not in the progress bar, whose refresh would read the
            # loss back to the host every step.
            if _logger_writes_this_step(self.trainer):
                self.log("train/loss_step", loss.detach())
        else:
            self.log(f"{stage}/loss", mean_loss, on_step=False, on_epoch=True, prog_bar=True)
            self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss, logits

    @override
    def on_train_epoch_end(self) -> None:
        # compute() reduces over ranks (every rank runs this hook); reset for the next epoch.
        self.log("train/loss", self.train_loss.compute(), prog_bar=False)
        self.log("train/acc", self.train_acc.compute(), prog_bar=True)
        self.train_loss.reset()
        self.train_acc.reset()

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")[0]

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Returns the logits, so callbacks (ValidationFigures) need no second forward pass."""
        _, logits = self._shared_step(batch, "val")
        return {"logits": logits.detach()}

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities ``(N, num_classes)`` for the batch's images."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self.evaluation_logits(images).float(), dim=-1)

    @override
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            # A constant learning rate still gets a scheduler, one that never changes it, so that
            # LearningRateMonitor logs it under the same key as every other run (without one it
            # would be "lr-<OptimizerClass>").
            constant = ConstantLR(optimizer, factor=1.0, total_iters=0)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": constant, "name": LR_LOG_KEY}}
        scheduler = self.lr_scheduler_factory(optimizer)
        interval = scheduler_interval(scheduler, self.lr_scheduler_interval)
        if isinstance(scheduler, WarmupDecayLR):
            # Sized now so that a warm-up longer than the run fails before training starts; a
            # resumed run replaces this plan with its checkpoint's.
            scheduler.plan(self.trainer.estimated_stepping_batches)
        config = {"scheduler": scheduler, "interval": interval, "name": LR_LOG_KEY}
        if isinstance(scheduler, ReduceLROnPlateau):
            config["monitor"] = self.lr_scheduler_monitor  # Lightning refuses a plateau scheduler without one
        return {"optimizer": optimizer, "lr_scheduler": config}

    @override
    def on_train_start(self) -> None:
        for config in self.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, WarmupDecayLR):
                scheduler_interval(config.scheduler, config.interval)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Keep every WarmupDecayLR ending at the run's last step. The steps left can change: the
        # batch grew (DynamicBatchLR: fewer steps per epoch), a resumed run has another length, or
        # DivergenceGuard skipped steps or rolled the scheduler back. The plan changes only when
        # the count differs, so an undisturbed or exactly resumed run keeps its curve to the bit.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, WarmupDecayLR):
                steps_left = optimizer_steps_left(self.trainer, batch_idx)
                total = max(scheduler.last_epoch, 0) + steps_left
                if 1 <= steps_left < math.inf and total != scheduler.total_steps:
                    scheduler.plan(total)


def checkpoint_image_size(checkpoint: dict[str, Any]) -> int:
    """The side of the square images a checkpoint's network was trained on: its ``image_size``, or
    :data:`EXAMPLE_IMAGE_SIZE` (32, CIFAR-10's) for one without (or with an unusable value).

    Example::

        checkpoint_image_size(read_checkpoint("last.ckpt"))  # 64 for a run on 64-pixel images
    """
    size = checkpoint.get("image_size")
    if isinstance(size, int) and not isinstance(size, bool) and size >= 1:
        return size
    return EXAMPLE_IMAGE_SIZE


def example_batch(image_size: int) -> tuple[Tensor, Tensor]:
    """One blank ``(images, labels)`` batch of one image: float32 ``(1, 3, size, size)`` zeros and
    label 0, the shape and dtype a data loader yields (a uint8 batch would fail in a network fed by
    the DataLoader pipeline, whose batches are already normalized floats)."""
    return torch.zeros(1, 3, image_size, image_size), torch.zeros(1, dtype=torch.long)


def scheduler_interval(scheduler: Any, interval: str | None) -> str:
    """The interval a scheduler steps at: ``interval``, or by default ``"step"`` for
    :class:`WarmupDecayLR` and ``"epoch"`` for others.

    Raises:
        ConfigurationError: for WarmupDecayLR stepped every epoch (it counts optimizer steps).
    """
    if isinstance(scheduler, WarmupDecayLR):
        if interval == "epoch":
            raise ConfigurationError(
                "model.lr_scheduler_interval=epoch is not allowed with WarmupDecayLR, which steps every optimizer "
                "step: remove it, or pass --model.lr_scheduler_interval step."
            )
        return "step"
    return interval or "epoch"


# label of the samples of a skipped (non-finite loss) training step: the train accuracy ignores it
_SKIPPED_LABEL = -100


class _WeightedMean(MeanMetric):
    """The mean of the values weighted by their weights (here: losses by their batch's samples).

    torchmetrics 1.9's MeanMetric with ``nan_strategy="disable"`` replaces the weights by ones,
    so its mean is per batch and a skipped step's masked loss (0 at weight 0) counted as a 0 loss;
    its other strategies look for NaN on the host every step. This one adds on the device only.
    """

    @override
    def update(self, value: float | Tensor, weight: float | Tensor | None = None) -> None:
        value = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        if weight is None:
            weight = torch.ones_like(value)
        weight = torch.broadcast_to(torch.as_tensor(weight, dtype=self.dtype, device=self.device), value.shape)
        self.mean_value += (value * weight).sum()
        self.weight += weight.sum()


def _logger_writes_this_step(trainer: Any) -> bool:
    """Whether Lightning's loggers write metrics at the current training step."""
    connector = getattr(trainer, "_logger_connector", None)  # private: no public equivalent
    return bool(getattr(connector, "should_update_logs", True))


def _built_by_cli() -> bool:
    """True while LightningCLI instantiates the module with its config as hyperparameters."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # a Lightning without the mechanism: fall back to ignoring objects
        return False
    return _given_hyperparameters.get() is not None
