"""Per-case scores of a method from `usema evaluate`'s per-case CSV (or its JSON, with the CSV beside it)."""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from usema.errors import UsemaError
from usema.io.files import read_input_text

METRICS = ("dsc", "nsd", "instance_f1")
MAX_CSV_BYTES = 512 << 20


@dataclass
class CaseScores:
    """One evaluation: per case the protocol's case score, and per (case, class) the class score."""

    source: Path
    overall: dict[str, float]
    per_class: dict[str, dict[str, float]]


def csv_for(path: Path) -> Path:
    """The per-case CSV of an evaluation given as its .csv or its .json summary."""
    if path.suffix.lower() == ".json":
        return path.with_suffix(".csv")
    if path.suffix.lower() == ".csv":
        return path
    raise UsemaError(f"{path}: expected an evaluation .json or .csv file (the output of `usema evaluate`)")


def read_scores(path: str | Path, metric: str) -> CaseScores:
    """Case and class scores of ``metric`` from an evaluation file; a case's score is the mean of its rows
    (the classes its protocol scored for it), so each protocol's own case definition carries over."""
    source = csv_for(Path(path))
    if not os.path.lexists(source):
        raise UsemaError(f"{source}: expected the per-case CSV written by `usema evaluate`")
    text = read_input_text(source, MAX_CSV_BYTES, what="evaluation CSV")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or not {"case", "class_name", metric} <= set(reader.fieldnames):
        raise UsemaError(f"{source}: expected the columns case, class_name and {metric} (`usema evaluate` output)")
    rows = list(reader)
    per_class: dict[str, dict[str, float]] = {}
    by_case: dict[str, list[float]] = {}
    for line, row in enumerate(rows, start=2):
        value = _number(row[metric], source, line, metric)
        if value is None:
            continue
        per_class.setdefault(row["class_name"], {})[row["case"]] = value
        by_case.setdefault(row["case"], []).append(value)
    if not by_case:
        raise UsemaError(f"{source}: expected at least one case with a {metric} value")
    return CaseScores(source, {case: float(np.mean(v)) for case, v in by_case.items()}, per_class)


def _number(text: str, source: Path, line: int, metric: str) -> float | None:
    """A finite score, None for an empty / NaN cell (not scored for that case)."""
    if text is None or text.strip() in ("", "nan", "NaN"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsemaError(f"{source}: line {line}: {metric}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        return None
    return value
