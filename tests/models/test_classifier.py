from functools import partial
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.flop_counter import FlopCounterMode

from lit_accel import CIFAR10DataModule, ImageClassifier, LiteCNN, SeedCNN
from lit_accel.models.classifier import EXAMPLE_IMAGE_SIZE, checkpoint_image_size


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})


def test_learns_the_synthetic_data_well_above_chance(tmp_path):
    L.seed_everything(0)
    dm = CIFAR10DataModule(synthetic=True, synthetic_size=4000, val_size=1000, batch_size=64, augment=False)
    model = ImageClassifier(LiteCNN(), optimizer=partial(torch.optim.AdamW, lr=0.004))
    trainer = _trainer(tmp_path, max_epochs=3)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert float(metrics["val/acc"]) > 0.4, "10 classes: chance is 0.1"
    assert float(metrics["train/loss"]) < 2.0
    for key in ("train/acc", "val/loss", "train/loss_step"):
        assert key in metrics


def test_logs_test_metrics_and_predicts_probabilities(tmp_path):
    dm = CIFAR10DataModule(synthetic=True, synthetic_size=256, synthetic_test_size=64, val_size=64, batch_size=32)
    model = ImageClassifier()
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    trainer.fit(model, dm)
    (results,) = trainer.test(model, dm, verbose=False)
    assert set(results) == {"test/loss", "test/acc"}
    predictions = torch.cat(trainer.predict(model, dm))
    assert predictions.shape == (64, 10)
    torch.testing.assert_close(predictions.sum(1), torch.ones(64))


def test_label_smoothing_and_scheduler_are_used(tmp_path):
    model = ImageClassifier(
        label_smoothing=0.2,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        lr_scheduler_interval="step",
    )
    assert model.loss_fn.label_smoothing == 0.2
    dm = CIFAR10DataModule(synthetic=True, synthetic_size=256, val_size=64, batch_size=32)
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(model, dm)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_channels_last_and_compile_switches(tmp_path):
    model = ImageClassifier(channels_last=True, compile=True, compile_options={"backend": "eager"})
    model.configure_model()
    model.configure_model()  # Lightning may call it again (fit, then test): no second compile
    conv = model.net.features[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.net._compiled_call_impl is not None
    dm = CIFAR10DataModule(synthetic=True, synthetic_size=256, val_size=64, batch_size=32)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(model, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"lr_scheduler_interval": "batch"}, "lr_scheduler_interval"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}=.* is not allowed"):
        ImageClassifier(**kwargs)


class _NaNOnSecondTrainingCall(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net, self.calls = SeedCNN(), 0

    def forward(self, images):
        logits = self.net(images)
        if self.training:
            self.calls += 1
            if self.calls == 2:
                return logits * float("nan")
        return logits


def test_a_skipped_non_finite_step_stays_out_of_the_epoch_training_metrics(tmp_path):
    from lit_accel.callbacks import DivergenceGuard

    L.seed_everything(0)
    dm = CIFAR10DataModule(synthetic=True, synthetic_size=320, val_size=64, batch_size=32)
    model = ImageClassifier(_NaNOnSecondTrainingCall())
    guard = DivergenceGuard()
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=4, limit_val_batches=0, callbacks=[guard])
    trainer.fit(model, dm)
    assert guard.skipped_steps == 1  # the NaN step happened and was skipped
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert 0.0 <= float(trainer.callback_metrics["train/acc"]) <= 1.0


class _RecordedNaNSteps(torch.nn.Module):
    """SeedCNN whose training calls ``nan_calls`` (1-based) return NaN logits; keeps every training call's logits."""

    def __init__(self, nan_calls: tuple[int, ...]) -> None:
        super().__init__()
        self.net, self.nan_calls, self.logits = SeedCNN(), nan_calls, []

    def forward(self, images):
        logits = self.net(images)
        if self.training:
            if len(self.logits) + 1 in self.nan_calls:
                logits = logits * float("nan")
            self.logits.append(logits.detach().clone())
        return logits


class _RecordLabels(L.Callback):
    def __init__(self) -> None:
        self.labels = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.labels.append(batch[1].clone())


def test_train_acc_and_loss_are_exactly_those_of_the_steps_that_were_not_skipped(tmp_path):
    """Steps 2 and 5 of 6 have NaN logits; the DivergenceGuard skips them, and the epoch's train/acc
    and train/loss are the accuracy and mean loss over the other four batches' samples only."""
    from torch.nn import functional as F

    from lit_accel.callbacks import DivergenceGuard

    L.seed_everything(0)
    dm = CIFAR10DataModule(synthetic=True, synthetic_size=320, val_size=64, batch_size=32)
    net, labels, guard = _RecordedNaNSteps(nan_calls=(2, 5)), _RecordLabels(), DivergenceGuard()
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=6, limit_val_batches=0, callbacks=[guard, labels])
    trainer.fit(ImageClassifier(net), dm)
    assert len(net.logits) == len(labels.labels) == 6
    assert (guard.skipped_steps, guard.rollbacks) == (2, 0)  # the two NaN steps, and nothing else

    kept = [(logits, y) for logits, y in zip(net.logits, labels.labels) if torch.isfinite(logits).all()]
    assert len(kept) == 4
    correct = sum(int((logits.argmax(1) == y).sum()) for logits, y in kept)
    samples = sum(len(y) for _, y in kept)
    loss = sum(float(F.cross_entropy(logits, y)) * len(y) for logits, y in kept) / samples
    assert float(trainer.callback_metrics["train/acc"]) == pytest.approx(correct / samples, rel=1e-6)
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(loss, rel=1e-5)
    # Counting the skipped batches too would give another number: the check above tells them apart.
    all_correct = sum(int((logits.argmax(1) == y).sum()) for logits, y in zip(net.logits, labels.labels))
    all_samples = sum(len(y) for y in labels.labels)
    assert all_correct / all_samples != pytest.approx(correct / samples, rel=1e-3)


def test_compile_options_are_checked_at_construction():
    with pytest.raises(ValueError, match=r"compile_options=\{'modee': 'max-autotune'\} is not allowed"):
        ImageClassifier(compile=True, compile_options={"modee": "max-autotune"})
    ImageClassifier(compile=True, compile_options={"mode": "max-autotune", "dynamic": False})


def test_more_classes_in_the_data_than_outputs_is_one_clear_error(tmp_path):
    from lit_accel.errors import ConfigurationError

    class TwelveClasses(CIFAR10DataModule):
        def setup(self, stage: str) -> None:
            super().setup(stage)
            self.classes = tuple(f"class{i}" for i in range(12))

    dm = TwelveClasses(synthetic=True, synthetic_size=256, val_size=64, batch_size=32)
    with pytest.raises(ConfigurationError, match="the data has 12 classes but model.num_classes=10"):
        _trainer(tmp_path, max_steps=1).fit(ImageClassifier(), dm)


def test_validation_and_test_use_flip_averaged_logits(tmp_path):
    """With flip_tta the evaluation loss is the loss of the mean of each image's and its mirror's
    logits, for validation and test alike; without it, of the image's alone."""
    dm = CIFAR10DataModule(synthetic=True, synthetic_size=256, synthetic_test_size=64, val_size=64, batch_size=64)
    torch.manual_seed(0)
    model = ImageClassifier(LiteCNN(width=4), flip_tta=True)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, dm)
    evaluator = _trainer(tmp_path)
    for stage, split in (("validate", "val"), ("test", "test")):
        model.flip_tta = True
        (with_tta,) = getattr(evaluator, stage)(model, dm, verbose=False)
        model.flip_tta = False
        (without,) = getattr(evaluator, stage)(model, dm, verbose=False)
        images, labels = dm._splits[split]
        normalized = dm.device_transform(images, train=False)
        model.eval()
        with torch.no_grad():
            plain = torch.nn.functional.cross_entropy(model(normalized), labels)
            averaged = torch.nn.functional.cross_entropy(0.5 * (model(normalized) + model(normalized.flip(-1))), labels)
        assert not torch.isclose(plain, averaged)
        assert with_tta[f"{split}/loss"] == pytest.approx(float(averaged), rel=1e-5)
        assert without[f"{split}/loss"] == pytest.approx(float(plain), rel=1e-5)


class _SummaryFlops(ModelSummary):
    """Lightning's model summary callback, keeping the total FLOPs it would print."""

    def __init__(self) -> None:
        super().__init__()
        self.total_flops: int | None = None

    def summarize(self, *args, total_flops: int = 0, **kwargs) -> None:  # type: ignore[override]
        self.total_flops = total_flops


@pytest.mark.parametrize(
    ("pipeline", "precision", "channels_last"),
    [("preload", "32-true", True), ("dataloader", "64-true", False)],
)
def test_the_model_summary_counts_the_networks_flops_per_image(tmp_path, pipeline, precision, channels_last):
    """Lightning passes example_input_array through the data module's batch hooks (normalizing uint8
    images in the preload pipeline, nothing in the DataLoader one) and forwards it in the run's
    precision; the summary shows the network's FLOPs for one image instead of 0."""
    net = LiteCNN(width=4)
    with FlopCounterMode(display=False) as expected:
        net(torch.zeros(1, 3, 32, 32))
    summary = _SummaryFlops()
    model = ImageClassifier(net, channels_last=channels_last)
    dm = CIFAR10DataModule(synthetic=True, synthetic_size=64, val_size=0, batch_size=32, pipeline=pipeline)
    trainer = _trainer(
        tmp_path, callbacks=[summary], enable_model_summary=True, precision=precision, max_steps=1, limit_val_batches=0
    )
    trainer.fit(model, dm)
    assert expected.get_total_flops() > 0 and summary.total_flops == expected.get_total_flops()


def test_the_example_batch_is_a_batch_as_the_loaders_yield_it():
    images, labels = ImageClassifier().example_input_array
    assert images.shape == (1, 3, EXAMPLE_IMAGE_SIZE, EXAMPLE_IMAGE_SIZE) and images.dtype == torch.float32
    assert labels.tolist() == [0]
    # The summary calls the module with the whole batch; the labels are not used.
    model = ImageClassifier(LiteCNN(width=4)).eval()
    torch.testing.assert_close(model(images, labels), model(images))
    # A compiled network would be compiled once more for the summary's forward: no example then.
    assert ImageClassifier(compile=True, compile_options={"backend": "eager"}).example_input_array is None


# ------------------------------------------------------------------ the training image size in checkpoints
def _attached(model: ImageClassifier, fn: TrainerFn, image_size: int | None) -> ImageClassifier:
    """``model`` as a Trainer running ``fn`` on data of ``image_size`` sees it (only what the hooks read)."""
    data = SimpleNamespace(classes=None) if image_size is None else SimpleNamespace(classes=None, image_size=image_size)
    precision = SimpleNamespace(convert_input=lambda batch: batch)
    model._trainer = SimpleNamespace(datamodule=data, state=SimpleNamespace(fn=fn), precision_plugin=precision)  # type: ignore[assignment]
    return model


def test_the_training_image_size_travels_in_the_checkpoint():
    model = _attached(ImageClassifier(LiteCNN(width=4)), TrainerFn.FITTING, 64)
    model.setup("fit")
    assert model.example_input_array[0].shape == (1, 3, 64, 64)
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["image_size"] == 64
    loaded = ImageClassifier(LiteCNN(width=4))
    loaded.on_load_checkpoint(checkpoint)
    assert loaded.image_size == 64
    loaded.on_load_checkpoint({})  # a checkpoint without image_size: CIFAR-10's
    assert loaded.image_size == 32 == checkpoint_image_size({})


def test_a_resumed_fit_keeps_its_datas_image_size_and_predict_takes_the_checkpoints():
    resumed = _attached(ImageClassifier(LiteCNN(width=4)), TrainerFn.FITTING, 96)
    resumed.setup("fit")
    resumed.on_load_checkpoint({"image_size": 64})
    assert resumed.image_size == 96
    predicting = _attached(ImageClassifier(LiteCNN(width=4)), TrainerFn.PREDICTING, 32)
    predicting.setup("predict")
    predicting.on_load_checkpoint({"image_size": 64})
    assert predicting.image_size == 64


def test_data_smaller_than_the_network_takes_is_one_clear_error():
    from lit_accel.errors import ConfigurationError

    model = _attached(ImageClassifier(LiteCNN(width=4)), TrainerFn.FITTING, 24)
    with pytest.raises(ConfigurationError, match=r"image_size=24 is below the 30×30 pixels LiteCNN takes"):
        model.setup("fit")
