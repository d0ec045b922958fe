"""Score a folder of predictions against a folder of references under one protocol, case by case.

Cases are matched by name with the format suffix removed (``CASE.nii.gz`` in both folders; for the cell
protocol the references are ``CASE_label.tiff`` instance masks). A reference with no prediction is an error
naming the cases, unless ``missing_as_empty``: then it is scored as an empty prediction and flagged.
Predictions without a reference are ignored and listed in the summary.
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from usema.errors import UsemaError
from usema.evaluation import cells, protocols, scoring
from usema.evaluation.reading import (
    INSTANCE_SUFFIXES,
    LabelMap,
    check_label_values,
    check_same_grid,
    empty_like,
    labels_found,
    match_cases,
    read_labels,
    squeezed,
)
from usema.evaluation.results import summarize

DEFAULT_TOLERANCE_MM = 2.0  # Endovis' 2 pixels at spacing 1; the generic default


def resolve_tolerances(labels: Mapping[int, str], nsd_tolerance_mm: float | Mapping[str, float]) -> dict[int, float]:
    """Generic protocol: NSD tolerance (mm) per label value, from a scalar or ``{class name or "default": mm}``."""
    if isinstance(nsd_tolerance_mm, Mapping):
        explicit = {str(k).lower(): float(v) for k, v in nsd_tolerance_mm.items()}
        fallback = explicit.get("default", DEFAULT_TOLERANCE_MM)
    else:
        explicit, fallback = {}, float(nsd_tolerance_mm)
    tolerances = {}
    for value, name in labels.items():
        tol = explicit.get(name.lower(), fallback)
        if not math.isfinite(tol) or tol < 0:
            raise UsemaError(f"nsd_tolerance_mm: expected a finite tolerance >= 0 mm for {name!r}, got {tol}")
        tolerances[value] = tol
    return tolerances


@dataclass(frozen=True)
class CaseTask:
    """Everything needed to score one case (picklable, for worker processes)."""

    case: str
    pred_path: Path | None
    truth_path: Path
    protocol: str
    labels: Mapping[int, str]
    tolerances: Mapping[int, float] = field(default_factory=dict)
    instance_f1: bool = False
    interior_label: int = 1


def _read_pair(task: CaseTask) -> tuple[LabelMap, LabelMap]:
    truth = read_labels(task.truth_path)
    if task.protocol != "neurips_cell":  # instance ids are not classes
        check_label_values(truth.array, task.labels, task.truth_path)
    if task.pred_path is None:
        return empty_like(truth), truth
    pred = read_labels(task.pred_path)
    check_same_grid(pred, truth, task.case)
    check_label_values(pred.array, task.labels, task.pred_path)
    return pred, truth


def _cell_row(truth: LabelMap, pred: LabelMap, interior_label: int) -> dict:
    truth, pred = squeezed(truth), squeezed(pred)
    if truth.array.ndim != 2:
        raise UsemaError(f"the neurips_cell protocol scores 2D images, got shape {truth.array.shape}")
    counts = cells.cell_counts(truth.array, pred.array, interior_label)
    return {"class_id": interior_label, "class_name": "cell", **instance_columns(counts)}


def instance_columns(counts: cells.CellCounts) -> dict:
    """The CSV's instance columns for one image."""
    return {
        "instance_f1": counts.f1, "instance_precision": counts.precision, "instance_recall": counts.recall,
        "instance_tp": counts.tp, "instance_fp": counts.n_pred - counts.tp, "instance_fn": counts.n_true - counts.tp,
        "instance_true": counts.n_true, "instance_pred": counts.n_pred,
    }  # fmt: skip


def _generic_rows(truth: LabelMap, pred: LabelMap, task: CaseTask) -> list[dict]:
    from usema.evaluation import metrics  # noqa: PLC0415 - MONAI-backed, only the generic protocol needs it

    truth, pred = squeezed(truth), squeezed(pred)
    if truth.array.ndim not in (2, 3):
        raise UsemaError(f"{task.truth_path}: expected a 2D or 3D label image, got shape {truth.array.shape}")
    rows = scoring.score_generic(truth.array, pred.array, truth.spacing, task.labels, task.tolerances)
    if task.instance_f1:
        scores = metrics.instance_f1(pred.array, truth.array, task.interior_label)
        counts = cells.CellCounts(scores.tp, scores.tp + scores.fn, scores.tp + scores.fp)
        for row in rows:
            if row["class_id"] == task.interior_label:
                row.update(instance_columns(counts))
    return rows


def score_case(task: CaseTask) -> list[dict]:
    """Read, check and score one case: its CSV rows."""
    pred, truth = _read_pair(task)
    if task.protocol == "neurips_cell":
        rows = [_cell_row(truth, pred, task.interior_label)]
    elif task.protocol in protocols.ABDOMEN_PROTOCOLS:
        rows = scoring.score_abdomen(truth.array, pred.array, truth.spacing)
    elif task.protocol == "endovis17":
        rows = scoring.score_endovis_frame(squeezed(truth).array, squeezed(pred).array, task.labels)
    else:
        rows = _generic_rows(truth, pred, task)
    missing = int(task.pred_path is None)
    return [{"case": task.case, **row, "missing_prediction": missing} for row in rows]


def _single_thread_worker() -> None:
    # each worker process scores one case at a time; intra-op threads would oversubscribe the cores
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)


def map_cases(tasks: list[CaseTask], workers: int) -> Iterator[list[dict]]:
    """``score_case`` over the tasks, in order; ``workers`` > 1 uses that many processes."""
    if workers <= 1:
        yield from map(score_case, tasks)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_single_thread_worker) as pool:
        yield from pool.map(score_case, tasks)


def protocol_labels(
    protocol: str, labels: Mapping[int, str] | None, source: str, found: Callable[[], dict[int, str]]
) -> dict[int, str]:
    """The classes a protocol scores (background excluded): its own table, or the given / found labels."""
    if protocol in protocols.ABDOMEN_PROTOCOLS:
        if labels is not None:
            protocols.check_flare22_order(labels, source)
        return {o.index: o.name for o in protocols.FLARE22_ORGANS}
    if protocol == "neurips_cell" and labels is None:
        return {1: "interior", 2: "boundary"}
    chosen = {int(v): str(n) for v, n in (labels if labels is not None else found()).items() if int(v) != 0}
    if not chosen:
        raise UsemaError(f"{source}: no foreground classes to evaluate (no labels given and none found)")
    return chosen


@dataclass
class EvaluationResult:
    """Per-case rows (CSV) and the summary (JSON)."""

    rows: list[dict]
    summary: dict


def evaluate_folders(
    pred_dir: str | Path,
    truth_dir: str | Path,
    labels: Mapping[int, str] | None = None,
    nsd_tolerance_mm: float | Mapping[str, float] = DEFAULT_TOLERANCE_MM,
    instance_f1: bool = False,
    interior_label: int = 1,
    missing_as_empty: bool = False,
    protocol: str = "generic",
    labels_source: str = "labels",
    workers: int = 1,
    progress: Callable[[Iterator, int], Iterable] | None = None,
) -> EvaluationResult:
    """Score every reference case in ``truth_dir`` against the same-named prediction in ``pred_dir``.

    ``protocol``: one of ``protocols.PROTOCOLS``; for ``neurips_cell`` ``truth_dir`` holds the instance masks.
    ``labels``: label value -> class name (background 0 is never scored); None = dataset defaults / values found.
    ``nsd_tolerance_mm``, ``instance_f1``: generic protocol only (see :func:`resolve_tolerances`).
    ``workers``: processes scoring cases in parallel (1 = in this process).
    ``progress``: optional wrapper over the per-case results iterator and its length (e.g. ``tqdm``).
    """
    if protocol not in protocols.PROTOCOLS:
        raise UsemaError(f"protocol: expected one of {', '.join(protocols.PROTOCOLS)}, got {protocol!r}")
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    suffixes = INSTANCE_SUFFIXES if protocol == "neurips_cell" else None
    cases, extra = match_cases(pred_dir, truth_dir, missing_as_empty, *([suffixes] if suffixes else []))
    classes = protocol_labels(
        protocol, labels, labels_source,
        lambda: labels_found([p for _, pred, truth in cases for p in (pred, truth) if p is not None]),
    )  # fmt: skip
    if protocol == "generic" and instance_f1 and interior_label not in classes:
        raise UsemaError(f"interior_label: {interior_label} is not among the classes {sorted(classes)}")
    tolerances = resolve_tolerances(classes, nsd_tolerance_mm) if protocol == "generic" else {}
    tasks = [
        CaseTask(case, pred, truth, protocol, classes, tolerances, instance_f1, interior_label)
        for case, pred, truth in cases
    ]
    results = map_cases(tasks, workers)
    rows = [row for case_rows in (progress(results, len(tasks)) if progress else results) for row in case_rows]
    missing = [case for case, pred_path, _ in cases if pred_path is None]
    names = [case for case, _, _ in cases]
    return EvaluationResult(rows, summarize(protocol, rows, classes, names, missing, extra))
