"""``usema evaluate --report DIR``: a self-contained HTML page of an evaluation.

The folder holds ``index.html`` (no network: inline style, images by relative path), ``scores.png`` (per-class
box plots of DSC and NSD across cases, or of the per-image F1 for cells) and one ``worst_<i>.png`` overlay per
worst case: the reference (green) and prediction (magenta) contours on the input image when ``--images`` is
given, else on a dark background; for volumes, the axial slice with the most disagreeing voxels. Each file is
written atomically and ``index.html`` last, so a page always finds its images.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from skimage.measure import find_contours

from usema.evaluation.evaluate import EvaluationResult
from usema.evaluation.reading import find_label_files, read_labels, squeezed
from usema.io.files import atomic_path, ensure_writable_dir
from usema.io.images import find_cases, read_image

TRUTH_COLOUR, PRED_COLOUR = "#2ecc40", "#f012be"


def case_scores(result: EvaluationResult) -> dict[str, float]:
    """One number per case for ranking: per-image F1 for cells, else the mean DSC of its scored classes."""
    key = "instance_f1" if result.summary["protocol"] == "neurips_cell" else "dsc"
    scores: dict[str, list[float]] = {}
    for row in result.rows:
        value = row.get(key)
        if value is not None and math.isfinite(value):
            scores.setdefault(row["case"], []).append(value)
    return {case: float(np.mean(values)) for case, values in scores.items()}


def _save(figure: Figure, path: Path) -> None:
    with atomic_path(path, "report image") as tmp:
        FigureCanvasAgg(figure).print_png(str(tmp))


def score_plot(result: EvaluationResult, path: Path) -> None:
    """Box plots across cases: DSC and NSD per class, or per-image F1 for cells."""
    if result.summary["protocol"] == "neurips_cell":
        panels = {"instance F1 per image": {"cells": [r["instance_f1"] for r in result.rows]}}
    else:
        panels = {}
        for metric in ("dsc", "nsd"):
            per_class: dict[str, list[float]] = {}
            for row in result.rows:
                if math.isfinite(row[metric]):
                    per_class.setdefault(row["class_name"], []).append(row[metric])
            panels[metric.upper()] = per_class
    figure = Figure(figsize=(max(6.0, 0.6 * max(len(p) for p in panels.values()) + 2), 3.2 * len(panels)))
    for i, (title, data) in enumerate(panels.items(), 1):
        axes = figure.add_subplot(len(panels), 1, i)
        if data:
            axes.boxplot(list(data.values()), tick_labels=list(data), showmeans=True)
        axes.set_ylim(-0.02, 1.02)
        axes.set_title(title)
        axes.tick_params(axis="x", labelrotation=45, labelsize=8)
    figure.tight_layout()
    _save(figure, path)


def worst_slice(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, int | None]:
    """2D maps to draw: the map itself, or the axial (last-axis) slice where most voxels disagree."""
    if truth.ndim == 2:
        return truth, pred, None
    disagreement = (truth != pred).sum(axis=(0, 1))
    z = int(np.argmax(disagreement)) if disagreement.any() else int(np.argmax((truth > 0).sum(axis=(0, 1))))
    return truth[..., z], pred[..., z], z


def _background(images: Path | None, case: str, shape: tuple[int, ...], z: int | None) -> np.ndarray:
    """The case's first image channel on the drawn plane (scaled to 0..1), or zeros without ``--images``."""
    match = next((c for c in find_cases(images) if c.name == case), None) if images else None
    if match is None:
        return np.zeros(shape[:2])
    data = read_image(match.paths)[0]
    plane = data[0] if z is None else data[0][..., z]
    if data.shape[0] == 3 and z is None:  # RGB frame
        plane = np.moveaxis(data, 0, -1)
    low, high = np.percentile(plane, (1, 99))
    return np.clip((plane - low) / (high - low or 1.0), 0, 1)


def overlay(truth_path: Path, pred_path: Path | None, images: Path | None, case: str, cells: bool, path: Path) -> str:
    """Draw one case's contours; returns the caption (which slice)."""
    truth = squeezed(read_labels(truth_path)).array
    pred = squeezed(read_labels(pred_path)).array if pred_path else np.zeros_like(truth)
    if cells:
        truth, pred = (truth > 0).astype(np.int64), (pred == 1).astype(np.int64)
    truth2d, pred2d, z = worst_slice(truth, pred)
    figure = Figure(figsize=(5, 5 * truth2d.shape[0] / max(truth2d.shape[1], 1) + 0.4))
    axes = figure.add_subplot(1, 1, 1)
    axes.imshow(_background(images, case, truth.shape, z), cmap="gray", interpolation="nearest")
    for labels, colour in ((truth2d, TRUTH_COLOUR), (pred2d, PRED_COLOUR)):
        for value in np.unique(labels[labels > 0]):
            for contour in find_contours((labels == value).astype(float), 0.5):
                axes.plot(contour[:, 1], contour[:, 0], color=colour, linewidth=1)
    caption = case if z is None else f"{case}, axial slice {z}"
    axes.set_title(caption, fontsize=9)
    axes.set_axis_off()
    figure.tight_layout()
    _save(figure, path)
    return caption


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>usema evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #bbb;padding:.25em .6em;text-align:right}}figure{{display:inline-block;margin:.5em}}
.key span{{padding:0 .4em;color:#fff}}</style></head>
<body class="usema-evaluation-report">
<h1>usema evaluation: protocol {protocol}</h1>
<p>{cases} cases. {scores}</p>
<h2>Scores across cases</h2><img src="scores.png" alt="per-class box plots">
<h2>Worst cases</h2>{table}
<p class="key"><span style="background:{truth}">reference</span> <span style="background:{pred}">prediction</span></p>
{figures}
<script>window.addEventListener("load", () => {{
  const imgs = [...document.images];
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length + "/" + imgs.length;
}});</script>
</body></html>
"""


def write_report(
    result: EvaluationResult,
    pred_dir: Path,
    truth_dir: Path,
    out_dir: Path,
    n_worst: int,
    images: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the report folder; returns the path of ``index.html``."""
    out_dir = ensure_writable_dir(out_dir, "report folder")
    summary = result.summary
    cells = summary["protocol"] == "neurips_cell"
    score_plot(result, out_dir / "scores.png")
    ranked = sorted(case_scores(result).items(), key=lambda item: item[1])[:n_worst]
    truth_suffixes = ("_label.tiff", "_label.tif") if cells else None
    truths = find_label_files(truth_dir, *([truth_suffixes] if truth_suffixes else []))
    preds = find_label_files(pred_dir)
    figures = []
    for i, (case, _) in enumerate(ranked, 1):
        caption = overlay(truths[case], preds.get(case), images, case, cells, out_dir / f"worst_{i}.png")
        figures.append(f'<figure><img src="worst_{i}.png" alt="{html.escape(caption)}">'
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")  # fmt: skip
    metric = "instance F1" if cells else "mean DSC of the scored classes"
    table = _table([[case, f"{score:.4f}"] for case, score in ranked], ["case", metric])
    if cells:
        scores = f"Mean F1 {summary['instance']['mean_f1']:.4f}, median {summary['instance']['median_f1']:.4f}."
    else:
        scores = (f"Mean DSC {summary['mean_dsc'] or 0:.4f}, mean NSD {summary['mean_nsd'] or 0:.4f}, "
                  f"HD95 penalised (missed or false class): {summary['hd95_penalised']}.")  # fmt: skip
    page = PAGE.format(protocol=html.escape(summary["protocol"]), cases=summary["cases"], scores=html.escape(scores),
                       table=table, truth=TRUTH_COLOUR, pred=PRED_COLOUR, figures="\n".join(figures))  # fmt: skip
    index = out_dir / "index.html"
    with atomic_path(index, "report") as tmp:
        tmp.write_text(page)
    return index
