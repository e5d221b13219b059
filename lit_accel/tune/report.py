"""What ``lit-accel tune`` prints and writes: the table of trials and the tuned YAML."""

from __future__ import annotations

import json
from typing import Any

from lit_accel.measure import cell, markdown_table, median
from lit_accel.tune.levers import Setting, combine
from lit_accel.tune.search import Measured, Report

__all__ = ["table", "tuned_yaml"]

COLUMNS = [
    "lever",
    "setting",
    "images/s (median):",
    "ratio to the recipe:",
    "data wait:",
    "peak memory MB (the trial's own):",
    "changes training",
    "trials:",
]


def table(report: Report) -> str:
    """The trials as a Markdown table: a row for the recipe, each setting and the combined winners."""
    rows: list[tuple[str, str, Measured, bool]] = [("recipe", "as configured", report.baseline, False)]
    rows += [(s.lever, s.name, m, s.changes_training) for s, m in report.settings]
    if report.combined is not None:
        chosen = report.chosen
        name = " + ".join(s.name for s in chosen) if len(chosen) > 1 else "(slower than the best single setting)"
        rows.append(("combined", name, report.combined, any(s.changes_training for s in chosen)))
    not_measured = {id(s) for s in report.not_measured}
    skipped = {id(m) for s, m in report.settings if id(s) in not_measured}
    cells = []
    for lever, name, m, changes in rows:
        if m.error is not None:
            figures = ["failed: " + m.error, "—", "—", "—"]
        elif not m.images_per_sec:
            figures = ["not measured (budget)" if id(m) in skipped else "—", "—", "—", "—"]
        else:
            figures = [
                cell(median(m.images_per_sec)),
                cell(m.ratio if m.ratios else 1.0, "{:.3f}"),
                cell(median(m.data_wait), "{:.1%}"),
                cell(median(m.peak_memory_mb)),
            ]
        cells.append([lever, name, *figures, "yes" if changes else "no", str(len(m.images_per_sec))])
    return markdown_table(COLUMNS, cells)


def tuned_yaml(report: Report, command: str) -> str:
    """The YAML of the chosen settings, with a comment per entry saying what it changes."""
    chosen: list[Setting] = report.chosen
    lines = [
        "# Written by `lit-accel tune`, measured on this machine:",
        f"#   {command}",
        "# Use it after your own configs: lit-accel fit --config <yours> --config <this file>",
    ]
    if not chosen:
        lines.append("# No lever was faster than the recipe by the required margin: nothing to change.")
        lines.append("{}")
        return "\n".join(lines) + "\n"
    notes: dict[str, str] = {}
    for setting in chosen:
        effect = "CHANGES WHAT IS LEARNED" if setting.changes_training else "training unchanged"
        for key in setting.yaml:
            notes[key] = f"{setting.lever}: {setting.name}, x{report.measured(setting).ratio:.3f} images/s ({effect})"
    if {"ddp", "batch_size"} <= {s.lever for s in chosen}:
        notes["data.batch_size"] = "per process: the batch_size lever's batch split over the ddp processes"
    nested: dict[str, Any] = {}
    for key, value in combine(chosen).yaml.items():  # several levers' winners as they were measured together
        node = nested
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    lines += _yaml_lines(nested, notes, "", 0)
    return "\n".join(lines) + "\n"


def _yaml_lines(node: dict[str, Any], notes: dict[str, str], prefix: str, indent: int) -> list[str]:
    out = []
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.append(" " * indent + f"{key}:")
            out += _yaml_lines(value, notes, dotted + ".", indent + 2)
        else:
            out.append(" " * indent + f"{key}: {json.dumps(value)}  # {notes[dotted]}")  # JSON scalars are YAML
    return out
