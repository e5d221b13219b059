"""ValidationFigures: pure counting and drawing, real Trainer runs with TensorBoard, and 2-process DDP."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import lit_accel.callbacks.validation_figures as module
from helpers import FIGURES_OFF_ARGS, TINY_CLI_ARGS
from lit_accel.callbacks.drawing import confusion_counts, draw_confusion_matrix, draw_image_grid, to_display
from lit_accel.callbacks.validation_figures import ValidationFigures, is_drawing_epoch, may_be_last_validation

C = 3  # classes
N = 12  # validation samples; label i % 3; the scripted model errs on every 4th sample


# ---------------------------------------------------------------------- pure functions
@pytest.mark.parametrize(
    ("epoch", "every", "fitting", "sanity", "expected"),
    [
        (0, 1, True, False, True),
        (0, 2, True, False, False),
        (1, 2, True, False, True),
        (4, 5, True, False, True),
        (0, 1, True, True, False),  # never the sanity check
        (0, 7, False, False, True),  # `validate` always draws
    ],
)
def test_is_drawing_epoch(epoch: int, every: int, fitting: bool, sanity: bool, expected: bool) -> None:
    assert is_drawing_epoch(epoch, every, fitting=fitting, sanity_checking=sanity) is expected


@pytest.mark.parametrize(
    ("epoch", "max_epochs", "step", "max_steps", "should_stop", "expected"),
    [
        (2, 3, 6, -1, False, True),  # the last epoch by max_epochs
        (1, 3, 4, -1, False, False),
        (0, -1, 2, 2, False, True),  # max_steps reached
        (0, None, 1, 2, False, False),
        (0, -1, 1, -1, True, True),  # a stop already decided (max_time, a callback)
        (5, -1, 10, -1, False, False),  # no limit: cannot be known
    ],
)
def test_may_be_last_validation(
    epoch: int, max_epochs: int | None, step: int, max_steps: int, should_stop: bool, expected: bool
) -> None:
    assert may_be_last_validation(epoch, max_epochs, step, max_steps, should_stop=should_stop) is expected


def test_confusion_counts_rows_are_true_classes_and_ignore_unknown_labels() -> None:
    labels = torch.tensor([0, 0, 1, 2, 2, 2, -100, 3])
    predicted = torch.tensor([0, 1, 1, 2, 0, 2, 1, 1])
    assert confusion_counts(labels, predicted, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_to_display_undoes_the_normalization_or_stretches() -> None:
    raw = torch.rand(2, 3, 4, 4)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    normalized = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(to_display(normalized, mean, std), raw)
    stretched = to_display(torch.tensor([[[[-2.0, 0.0], [2.0, 1.0]]]]), None, None)
    assert stretched.flatten().tolist() == [0.0, 0.5, 1.0, 0.75]
    assert to_display(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8), None, None).min() == 1.0


def test_drawings_are_rgb_uint8_pictures() -> None:
    matrix = draw_confusion_matrix(torch.tensor([[5, 1], [2, 7]]), ["cat", "dog"])
    grid = draw_image_grid(torch.rand(3, 3, 8, 8), ["a", "b", "c"], columns=2)
    for picture in (matrix, grid):
        assert picture.dtype == torch.uint8 and picture.ndim == 3 and picture.shape[0] == 3
        assert picture.float().std() > 0  # not a blank canvas
    assert draw_image_grid(torch.rand(1, 1, 8, 8), ["gray"]).shape[0] == 3


def _pixels_of(picture: Tensor, rgb: tuple[int, int, int]) -> int:
    return int((picture == torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1)).all(dim=0).sum())


def test_the_grid_shows_each_image_enlarged_once_in_its_tile() -> None:
    red, green = torch.zeros(3, 32, 32), torch.zeros(3, 32, 32)
    red[0], green[1] = 1.0, 1.0
    red[:, :8, :4] = 0.0  # a black corner: the image is not transposed or flipped
    grid = draw_image_grid(torch.stack([red, green, red]), ["a", "b", "c"], columns=2)
    # 32-pixel images enlarged 2x: 64x64 tiles, the corner 16 rows x 8 columns
    assert _pixels_of(grid, (255, 0, 0)) == 2 * (64 * 64 - 16 * 8)
    assert _pixels_of(grid, (0, 255, 0)) == 64 * 64
    rows, cols = (grid[0] == 255).logical_and(grid[1] == 0).nonzero().unbind(1)
    top, left = int(rows.min()), int(cols.min())  # the first red tile, whose top-left corner is black
    assert _pixels_of(grid[:, top : top + 16, left : left + 8], (0, 0, 0)) == 16 * 8


def test_the_confusion_matrix_shades_each_cell_by_its_share_of_the_row() -> None:
    matrix = draw_confusion_matrix(torch.tensor([[10, 0], [5, 5]]), ["cat", "dog"])
    dark, light = (8, 48, 107), (247, 251, 255)  # share 1 and share 0
    middle = tuple(round(a + (b - a) * 0.5) for a, b in zip(light, dark))
    cells = {colour: _pixels_of(matrix, colour) for colour in (dark, light, middle)}
    # one cell each of shares 1 and 0, two of 0.5 (minus the digits drawn on them)
    assert cells[dark] > 0 and cells[light] > 0
    assert 1.5 * cells[dark] < cells[middle] < 2.5 * cells[light]

    def columns_of(colour: tuple[int, int, int]) -> Tensor:
        return (matrix == torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)).all(dim=0).nonzero()[:, 1]

    assert columns_of(dark).max() < columns_of(light).min(), "true cat, predicted cat (share 1) left of dog (0)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_epochs": 0}, r"every_n_epochs=0 is not allowed"),
        ({"misclassified": -1}, r"misclassified=-1 is not allowed: use 0 \(off\) to 256"),
        ({"misclassified": 257}, r"misclassified=257 is not allowed"),
        ({"mean": [0.5]}, r"give both or neither"),
        ({"mean": [0.5, 0.5], "std": [0.2]}, r"one value per channel"),
        ({"mean": [0.5], "std": [0.0]}, r"std=\[0.0\] is not allowed: use positive values"),
        ({"mean": [float("nan")], "std": [0.2]}, r"is not allowed: use finite values"),
        ({"every_n_epochs": True}, r"every_n_epochs=True is not allowed"),
        ({"misclassified": 2.5}, r"misclassified=2.5 is not allowed"),
        ({"confusion_matrix": "no"}, r"confusion_matrix='no' is not allowed: use true or false"),
        ({"class_names": 3}, r"class_names=3 is not allowed: use a list of names"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ValidationFigures(**kwargs)


def test_no_progress_state_pickles_and_two_instances_coexist() -> None:
    a, b = ValidationFigures(every_n_epochs=1), ValidationFigures(every_n_epochs=5, misclassified=0)
    assert a.state_dict() == {} and a.state_key != b.state_key
    clone = pickle.loads(pickle.dumps(copy.deepcopy(b)))
    assert (clone.every_n_epochs, clone.misclassified) == (5, 0)


# ---------------------------------------------------------------------- real Trainer runs
class Scripted(pl.LightningModule):
    """Not lit_accel's model. The 'image' holds the label in pixel 0 and the sample index in pixel 1;
    the model predicts the label, except for every 4th sample, which it calls label + 1."""

    def __init__(self, return_logits: bool = True) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.return_logits = return_logits
        self.forward_calls = 0

    def forward(self, images: Tensor) -> Tensor:
        self.forward_calls += 1
        labels = images[:, 0, 0, 0].long()
        index = images[:, 0, 0, 1].long()
        predicted = torch.where(index % 4 == 0, (labels + 1) % C, labels)
        return torch.nn.functional.one_hot(predicted, C).float() * 4 + self.weight

    def training_step(self, batch, batch_idx: int) -> Tensor:
        return (self.weight**2).sum() + 1.0

    def validation_step(self, batch, batch_idx: int) -> Any:
        logits = self(batch[0])
        return {"logits": logits, "other": 1} if self.return_logits else None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _samples(count: int = N) -> TensorDataset:
    labels = torch.arange(count) % C
    images = torch.zeros(count, 3, 2, 2)
    images[:, 0, 0, 0] = labels.float()
    images[:, 0, 0, 1] = torch.arange(count).float()
    return TensorDataset(images, labels)


class Data(pl.LightningDataModule):
    classes = ["ant", "bee", "cow"]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_samples(4), batch_size=2)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_samples(), batch_size=4)


EXPECTED_COUNTS = [[3, 1, 0], [0, 3, 1], [1, 0, 3]]  # samples 0, 4, 8 (labels 0, 1, 2) called label + 1


class Recording(ValidationFigures):
    """Records what would be drawn, per rank, instead of drawing (under DDP: to files)."""

    def __init__(self, out: Path | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = out
        self.drawn: list[dict[str, Any]] = []

    def _draw(self, trainer: pl.Trainer, collected: Any) -> None:
        wrong = [torch.cat(parts) for parts in zip(*collected.wrong)] if collected.wrong else None
        self.drawn.append(
            {
                "step": collected.step,
                "counts": None if collected.counts is None else collected.counts.tolist(),
                "wrong_labels": None if wrong is None else wrong[1].tolist(),
                "wrong_predicted": None if wrong is None else wrong[2].tolist(),
            }
        )
        super()._draw(trainer, collected)
        if self.out is not None:
            torch.save(self.drawn, self.out / f"rank{trainer.global_rank}.pt")


def _trainer(tmp_path: Path, callbacks: list, logger: Any = None, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        num_sanity_val_steps=1,
        log_every_n_steps=1,
        logger=logger if logger is not None else TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False),
        **kwargs,
    )


def _images_in_tensorboard(log_dir: str) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"images": 0})
    events.Reload()
    return {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}


def test_draws_every_n_epochs_with_exact_counts_and_bounded_mistakes(tmp_path: Path) -> None:
    figures = Recording(every_n_epochs=2, misclassified=2, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    trainer = _trainer(tmp_path, [figures], max_epochs=4)
    trainer.fit(Scripted(), datamodule=Data())
    # Epochs 1 and 3 (every 2nd; 3 is also the last, drawn once), never the sanity check; 2
    # optimizer steps per epoch.
    assert [d["step"] for d in figures.drawn] == [4, 8]
    for drawn in figures.drawn:
        assert drawn["counts"] == EXPECTED_COUNTS
        assert drawn["wrong_labels"] == [0, 1] and drawn["wrong_predicted"] == [1, 2]  # the first 2 of 3
    assert _images_in_tensorboard(trainer.logger.log_dir) == {
        "val/confusion_matrix": [4, 8],
        "val/misclassified": [4, 8],
    }


class StopAfterValidation(pl.Callback):
    """Stops fit after the validation of ``epoch``, as EarlyStopping does (in on_validation_end)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == self.epoch:
            trainer.should_stop = True


@pytest.mark.parametrize(
    ("limits", "extra", "expected_steps"),
    [
        ({"max_epochs": 3}, [], [6]),  # shorter than every_n_epochs: its last epoch
        ({"max_epochs": 10}, [StopAfterValidation(epoch=1)], [4]),  # stopped after a validation
        # max_steps mid-epoch: no validation at step 3; the last one was at step 2
        ({"max_epochs": 10, "max_steps": 3}, [], [2]),
    ],
    ids=["max_epochs", "stopped-by-a-callback", "max_steps"],
)
def test_the_last_validation_of_fit_is_drawn_once_at_its_step(
    tmp_path: Path, limits: dict[str, int], extra: list, expected_steps: list[int]
) -> None:
    figures = Recording(every_n_epochs=5, misclassified=2)
    trainer = _trainer(tmp_path, [figures, *extra], **limits)
    trainer.fit(Scripted(), datamodule=Data())
    assert [d["step"] for d in figures.drawn] == expected_steps
    assert figures.drawn[0]["counts"] == EXPECTED_COUNTS and figures.drawn[0]["wrong_labels"] == [0, 1]
    assert _images_in_tensorboard(trainer.logger.log_dir) == {
        "val/confusion_matrix": expected_steps,
        "val/misclassified": expected_steps,
    }


@pytest.mark.parametrize("every_n_epochs", [2, 5], ids=["every-n", "last-epoch"])
def test_without_logits_from_validation_step_the_model_runs_again_only_on_drawn_validations(
    tmp_path: Path, every_n_epochs: int
) -> None:
    model = Scripted(return_logits=False)
    figures = Recording(every_n_epochs=every_n_epochs, misclassified=0)
    _trainer(tmp_path, [figures], max_epochs=2, limit_train_batches=1).fit(model, datamodule=Data())
    assert [d["counts"] for d in figures.drawn] == [EXPECTED_COUNTS]
    assert figures.drawn[0]["wrong_labels"] is None  # misclassified=0: no grid
    # forward (training_step does not call it): 1 sanity batch + 2 epochs × 3 validation batches,
    # + 3 by the callback on the one drawn epoch (the 2nd: every 2nd, or the last of max_epochs)
    assert model.forward_calls == 1 + 2 * 3 + 3


def test_switches_confusion_matrix_off(tmp_path: Path) -> None:
    figures = Recording(confusion_matrix=False, misclassified=1)
    trainer = _trainer(tmp_path, [figures], max_epochs=1, limit_train_batches=1)
    trainer.fit(Scripted(), datamodule=Data())
    assert figures.drawn[0]["counts"] is None and figures.drawn[0]["wrong_labels"] == [0]
    assert set(_images_in_tensorboard(trainer.logger.log_dir)) == {"val/misclassified"}


def test_validate_draws_once(tmp_path: Path) -> None:
    figures = Recording(every_n_epochs=10)
    _trainer(tmp_path, [figures]).validate(Scripted(), datamodule=Data())
    assert [d["counts"] for d in figures.drawn] == [EXPECTED_COUNTS]


def test_without_tensorboard_it_warns_once_and_stays_off(tmp_path: Path) -> None:
    figures = Recording()
    with pytest.warns(UserWarning, match="draws into TensorBoard only"):
        _trainer(tmp_path, [figures], logger=CSVLogger(tmp_path), max_epochs=1, limit_train_batches=1).fit(
            Scripted(), datamodule=Data()
        )
    assert figures.drawn == []


def test_without_pillow_it_warns_and_stays_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = module.importlib.util.find_spec
    monkeypatch.setattr(
        module.importlib.util, "find_spec", lambda name: None if name == "PIL" else real_find_spec(name)
    )
    figures = Recording()
    with pytest.warns(UserWarning, match="needs Pillow"):
        _trainer(tmp_path, [figures], max_epochs=1, limit_train_batches=1).fit(Scripted(), datamodule=Data())
    assert figures.drawn == []


class DictBatches(Scripted):
    def validation_step(self, batch, batch_idx: int) -> None:
        self(batch["x"])


class DictData(Data):
    def val_dataloader(self) -> DataLoader:
        return DataLoader([{"x": x, "y": y} for x, y in _samples()], batch_size=4)


def test_batches_that_are_not_images_and_labels_are_skipped_with_one_warning(tmp_path: Path) -> None:
    figures = Recording()
    with pytest.warns(UserWarning, match=r"needs \(images, labels\) tensor batches") as caught:
        trainer = _trainer(tmp_path, [figures], max_epochs=1, limit_train_batches=1)
        trainer.fit(DictBatches(), datamodule=DictData())
    assert sum("tensor batches" in str(w.message) for w in caught) == 1
    assert figures.drawn[0]["counts"] == [] and _images_in_tensorboard(trainer.logger.log_dir) == {}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_sums_counts_over_ranks_and_draws_on_rank_0_only(tmp_path: Path) -> None:
    figures = Recording(out=tmp_path, misclassified=8)
    trainer = _trainer(tmp_path, [figures], max_epochs=1, limit_train_batches=1, strategy="ddp_fork", devices=2)
    trainer.fit(Scripted(), datamodule=Data())
    assert not (tmp_path / "rank1.pt").exists()
    (drawn,) = torch.load(tmp_path / "rank0.pt")
    assert drawn["counts"] == EXPECTED_COUNTS  # 6 samples per rank, summed
    # Rank 0's shard (the sampler gives it samples 0, 2, 4, …): its mistakes are samples 0, 4, 8.
    assert drawn["wrong_labels"] == [0, 1, 2]


# ---------------------------------------------------------------------- the recipe, through the CLI
def test_a_one_epoch_fit_of_the_recipe_shows_both_figures(in_tmp_dir: Path) -> None:
    """The recipe draws every 5 epochs; `lit-accel fit --trainer.max_epochs 1` has its figures too."""
    from lit_accel.cli import LitAccelCLI

    switched_on = ["--trainer.callbacks.init_args.confusion_matrix", "true"]
    switched_on += ["--trainer.callbacks.init_args.misclassified", "32"]
    cli = LitAccelCLI(args=["fit", *TINY_CLI_ARGS, *switched_on, "--trainer.max_epochs", "1"])
    assert cli.trainer.global_step == 1
    log_dir = in_tmp_dir / "runs" / "cifar10" / "version_0"
    assert _images_in_tensorboard(str(log_dir)) == {"val/confusion_matrix": [1], "val/misclassified": [1]}


def test_the_tests_tiny_cli_arguments_switch_the_recipes_figures_off(in_tmp_dir: Path, capsys) -> None:
    """Tests that do not test figures leave them out (the suite's time); the switch names the
    recipe's last callback, so a reordered recipe fails here instead of drawing unnoticed."""
    import yaml

    from lit_accel.cli import LitAccelCLI

    assert TINY_CLI_ARGS[-len(FIGURES_OFF_ARGS) :] == FIGURES_OFF_ARGS
    with pytest.raises(SystemExit):
        LitAccelCLI(args=["fit", *TINY_CLI_ARGS, "--print_config"])
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    (figures,) = [c for c in callbacks if c["class_path"] == "lit_accel.callbacks.ValidationFigures"]
    assert figures["init_args"]["confusion_matrix"] is False and figures["init_args"]["misclassified"] == 0
