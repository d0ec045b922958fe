"""Evaluate a folder of predicted label maps against a folder of reference label maps.

Cases are matched by name with the format suffix removed (nnU-Net: ``CASE.nii.gz`` in both folders).
Formats: NIfTI through nibabel (spacing = header zooms), other ITK formats (.nrrd, .mha, .mhd) through
SimpleITK (transposed arrays so that axis 0 is x, spacing from the image), PNG / TIFF (spacing 1).
Singleton axes are dropped, so a one-slice volume is evaluated as the 2D image it is.

A reference with no prediction is an error naming the cases, unless ``missing_as_empty``: then it is
scored as an empty prediction and flagged in the results. Predictions without a reference are ignored
and listed in the summary.
"""

from __future__ import annotations

import csv
import json
import math
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import tifffile
import torch
from PIL import Image
from scipy import ndimage

from usema.errors import UsemaError
from usema.io.files import atomic_path, refuse_existing
from usema.evaluation import metrics

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".mha", ".mhd")
PLANAR_SUFFIXES = (".png", ".tif", ".tiff")
LABEL_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + PLANAR_SUFFIXES

# FLARE22 NSD tolerances in mm (SPEC §5), keyed by canonical organ name
FLARE22_TOLERANCE_MM: dict[str, float] = {
    "liver": 5.0,
    "right kidney": 3.0,
    "spleen": 3.0,
    "pancreas": 5.0,
    "aorta": 2.0,
    "ivc": 2.0,
    "right adrenal": 2.0,
    "left adrenal": 2.0,
    "gallbladder": 2.0,
    "esophagus": 3.0,
    "stomach": 5.0,
    "duodenum": 7.0,
    "left kidney": 3.0,
}
# other spellings in FLARE22 / AMOS22 / TotalSegmentator label names -> canonical organ name
ORGAN_ALIASES: dict[str, str] = {
    "kidney right": "right kidney",
    "r kidney": "right kidney",
    "rk": "right kidney",
    "kidney left": "left kidney",
    "l kidney": "left kidney",
    "lk": "left kidney",
    "inferior vena cava": "ivc",
    "postcava": "ivc",
    "right adrenal gland": "right adrenal",
    "adrenal gland right": "right adrenal",
    "rag": "right adrenal",
    "left adrenal gland": "left adrenal",
    "adrenal gland left": "left adrenal",
    "lag": "left adrenal",
    "gall bladder": "gallbladder",
    "oesophagus": "esophagus",
}
# FLARE22 scores these only on the axial slices where the reference is labelled
SLICE_RESTRICTED_ORGANS = frozenset({"aorta", "ivc", "esophagus"})
FLARE22_AXIAL_AXIS = 2  # nibabel voxel axis k
DEFAULT_TOLERANCE_MM = 2.0  # Endovis' 2 pixels at spacing 1; used when nothing else applies


def canonical_organ(name: str) -> str | None:
    """The FLARE22 organ a label name denotes (case, ``_`` and ``-`` ignored), or None."""
    key = re.sub(r"[\s_\-]+", " ", name.strip().lower())
    key = ORGAN_ALIASES.get(key, key)
    return key if key in FLARE22_TOLERANCE_MM else None


def resolve_tolerances(labels: Mapping[int, str], nsd_tolerance_mm: float | Mapping[str, float]) -> dict[int, float]:
    """NSD tolerance in mm for each label value.

    Order: an explicit entry for the class name in a dict (case-insensitive) > the FLARE22 tolerance of
    the organ the name denotes > the scalar (or the dict's ``"default"`` entry, else
    ``DEFAULT_TOLERANCE_MM``).
    """
    if isinstance(nsd_tolerance_mm, Mapping):
        explicit = {str(k).lower(): float(v) for k, v in nsd_tolerance_mm.items()}
        fallback = explicit.get("default", DEFAULT_TOLERANCE_MM)
    else:
        explicit, fallback = {}, float(nsd_tolerance_mm)
    tolerances = {}
    for value, name in labels.items():
        organ = canonical_organ(name)
        tol = explicit.get(name.lower(), FLARE22_TOLERANCE_MM[organ] if organ else fallback)
        if not math.isfinite(tol) or tol < 0:
            raise UsemaError(f"nsd_tolerance_mm: expected a finite tolerance >= 0 mm for {name!r}, got {tol}")
        tolerances[value] = tol
    return tolerances


@dataclass
class LabelMap:
    """Integer labels ``(*spatial)`` (singleton axes dropped), voxel spacing in mm and the grid to compare."""

    array: np.ndarray
    spacing: tuple[float, ...]
    kind: str
    shape: tuple[int, ...]  # as stored, before dropping singleton axes
    world: np.ndarray | None = field(default=None, repr=False)  # NIfTI affine / ITK origin+direction


def label_suffix(path: Path) -> str | None:
    """The supported suffix of ``path`` (case-insensitive), or None."""
    name = path.name.lower()
    return next((s for s in LABEL_SUFFIXES if name.endswith(s)), None)


def _to_labels(data: np.ndarray, path: Path) -> np.ndarray:
    """Integer labels from any numeric array; fractional, negative or non-finite values are refused."""
    if data.dtype.kind in "iu":
        labels = data
    elif data.dtype.kind == "b":  # 1-bit PNG
        labels = data.astype(np.uint8)
    else:
        if not np.isfinite(data).all():
            raise UsemaError(f"{path}: expected integer labels, found NaN or inf")
        if not np.array_equal(data, np.round(data)):
            raise UsemaError(f"{path}: expected integer labels, found fractional values")
        labels = data.astype(np.int64)
    if labels.size == 0:
        raise UsemaError(f"{path}: expected a non-empty label image, got shape {data.shape}")
    if labels.dtype.kind == "i" and labels.min() < 0:
        raise UsemaError(f"{path}: expected label values >= 0, found {int(labels.min())}")
    return labels


def _read_nifti(path: Path) -> LabelMap:
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    zooms = tuple(float(z) for z in img.header.get_zooms()[: data.ndim])
    return LabelMap(_to_labels(data, path), zooms, "nifti", data.shape, np.asarray(img.affine, dtype=float))


def _read_itk(path: Path) -> LabelMap:
    img = sitk.ReadImage(str(path))
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise UsemaError(f"{path}: expected a single-component label image")
    data = sitk.GetArrayFromImage(img).T  # SimpleITK is (z, y, x): make axis 0 x, as usema's readers do
    world = np.concatenate([np.asarray(img.GetOrigin()), np.asarray(img.GetDirection())])
    return LabelMap(_to_labels(data, path), tuple(float(s) for s in img.GetSpacing()), "itk", data.shape, world)


def _read_planar(path: Path) -> LabelMap:
    if label_suffix(path) == ".png":
        with Image.open(path) as img:
            if img.mode not in ("1", "L", "P", "I", "I;16", "F"):
                raise UsemaError(f"{path}: expected a single-channel label PNG, got mode {img.mode}")
            data = np.asarray(img)
    else:
        data = tifffile.imread(path)
    return LabelMap(_to_labels(data, path), (1.0,) * data.ndim, "planar", data.shape)


def read_labels(path: str | Path) -> LabelMap:
    """Read a label map; singleton axes are dropped (with their spacing). Unreadable files -> UsemaError."""
    path = Path(path)
    suffix = label_suffix(path)
    reader = _read_nifti if suffix in NIFTI_SUFFIXES else _read_itk if suffix in ITK_SUFFIXES else _read_planar
    try:
        label_map = reader(path)
    except UsemaError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the file is not a readable label image
        raise UsemaError(f"{path}: expected a readable {suffix} label image ({type(exc).__name__})") from exc
    keep = [axis for axis, size in enumerate(label_map.array.shape) if size != 1]
    label_map.array = label_map.array.reshape([label_map.array.shape[a] for a in keep])
    label_map.spacing = tuple(label_map.spacing[a] for a in keep)
    if label_map.array.ndim not in (2, 3):
        raise UsemaError(f"{path}: expected a 2D or 3D label image, got shape {label_map.shape}")
    if not all(math.isfinite(s) and s > 0 for s in label_map.spacing):
        raise UsemaError(f"{path}: expected positive voxel spacing, got {label_map.spacing}")
    return label_map


def _strip_trailing_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(x, y, z, 1) and (x, y, z) are the same grid (a NIfTI time axis of length 1)."""
    while len(shape) > 1 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def check_same_grid(pred: LabelMap, truth: LabelMap, case: str) -> None:
    """Refuse a prediction that is not on the reference's voxel grid (shape, spacing, position)."""
    if _strip_trailing_ones(pred.shape) != _strip_trailing_ones(truth.shape):
        raise UsemaError(f"{case}: prediction shape {pred.shape} differs from the reference shape {truth.shape}")
    if not np.allclose(pred.spacing, truth.spacing, rtol=1e-4, atol=1e-5):
        raise UsemaError(f"{case}: prediction spacing {pred.spacing} differs from the reference {truth.spacing}")
    same_kind = pred.kind == truth.kind and pred.world is not None and truth.world is not None
    if same_kind and not np.allclose(pred.world, truth.world, rtol=1e-4, atol=1e-3):
        raise UsemaError(f"{case}: prediction affine/origin/direction differs from the reference's")


def find_label_files(folder: str | Path) -> dict[str, Path]:
    """Case name -> label file for every supported file in ``folder`` (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsemaError(f"{folder}: expected a folder of label files")
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = label_suffix(path)
        if suffix is None or path.name.startswith(".") or not path.is_file():
            continue
        case = path.name[: -len(suffix)]
        if case in cases:
            raise UsemaError(f"{path}: case {case!r} also exists as {cases[case].name}; expected one file per case")
        cases[case] = path
    return cases


CasePaths = tuple[str, Path | None, Path]  # (case, prediction or None, reference)


def match_cases(pred_dir: Path, truth_dir: Path, missing_as_empty: bool) -> tuple[list[CasePaths], list[str]]:
    """(case, prediction or None, reference) for every reference, and the predictions without a reference."""
    truths = find_label_files(truth_dir)
    if not truths:
        raise UsemaError(f"{truth_dir}: expected reference label files ({', '.join(LABEL_SUFFIXES)}), found none")
    preds = find_label_files(pred_dir)
    missing = [case for case in truths if case not in preds]
    if missing and not missing_as_empty:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UsemaError(
            f"{pred_dir}: no prediction for {len(missing)} reference case(s): {shown} "
            "(use --missing-as-empty to score them as empty predictions)"
        )
    extra = sorted(set(preds) - set(truths))
    return [(case, preds.get(case), path) for case, path in truths.items()], extra


def labels_found(paths: Iterable[Path]) -> dict[int, str]:
    """Every non-zero label value in the files, named by its value (the fallback when no names are known)."""
    values: set[int] = set()
    for path in paths:
        values.update(int(v) for v in np.unique(read_labels(path).array))
    return {v: str(v) for v in sorted(values - {0})}


def _check_values(label_map: LabelMap, labels: Mapping[int, str], path: Path) -> None:
    unknown = sorted(set(int(v) for v in np.unique(label_map.array)) - set(labels) - {0})
    if unknown:
        raise UsemaError(f"{path}: label values {unknown} are not among the classes {sorted(labels)}")


def class_boxes(pred: np.ndarray, truth: np.ndarray, max_label: int) -> list[tuple[slice, ...]]:
    """For label values 1..max_label: the union of their boxes in both maps, one voxel wider.

    Every metric is unchanged by cropping to it (surfaces are found inside, distances do not depend
    on the frame), and one ``find_objects`` pass per map replaces a full-volume scan per class.
    A class absent from both gets an empty box.
    """
    empty = (slice(0, 0),) * truth.ndim
    boxes = []
    for pred_box, truth_box in zip(ndimage.find_objects(pred, max_label), ndimage.find_objects(truth, max_label)):
        found = [b for b in (pred_box, truth_box) if b is not None]
        if not found:
            boxes.append(empty)
            continue
        boxes.append(
            tuple(
                slice(max(min(b[a].start for b in found) - 1, 0), max(b[a].stop for b in found) + 1)
                for a in range(truth.ndim)
            )
        )
    return boxes


def evaluate_case(
    pred: LabelMap,
    truth: LabelMap,
    labels: Mapping[int, str],
    tolerances: Mapping[int, float],
    flare_slice_rule: bool = True,
) -> list[dict]:
    """One row per class: DSC, NSD, HD95 and voxel counts (the CSV columns after case/class)."""
    rows = []
    boxes = class_boxes(pred.array, truth.array, max(labels))
    for value, name in labels.items():
        organ = canonical_organ(name)
        restrict = flare_slice_rule and organ in SLICE_RESTRICTED_ORGANS and truth.array.ndim == 3
        box = boxes[value - 1]
        scores = metrics.class_scores(
            pred.array[box] == value,
            truth.array[box] == value,
            truth.spacing,
            tolerances[value],
            truth_slices_axis=FLARE22_AXIAL_AXIS if restrict else None,
        )
        rows.append(
            {
                "class_id": value,
                "class_name": name,
                "dsc": scores.dsc,
                "nsd": scores.nsd,
                "nsd_tolerance_mm": tolerances[value],
                "hd95": scores.hd95,
                "truth_voxels": scores.truth_voxels,
                "pred_voxels": scores.pred_voxels,
            }
        )
    return rows


@dataclass
class EvaluationResult:
    """Per-case per-class rows (CSV) and the summary (JSON)."""

    rows: list[dict]
    summary: dict


CSV_COLUMNS = (
    "case", "class_id", "class_name", "dsc", "nsd", "nsd_tolerance_mm", "hd95", "truth_voxels", "pred_voxels",
    "missing_prediction", "instance_f1", "instance_precision", "instance_recall", "instance_tp", "instance_fp",
    "instance_fn",
)  # fmt: skip


def _empty_like(truth: LabelMap) -> LabelMap:
    return LabelMap(np.zeros_like(truth.array), truth.spacing, truth.kind, truth.shape, truth.world)


def _instance_columns(pred: LabelMap, truth: LabelMap, interior_label: int) -> dict:
    scores = metrics.instance_f1(pred.array, truth.array, interior_label)
    return {
        "instance_f1": scores.f1,
        "instance_precision": scores.precision,
        "instance_recall": scores.recall,
        "instance_tp": scores.tp,
        "instance_fp": scores.fp,
        "instance_fn": scores.fn,
    }


@dataclass(frozen=True)
class CaseTask:
    """Everything needed to score one case (picklable, for worker processes)."""

    case: str
    pred_path: Path | None
    truth_path: Path
    labels: Mapping[int, str]
    tolerances: Mapping[int, float]
    instance_f1: bool
    interior_label: int
    flare_slice_rule: bool


def score_case(task: CaseTask) -> list[dict]:
    """Read, check and score one case: its CSV rows, one per class."""
    truth = read_labels(task.truth_path)
    _check_values(truth, task.labels, task.truth_path)
    if task.pred_path is None:
        pred = _empty_like(truth)
    else:
        pred = read_labels(task.pred_path)
        check_same_grid(pred, truth, task.case)
        _check_values(pred, task.labels, task.pred_path)
    instance = _instance_columns(pred, truth, task.interior_label) if task.instance_f1 else {}
    rows = []
    for row in evaluate_case(pred, truth, task.labels, task.tolerances, task.flare_slice_rule):
        row = {"case": task.case, **row, "missing_prediction": int(task.pred_path is None)}
        rows.append({**row, **(instance if row["class_id"] == task.interior_label else {})})
    return rows


def _single_thread_worker() -> None:
    # each worker process scores one case at a time; intra-op threads would oversubscribe the cores
    torch.set_num_threads(1)


def map_cases(tasks: list[CaseTask], workers: int) -> Iterator[list[dict]]:
    """``score_case`` over the tasks, in order; ``workers`` > 1 uses that many processes."""
    if workers <= 1:
        yield from map(score_case, tasks)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_single_thread_worker) as pool:
        yield from pool.map(score_case, tasks)


def evaluate_folders(
    pred_dir: str | Path,
    truth_dir: str | Path,
    labels: Mapping[int, str] | None = None,
    nsd_tolerance_mm: float | Mapping[str, float] = DEFAULT_TOLERANCE_MM,
    instance_f1: bool = False,
    interior_label: int = 1,
    missing_as_empty: bool = False,
    flare_slice_rule: bool = True,
    workers: int = 1,
    progress: Callable[[Iterator, int], Iterable] | None = None,
) -> EvaluationResult:
    """Score every reference case in ``truth_dir`` against the same-named prediction in ``pred_dir``.

    ``labels``: label value -> class name (background 0 is never scored); None = every value found.
    ``nsd_tolerance_mm``: see :func:`resolve_tolerances` (FLARE22 tolerances win for organ names).
    ``instance_f1``: add the NeurIPS Cell instance F1 of ``interior_label`` (on that class's rows).
    ``flare_slice_rule``: score aorta / IVC / oesophagus only on the reference's labelled axial slices.
    ``workers``: processes scoring cases in parallel (1 = in this process).
    ``progress``: optional wrapper over the per-case results iterator and its length (e.g. ``tqdm``).
    """
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    cases, extra = match_cases(pred_dir, truth_dir, missing_as_empty)
    if labels is None:
        labels = labels_found([p for _, pred, truth in cases for p in (pred, truth) if p is not None])
    labels = {int(v): str(n) for v, n in labels.items() if int(v) != 0}
    if not labels:
        raise UsemaError(f"{truth_dir}: no foreground classes to evaluate (no labels given and none found)")
    if instance_f1 and interior_label not in labels:
        raise UsemaError(f"interior_label: {interior_label} is not among the classes {sorted(labels)}")
    tolerances = resolve_tolerances(labels, nsd_tolerance_mm)
    tasks = [
        CaseTask(case, pred, truth, labels, tolerances, instance_f1, interior_label, flare_slice_rule)
        for case, pred, truth in cases
    ]
    results = map_cases(tasks, workers)
    rows = [row for case_rows in (progress(results, len(tasks)) if progress else results) for row in case_rows]
    missing = [case for case, pred_path, _ in cases if pred_path is None]
    return EvaluationResult(rows, summarize(rows, labels, tolerances, instance_f1, interior_label, missing, extra))


def _mean(values: Iterable[float]) -> float | None:
    """Mean of the finite values; None (JSON null) when there is none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def summarize(
    rows: list[dict],
    labels: Mapping[int, str],
    tolerances: Mapping[int, float],
    instance_f1: bool,
    interior_label: int,
    missing: list[str],
    extra: list[str],
) -> dict:
    """Per-class means over cases and overall means (mean of the class means; HD95 NaNs excluded)."""
    per_class = {}
    for value, name in labels.items():
        class_rows = [r for r in rows if r["class_id"] == value]
        hd = [r["hd95"] for r in class_rows if math.isfinite(r["hd95"])]
        per_class[name] = {
            "class_id": value,
            "dsc": _mean(r["dsc"] for r in class_rows),
            "nsd": _mean(r["nsd"] for r in class_rows),
            "nsd_tolerance_mm": tolerances[value],
            "hd95": _mean(hd),
            "hd95_cases": len(hd),
        }
    summary = {
        "cases": len({r["case"] for r in rows}),
        "labels": {str(v): n for v, n in labels.items()},
        "per_class": per_class,
        "mean_dsc": _mean(c["dsc"] for c in per_class.values()),
        "mean_nsd": _mean(c["nsd"] for c in per_class.values()),
        "mean_hd95": _mean(c["hd95"] for c in per_class.values()),
        "missing_predictions": missing,
        "predictions_without_reference": extra,
    }
    if instance_f1:
        summary["instance"] = _instance_summary([r for r in rows if r["class_id"] == interior_label], interior_label)
    return summary


def _instance_summary(rows: list[dict], interior_label: int) -> dict:
    """Mean per-case F1 (what the challenge reports) and the pooled counts."""
    return {
        "interior_label": interior_label,
        "iou_threshold": 0.5,
        "mean_f1": _mean(r["instance_f1"] for r in rows),
        "mean_precision": _mean(r["instance_precision"] for r in rows),
        "mean_recall": _mean(r["instance_recall"] for r in rows),
        "tp": sum(r["instance_tp"] for r in rows),
        "fp": sum(r["instance_fp"] for r in rows),
        "fn": sum(r["instance_fn"] for r in rows),
    }


def csv_path_for(json_path: str | Path) -> Path:
    """The per-case CSV written beside the JSON summary (same name, ``.csv``)."""
    return Path(json_path).with_suffix(".csv")


def write_results(result: EvaluationResult, json_path: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write the CSV, then the JSON summary (so a complete JSON means a complete CSV), each atomically."""
    json_path = Path(json_path)
    csv_path = csv_path_for(json_path)
    refuse_existing([json_path, csv_path], overwrite, "evaluation result")
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows({k: _csv_value(v) for k, v in row.items()} for row in result.rows)
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(result.summary, indent=2) + "\n")
    return json_path, csv_path


def _csv_value(value: object) -> object:
    """Floats with 6 decimals; NaN written as the text 'nan'."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6f}"
    return value


def format_table(summary: dict) -> str:
    """Markdown table of the per-class means, then the overall mean row."""
    lines = ["| class | DSC | NSD | tol (mm) | HD95 (mm) |", "|---|---|---|---|---|"]
    for name, c in summary["per_class"].items():
        cells = [name, _fmt(c["dsc"]), _fmt(c["nsd"]), f"{c['nsd_tolerance_mm']:g}", _fmt(c["hd95"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"| **mean** | {_fmt(summary['mean_dsc'])} | {_fmt(summary['mean_nsd'])} | | {_fmt(summary['mean_hd95'], 2)} |"
    )
    if "instance" in summary:
        inst = summary["instance"]
        lines.append("")
        lines.append(f"Instance F1 (IoU >= 0.5, class {inst['interior_label']}): {_fmt(inst['mean_f1'])} "
                     f"(TP {inst['tp']}, FP {inst['fp']}, FN {inst['fn']})")  # fmt: skip
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
