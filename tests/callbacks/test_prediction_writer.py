"""PredictionCSVWriter: CSV rows from pure functions, real Trainer.predict runs, and 2-process DDP."""

from __future__ import annotations

import copy
import csv
import os
import pickle
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_accel.callbacks.prediction_writer import (
    PredictionCSVWriter,
    format_rows,
    header,
    merge_parts,
    spreadsheet_safe,
)

NAMES = ["cat", "dog", "fox"]


# ---------------------------------------------------------------------- pure functions
def test_header() -> None:
    assert header(ids_are_files=True, with_labels=False, k=1) == ["file", "predicted", "probability"]
    assert header(ids_are_files=False, with_labels=True, k=2) == [
        "index",
        "label",
        "predicted",
        "probability",
        "top2",
        "top2_probability",
    ]


def test_format_rows_lists_the_top_k_best_first() -> None:
    probabilities = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    rows = format_rows(["x.png", "y.png"], probabilities, NAMES, top_k=2)
    assert rows == [["x.png", "dog", "0.700000", "fox", "0.200000"], ["y.png", "cat", "0.500000", "fox", "0.300000"]]
    # top_k beyond the number of classes lists them all; labels become names; unknown indices stay numbers
    rows = format_rows([7], probabilities[:1], NAMES, top_k=10, labels=[2])
    assert rows == [["7", "fox", "dog", "0.700000", "fox", "0.200000", "cat", "0.100000"]]
    assert format_rows([0], probabilities[:1], ["only"], top_k=1) == [["0", "1", "0.700000"]]


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_a_cell_that_starts_like_a_formula_gets_a_quote_in_front(start: str) -> None:
    assert spreadsheet_safe(f"{start}HYPERLINK(1)") == f"'{start}HYPERLINK(1)"


def test_file_and_class_names_are_written_spreadsheet_safe_and_numbers_as_they_are() -> None:
    """OWASP's CSV-injection rule for the names a user chose; probabilities and indices are ours."""
    names = ['=HYPERLINK("http://x","y")', "+cmd", "cat is-ok"]
    probabilities = torch.tensor([[0.7, 0.2, 0.1]])
    assert format_rows(["@a.png"], probabilities, names, top_k=3) == [
        ["'@a.png", """'=HYPERLINK("http://x","y")""", "0.700000", "'+cmd", "0.200000", "cat is-ok", "0.100000"]
    ]
    assert format_rows([3], probabilities, names, top_k=1, labels=[1]) == [
        ["3", "'+cmd", """'=HYPERLINK("http://x","y")""", "0.700000"]
    ]


def test_merge_parts_sorts_rows_keeps_one_header_and_removes_parts(tmp_path: Path) -> None:
    columns = ["index", "predicted", "probability"]
    parts = [tmp_path / "p.csv.rank0.part", tmp_path / "p.csv.rank1.part", tmp_path / "p.csv.rank2.part"]
    _write(parts[0], [columns, ["10", "cat", "0.5"], ["2", "dog", "0.6"]])
    _write(parts[1], [columns, ["1", "fox", "0.7"]])  # rank 2 wrote nothing: no file
    assert merge_parts([str(p) for p in parts], str(tmp_path / "p.csv")) == 3
    assert _read(tmp_path / "p.csv") == [columns, ["1", "fox", "0.7"], ["2", "dog", "0.6"], ["10", "cat", "0.5"]]
    assert not any(p.exists() for p in parts)


def test_merge_parts_with_no_rows_keeps_the_existing_file(tmp_path: Path) -> None:
    kept = [["file", "predicted", "probability"], ["x.png", "cat", "0.9"]]
    _write(tmp_path / "keep.csv", kept)
    parts = [tmp_path / "keep.csv.rank0.part", tmp_path / "keep.csv.rank1.part"]
    _write(parts[0], [])  # a rank whose files were all unreadable: an empty part
    assert merge_parts([str(p) for p in parts], str(tmp_path / "keep.csv")) == 0
    assert _read(tmp_path / "keep.csv") == kept
    assert not any(p.exists() for p in parts) and sorted(p.name for p in tmp_path.iterdir()) == ["keep.csv"]


def test_merge_parts_replaces_the_file_in_one_rename(tmp_path: Path, monkeypatch) -> None:
    """A failure while writing leaves the previous file whole (the new rows go to a temporary file)."""
    import lit_accel.callbacks.prediction_writer as writer

    kept = [["index", "predicted", "probability"], ["0", "cat", "0.9"]]
    _write(tmp_path / "p.csv", kept)
    _write(tmp_path / "p.csv.rank0.part", [kept[0], ["1", "dog", "0.8"]])

    def failing_replace(source: str, target: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(writer.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        merge_parts([str(tmp_path / "p.csv.rank0.part")], str(tmp_path / "p.csv"))
    assert _read(tmp_path / "p.csv") == kept


def test_a_failed_rename_removes_the_temporary_file_and_keeps_the_parts(tmp_path: Path) -> None:
    """output_path an existing folder: os.replace fails; no ``.tmp-<pid>`` file is left behind, and
    the rows stay in the part file."""
    (tmp_path / "out").mkdir()
    part = tmp_path / "out.rank0.part"
    rows = [["index", "predicted", "probability"], ["0", "cat", "0.9"]]
    _write(part, rows)
    with pytest.raises(OSError):
        merge_parts([str(part)], str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.rank0.part"]
    assert _read(part) == rows and not any((tmp_path / "out").iterdir())


def test_merge_parts_refuses_ranks_that_disagree_on_columns(tmp_path: Path) -> None:
    _write(tmp_path / "a", [["file", "predicted", "probability"]])
    _write(tmp_path / "b", [["index", "predicted", "probability"]])
    with pytest.raises(RuntimeError, match="other ranks wrote"):
        merge_parts([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out.csv"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 0}, r"top_k=0 is not allowed: use 1 or more"),
        ({"output_path": ""}, r"output_path='' is not allowed"),
        ({"output_path": "   "}, r"output_path='   ' is not allowed"),
        ({"top_k": 2.5}, r"top_k=2.5 is not allowed"),
        ({"top_k": True}, r"top_k=True is not allowed"),
        ({"class_names": "abc"}, r"class_names='abc' is not allowed: use a list of names"),
        ({"softmax": "yes"}, r"softmax='yes' is not allowed: use true or false"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PredictionCSVWriter(**kwargs)


def test_holds_no_state_and_pickles() -> None:
    writer = PredictionCSVWriter(output_path="x.csv", top_k=2, class_names=NAMES)
    assert writer.state_dict() == {}
    clone = pickle.loads(pickle.dumps(copy.deepcopy(writer)))
    assert (clone.output_path, clone.top_k, clone.class_names) == ("x.csv", 2, NAMES)


# ---------------------------------------------------------------------- real Trainer runs
class Scripted(pl.LightningModule):
    """A model that is not lit_accel's: sample i gets the fixed scores SCORES[i % 4]."""

    SCORES = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3], [0.34, 0.33, 0.33]])

    def __init__(self, logits: bool = False) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.logits = logits

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        ids = batch[2]
        scores = self.SCORES[ids % 4] + 0 * self.anchor
        return scores.log() if self.logits else scores


class Samples(Dataset):
    """Item i: (image, file name or label, i). Names 'img_07.png'; labels i % 3."""

    def __init__(self, count: int, named: bool) -> None:
        self.count, self.named = count, named

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        second = f"img_{i:02d}.png" if self.named else i % 3
        return torch.zeros(3, 4, 4), second, i


class Data(pl.LightningDataModule):
    def __init__(self, count: int = 10, named: bool = True, classes: list[str] | None = None) -> None:
        super().__init__()
        self.count, self.named = count, named
        if classes is not None:
            self.classes = classes

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(Samples(self.count, self.named), batch_size=4)


def _predict(
    tmp_path: Path,
    writer: PredictionCSVWriter,
    model: pl.LightningModule,
    data: pl.LightningDataModule,
    **trainer_kwargs,
) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[writer],
        **trainer_kwargs,
    )
    trainer.predict(model, datamodule=data, return_predictions=False)


def _expected_rows(ids: list[str], top_k: int, names: list[str] = NAMES, labels: bool = False) -> list[list[str]]:
    rows = []
    for i, sample_id in enumerate(ids):
        scores = Scripted.SCORES[i % 4]
        values, indices = scores.topk(top_k)
        row = [sample_id] + ([names[i % 3]] if labels else [])
        for v, c in zip(values.tolist(), indices.tolist()):
            row += [names[c], f"{v:.6f}"]
        rows.append(row)
    return rows


def test_named_batches_write_one_row_per_file_with_the_datamodules_class_names(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "folder" / "predictions.csv"
    _predict(tmp_path, PredictionCSVWriter(str(out), top_k=2), Scripted(), Data(10, named=True, classes=NAMES))
    rows = _read(out)
    assert rows[0] == ["file", "predicted", "probability", "top2", "top2_probability"]
    assert rows[1:] == _expected_rows([f"img_{i:02d}.png" for i in range(10)], top_k=2)
    assert not list(out.parent.glob("*.part"))


def test_labelled_batches_write_index_and_label_and_logits_can_be_softmaxed(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    writer = PredictionCSVWriter(str(out), top_k=1, class_names=["a", "b", "c"], softmax=True)
    _predict(tmp_path, writer, Scripted(logits=True), Data(6, named=False))
    rows = _read(out)
    assert rows[0] == ["index", "label", "predicted", "probability"]
    assert rows[1:] == _expected_rows([str(i) for i in range(6)], top_k=1, names=["a", "b", "c"], labels=True)


def test_class_names_of_the_wrong_length_fall_back_to_indices_with_a_warning(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    with pytest.warns(UserWarning, match="has 2 names but the predictions have 3 classes"):
        _predict(tmp_path, PredictionCSVWriter(str(out), top_k=1), Scripted(), Data(2, classes=["x", "y"]))
    assert _read(out)[1:] == [["img_00.png", "0", "0.600000"], ["img_01.png", "2", "0.800000"]]


def test_a_second_predict_replaces_the_file(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    writer = PredictionCSVWriter(str(out), top_k=1)
    _predict(tmp_path, writer, Scripted(), Data(10))
    _predict(tmp_path, writer, Scripted(), Data(3))
    assert len(_read(out)) == 4


class StoppedAtSecondBatch(Scripted):
    """Predicts the first batch, then is stopped: an error, Ctrl-C (KeyboardInterrupt) or SIGTERM."""

    def __init__(self, stop: str) -> None:
        super().__init__()
        self.stop = stop

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        if batch_idx == 1 and self.stop == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler, in place while predicting, notes it
        elif batch_idx == 1:
            raise {"error": RuntimeError, "Ctrl-C": KeyboardInterrupt}[self.stop]("stopped mid-predict")
        return super().predict_step(batch, batch_idx)


@pytest.mark.parametrize("stop", ["error", "Ctrl-C", "SIGTERM"])
def test_a_stopped_predict_removes_its_part_file_and_keeps_the_previous_csv(tmp_path: Path, stop: str) -> None:
    """10 samples in 3 batches, stopped at the second: nothing of it is left, the older CSV is kept."""
    out = tmp_path / "p.csv"
    out.write_text("the user's older predictions\n")
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C while it shuts down after one
    # Lightning exits (status 1) after a KeyboardInterrupt, re-raises anything else.
    raised = {"error": RuntimeError, "Ctrl-C": SystemExit, "SIGTERM": SIGTERMException}[stop]
    try:
        with pytest.raises(raised):
            _predict(tmp_path, PredictionCSVWriter(str(out), top_k=1), StoppedAtSecondBatch(stop), Data(10))
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]
    assert out.read_text() == "the user's older predictions\n"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_ranks_write_one_merged_sorted_file(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    _predict(
        tmp_path,
        PredictionCSVWriter(str(out), top_k=3),
        Scripted(),
        Data(11, classes=NAMES),
        strategy="ddp_fork",
        devices=2,
    )
    rows = _read(out)
    # 11 files over 2 ranks (6 + 5, Lightning's predict sampler repeats none): each exactly once.
    assert rows[1:] == _expected_rows([f"img_{i:02d}.png" for i in range(11)], top_k=3)
    assert not list(tmp_path.glob("*.part"))


def _write(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _read(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))
