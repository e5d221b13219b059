"""PredictionCSVWriter: ``trainer.predict`` results as one CSV file, one row per image."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from typing_extensions import override

__all__ = ["PredictionCSVWriter"]


class PredictionCSVWriter(BasePredictionWriter):
    """Writes each predicted image's class, its probability and the runner-up classes to a CSV file.

    ``predict_step`` must return class probabilities ``(N, num_classes)`` (or logits, with
    ``softmax: true``). The batch says what each row is about:

    * ``(images, names)`` with ``names`` a list of strings (lit_accel's ``data.predict_dir``:
      file paths relative to the folder) → columns ``file, predicted, probability, top2,
      top2_probability, …``;
    * ``(images, labels)`` with integer labels (a labelled split, e.g. the test set) → columns
      ``index, label, predicted, probability, …`` with ``index`` the sample's position in the
      data set;
    * anything else → ``index, predicted, probability, …``.

    Class names come from ``class_names``, else the LightningModule's ``class_names`` attribute
    (the names it was trained with; lit_accel's ImageClassifier keeps them in its checkpoints),
    else the datamodule's ``classes`` attribute, else the class indices. Probabilities are
    written with 6 decimals. Rows are sorted by file name (or index). A file or class name that
    starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is written with a ``'`` in
    front, so a spreadsheet shows it instead of running it as a formula (:func:`spreadsheet_safe`).

    Each rank streams its rows to ``<output_path>.rank<R>.part``; at the end of ``predict`` the
    ranks meet at a barrier and rank 0 merges the parts into ``output_path`` and deletes them. With
    several machines, ``output_path`` must be on a file system they share. SIGTERM stops the predict
    after the current batch (Lightning's predict loop would run on); a predict stopped by an error,
    Ctrl-C or SIGTERM deletes its part files and leaves ``output_path`` as it was.

    Args:
        output_path: the CSV file to write (folders are created). An existing file is replaced in
            one rename when the new one is complete, and kept when nothing was predicted.
        top_k: classes listed per image, best first (the first is ``predicted``); at most the
            number of classes.
        class_names: names for the class indices; default: the module's ``class_names``, else the
            datamodule's ``classes``.
        softmax: apply a softmax to the predictions first (for a ``predict_step`` that returns
            logits).

    Logged keys: none (it writes a file and tells its path with ``rank_zero_info``). After
    ``predict``, ``predictions_written`` holds the number of rows written on rank 0 (0: the file
    was left as it was).

    Raises:
        ValueError: for ``top_k`` not an integer ≥ 1, an empty ``output_path``, ``class_names``
            not a list of strings, or a non-bool ``softmax``.

    Example::

        trainer:
          callbacks:
            - class_path: lit_accel.callbacks.PredictionCSVWriter
              init_args:
                output_path: predictions.csv
                top_k: 3
    """

    def __init__(
        self,
        output_path: str = "predictions.csv",
        top_k: int = 3,
        class_names: list[str] | None = None,
        softmax: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        if not isinstance(output_path, str) or not output_path.strip():
            raise ValueError(f"output_path={output_path!r} is not allowed: use a file path such as 'predictions.csv'")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k={top_k!r} is not allowed: use 1 or more classes (an integer)")
        if class_names is not None and (
            not isinstance(class_names, (list, tuple)) or not all(isinstance(n, str) for n in class_names)
        ):
            raise ValueError(f"class_names={class_names!r} is not allowed: use a list of names, one per class")
        if not isinstance(softmax, bool):
            raise ValueError(f"softmax={softmax!r} is not allowed: use true or false")
        self.output_path = output_path
        self.top_k = top_k
        self.class_names = list(class_names) if class_names is not None else None
        self.softmax = softmax
        self._part: Any = None
        self._csv: Any = None
        self._names: list[str] | None = None
        self._names_checked = False
        self._rows_written = 0
        self.predictions_written: int | None = None  # rows of the last merged file (rank 0); None before

    # ------------------------------------------------------------------------------------ hooks
    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = os.path.dirname(os.path.abspath(self.output_path))
        os.makedirs(folder, exist_ok=True)
        self._names, self._names_checked = None, False
        self._rows_written = 0
        self.predictions_written = None
        # Open across hooks: closed in on_predict_end or on_exception (_close_part), so no `with` block.
        self._part = open(_part_path(self.output_path, trainer.global_rank), "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._csv = csv.writer(self._part)

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        # is_last_batch: set by the predict loop on its _BatchProgress (typed as the base _Progress).
        last = getattr(trainer.predict_loop.batch_progress, "is_last_batch", False)
        if trainer.received_sigterm and not last:
            # Lightning's predict loop, unlike its validation loop, runs on after SIGTERM until the
            # scheduler's SIGKILL; stop here instead, where on_exception can clean up.
            raise SIGTERMException
        if self._csv is None or not isinstance(prediction, Tensor) or prediction.ndim != 2:
            return
        count = prediction.shape[0]
        if count == 0:  # every file of the batch was unreadable (and already reported)
            return
        probabilities = prediction.detach().float()
        if self.softmax:
            probabilities = torch.softmax(probabilities, dim=-1)
        names = self._class_names(trainer, pl_module, probabilities.shape[1])
        ids, labels = _row_ids(batch, batch_indices, count, first=self._rows_written)
        if self._rows_written == 0:
            k = min(self.top_k, len(names))
            self._csv.writerow(header(ids_are_files=isinstance(ids[0], str), with_labels=labels is not None, k=k))
        self._csv.writerows(format_rows(ids, probabilities.cpu(), names, self.top_k, labels))
        self._rows_written += count

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_part()
        # Every rank reaches this hook once, so the barrier cannot leave one rank waiting.
        trainer.strategy.barrier("PredictionCSVWriter.merge")
        if trainer.is_global_zero:
            parts = [_part_path(self.output_path, rank) for rank in range(trainer.world_size)]
            self.predictions_written = merge_parts(parts, self.output_path)
            where = os.path.abspath(self.output_path)
            if self.predictions_written:
                rank_zero_info(f"PredictionCSVWriter: wrote {self.predictions_written} predictions to {where}")
            else:
                rank_zero_warn(
                    f"PredictionCSVWriter: nothing was predicted, so {where} was not written (an existing file is kept)"
                )

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # An error, Ctrl-C or SIGTERM mid-predict: this rank's rows are an unfinished piece of a file
        # no one asked for; output_path, untouched until the merge, keeps the user's previous CSV.
        self._close_part()
        part = _part_path(self.output_path, trainer.global_rank)
        if os.path.exists(part):
            os.remove(part)

    def _close_part(self) -> None:
        if self._part is not None:
            self._part.close()
            self._part, self._csv = None, None

    def _class_names(self, trainer: pl.Trainer, pl_module: pl.LightningModule, num_classes: int) -> list[str]:
        if self._names is not None and len(self._names) == num_classes:
            return self._names
        candidate = self.class_names
        source = "class_names"
        if candidate is None:
            candidate = getattr(pl_module, "class_names", None)
            source = "the module's class_names"
        if candidate is None:
            candidate = getattr(trainer.datamodule, "classes", None)  # type: ignore[attr-defined]  # set by a Lightning connector, undeclared
            source = "the datamodule's classes"
        names = [str(i) for i in range(num_classes)]
        if candidate is not None:
            if len(candidate) == num_classes:
                names = [str(name) for name in candidate]
            elif not self._names_checked:
                rank_zero_warn(
                    f"PredictionCSVWriter: {source} has {len(candidate)} names but the predictions have "
                    f"{num_classes} classes; writing class indices instead."
                )
        self._names_checked = True
        self._names = names
        return names


# ----------------------------------------------------------------------------- pure functions
def header(ids_are_files: bool, with_labels: bool, k: int) -> list[str]:
    """The CSV's column names."""
    columns = ["file" if ids_are_files else "index"]
    if with_labels:
        columns.append("label")
    columns += ["predicted", "probability"]
    for rank in range(2, k + 1):
        columns += [f"top{rank}", f"top{rank}_probability"]
    return columns


def format_rows(
    ids: Sequence[str | int],
    probabilities: Tensor,
    class_names: Sequence[str],
    top_k: int,
    labels: Sequence[int] | None = None,
) -> list[list[str]]:
    """One CSV row per sample: id, [true label], then the ``top_k`` classes with their probabilities."""
    k = min(top_k, probabilities.shape[1])
    values, indices = probabilities.topk(k, dim=1)
    rows = []
    for i, sample_id in enumerate(ids):
        row = [spreadsheet_safe(sample_id) if isinstance(sample_id, str) else str(sample_id)]
        if labels is not None:
            row.append(spreadsheet_safe(_name(class_names, int(labels[i]))))
        for value, index in zip(values[i].tolist(), indices[i].tolist()):
            row += [spreadsheet_safe(_name(class_names, index)), f"{value:.6f}"]
        rows.append(row)
    return rows


# A cell starting with one of these is a formula to a spreadsheet (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """``text`` with a ``'`` in front when it starts like a formula, so a spreadsheet shows it as text.

    File and class names come from users: a class called ``=HYPERLINK(…)`` must not run when the
    CSV is opened (OWASP's rule for CSV injection). Other text is returned as it is.

    Example::

        spreadsheet_safe("=1+1")  # "'=1+1"
        spreadsheet_safe("cat")  # "cat"
    """
    return f"'{text}" if text.startswith(FORMULA_STARTS) else text


def merge_parts(parts: Sequence[str], output_path: str) -> int:
    """Concatenate the ranks' part files into ``output_path`` (one header, rows sorted); returns the row count.

    Each part starts with its header row (an empty part has none). Rows are sorted by their first
    column: by name for files, numerically for indices. ``output_path`` is replaced in one rename,
    and only when there is at least one row: with none, an existing file is left untouched. Part
    files are deleted afterwards; a missing part counts as empty. When writing or renaming fails,
    the temporary file is removed and the parts are kept.
    """
    columns: list[str] | None = None
    rows: list[list[str]] = []
    for part in parts:
        if not os.path.exists(part):
            continue
        with open(part, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            part_columns = next(reader, None)
            if part_columns is None:
                continue
            if columns is not None and part_columns != columns:
                raise RuntimeError(f"{part} has columns {part_columns}, other ranks wrote {columns}")
            columns = part_columns
            rows.extend(reader)
    by_index = columns is not None and columns[0] == "index"
    rows.sort(key=(lambda row: int(row[0])) if by_index else (lambda row: row[0]))
    if rows and columns is not None:
        # A temporary file beside the target, renamed over it at once: a reader never sees a
        # half-written file, and a failure leaves the previous one as it was.
        temporary = f"{output_path}.tmp-{os.getpid()}"
        try:
            with open(temporary, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(columns)
                writer.writerows(rows)
            os.replace(temporary, output_path)
        except BaseException:
            # e.g. output_path is a folder, or the disk is full: the rows stay in the part files.
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
    for part in parts:
        if os.path.exists(part):
            os.remove(part)
    return len(rows)


def _row_ids(
    batch: Any, batch_indices: Sequence[int] | None, count: int, first: int = 0
) -> tuple[list[Any], list[int] | None]:
    """What each row is about: ``(file names or data set indices, true labels or None)``."""
    second = batch[1] if isinstance(batch, (tuple, list)) and len(batch) >= 2 else None
    if isinstance(second, (list, tuple)) and len(second) == count and all(isinstance(x, str) for x in second):
        return list(second), None
    labels = None
    if isinstance(second, Tensor) and second.ndim == 1 and second.shape[0] == count and not second.is_floating_point():
        labels = second.tolist()
    if batch_indices is not None and len(batch_indices) == count:
        return list(batch_indices), labels
    # Without the sampler's indices (e.g. an iterable data set) rows are numbered in this rank's order.
    return list(range(first, first + count)), labels


def _name(class_names: Sequence[str], index: int) -> str:
    return class_names[index] if 0 <= index < len(class_names) else str(index)


def _part_path(output_path: str, rank: int) -> str:
    return f"{output_path}.rank{rank}.part"
