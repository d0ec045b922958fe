"""Dataset scores from the per-case rows (each protocol's own averaging), and the CSV / JSON / table outputs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from usema.io.files import atomic_path, refuse_existing

CSV_COLUMNS = (
    "case", "class_id", "class_name", "dsc", "nsd", "nsd_tolerance_mm", "hd95", "hd95_penalised", "truth_voxels",
    "pred_voxels", "missing_prediction", "instance_f1", "instance_precision", "instance_recall", "instance_tp",
    "instance_fp", "instance_fn", "instance_true", "instance_pred",
)  # fmt: skip
# the benchmark scripts round every per-case value to 4 decimals before averaging
REFERENCE_DECIMALS = 4


def _mean(values: Iterable[float | None]) -> float | None:
    """Mean of the finite values; None (JSON null) when there is none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _rounded(value: float) -> float:
    return float(np.round(value, REFERENCE_DECIMALS))


def _per_class(rows: list[dict], labels: Mapping[int, str], rounded: bool) -> dict:
    """Per class: mean DSC / NSD over its rows (NaN skipped), HD95 mean, cases and penalties."""
    per_class = {}
    for value, name in labels.items():
        class_rows = [r for r in rows if r["class_id"] == value]
        if not class_rows:
            continue
        pick = _rounded if rounded else float
        hd = [r["hd95"] for r in class_rows if math.isfinite(r["hd95"])]
        per_class[name] = {
            "class_id": value,
            "dsc": _mean(pick(r["dsc"]) for r in class_rows),
            "nsd": _mean(pick(r["nsd"]) for r in class_rows),
            "nsd_tolerance_mm": class_rows[0]["nsd_tolerance_mm"],
            "hd95": _mean(hd),
            "hd95_cases": len(hd),
            "hd95_penalised": sum(r["hd95_penalised"] for r in class_rows),
            "rows": len(class_rows),
        }
    return per_class


def _frame_scores(rows: list[dict], cases: list[str]) -> dict[str, dict[str, float]]:
    """Endovis17: each frame's DSC / NSD = mean over its scored classes, rounded as the reference does."""
    frames = {}
    for case in cases:
        case_rows = [r for r in rows if r["case"] == case]
        if case_rows:
            frames[case] = {k: _rounded(float(np.mean([r[k] for r in case_rows]))) for k in ("dsc", "nsd")}
    return frames


def summarize(
    protocol: str,
    rows: list[dict],
    labels: Mapping[int, str],
    cases: list[str],
    missing: list[str],
    extra: list[str],
) -> dict:
    """The JSON summary: the protocol's dataset scores, per-class means and the bookkeeping lists."""
    summary: dict = {"protocol": protocol, "cases": len(cases), "labels": {str(v): n for v, n in labels.items()}}
    if protocol == "neurips_cell":
        summary["instance"] = instance_summary(rows)
    else:
        per_class = _per_class(rows, labels, rounded=protocol != "generic")
        summary["per_class"] = per_class
        if protocol == "endovis17":
            frames = _frame_scores(rows, cases)
            summary["mean_dsc"] = _mean(f["dsc"] for f in frames.values())
            summary["mean_nsd"] = _mean(f["nsd"] for f in frames.values())
            summary["frames_scored"] = len(frames)
            summary["frames_without_classes"] = [c for c in cases if c not in frames]
        else:
            summary["mean_dsc"] = _mean(c["dsc"] for c in per_class.values())
            summary["mean_nsd"] = _mean(c["nsd"] for c in per_class.values())
        summary["mean_hd95"] = _mean(c["hd95"] for c in per_class.values())
        summary["hd95_penalised"] = sum(c["hd95_penalised"] for c in per_class.values())
        summary["hd95_penalty"] = "image diagonal in mm (one mask empty); both empty excluded"
        if any("instance_f1" in r for r in rows):
            summary["instance"] = instance_summary([r for r in rows if "instance_f1" in r])
    summary["missing_predictions"] = missing
    summary["predictions_without_reference"] = extra
    return summary


def instance_summary(rows: list[dict]) -> dict:
    """Mean and median per-image F1 (4-decimal values, as the reference averages them) and pooled counts."""
    f1 = [_rounded(r["instance_f1"]) for r in rows]
    return {
        "iou_threshold": 0.5,
        "mean_f1": _mean(f1),
        "median_f1": float(np.median(f1)) if f1 else None,
        "mean_precision": _mean(_rounded(r["instance_precision"]) for r in rows),
        "mean_recall": _mean(_rounded(r["instance_recall"]) for r in rows),
        "tp": sum(r["instance_tp"] for r in rows),
        "fp": sum(r["instance_fp"] for r in rows),
        "fn": sum(r["instance_fn"] for r in rows),
    }


def csv_path_for(json_path: str | Path) -> Path:
    """The per-case CSV written beside the JSON summary (same name, ``.csv``)."""
    return Path(json_path).with_suffix(".csv")


def write_results(rows: list[dict], summary: dict, json_path: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write the CSV, then the JSON summary (so a complete JSON means a complete CSV), each atomically."""
    json_path = Path(json_path)
    csv_path = csv_path_for(json_path)
    refuse_existing([json_path, csv_path], overwrite, "evaluation result")
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows({k: _csv_value(v) for k, v in row.items()} for row in rows)
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return json_path, csv_path


def _csv_value(value: object) -> object:
    """Floats with 6 decimals; NaN written as the text 'nan'."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6f}"
    return value


def format_table(summary: dict) -> str:
    """Markdown table of the per-class means and the dataset scores."""
    lines = []
    if "per_class" in summary:
        lines += ["| class | DSC | NSD | tol (mm) | HD95 (mm) |", "|---|---|---|---|---|"]
        for name, c in summary["per_class"].items():
            cells = [name, _fmt(c["dsc"]), _fmt(c["nsd"]), f"{c['nsd_tolerance_mm']:g}", _fmt(c["hd95"], 2)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append(f"| **mean** | {_fmt(summary['mean_dsc'])} | {_fmt(summary['mean_nsd'])} | | "
                     f"{_fmt(summary['mean_hd95'], 2)} |")  # fmt: skip
        lines.append(f"\nprotocol {summary['protocol']}; HD95 penalised (missed or false class): "
                     f"{summary['hd95_penalised']}")  # fmt: skip
    if "instance" in summary:
        inst = summary["instance"]
        lines.append(f"Instance F1 (IoU >= 0.5): mean {_fmt(inst['mean_f1'])}, median {_fmt(inst['median_f1'])} "
                     f"(TP {inst['tp']}, FP {inst['fp']}, FN {inst['fn']})")  # fmt: skip
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
