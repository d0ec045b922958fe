"""What a run leaves for humans: ``metrics.csv``, learning-curve PNGs, tensorboard scalars and overlays.

Only rank 0 calls these. The CSV and PNGs are rewritten whole from the metrics history (kept in the
checkpoint) through ``atomic_path``, so a resumed run's files match an uninterrupted run's.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from usema.io.files import atomic_path

# distinct colours for label overlays (RGB in [0, 1]); labels beyond the list reuse it cyclically
_PALETTE = np.array(
    [
        [0.90, 0.10, 0.10], [0.10, 0.75, 0.20], [0.15, 0.35, 0.95], [0.95, 0.80, 0.10], [0.80, 0.20, 0.80],
        [0.10, 0.80, 0.85], [1.00, 0.50, 0.00], [0.55, 0.35, 0.20], [0.60, 0.90, 0.40], [0.95, 0.55, 0.70],
        [0.40, 0.40, 0.85], [0.70, 0.70, 0.10], [0.30, 0.60, 0.60],
    ],
    dtype=np.float32,
)


def metric_columns(foreground_names: Sequence[str]) -> list[str]:
    """metrics.csv header: epoch, train_loss, dice_<label> per foreground class, mean_dice, lr, seconds."""
    return ["epoch", "train_loss", *[f"dice_{n}" for n in foreground_names], "mean_dice", "lr", "seconds"]


def write_metrics_csv(path: Path, history: list[dict[str, Any]], columns: list[str]) -> None:
    """Rewrite ``path`` from ``history`` (one dict per epoch; None = not validated that epoch)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})


def _save_figure(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def write_plots(plot_dir: Path, history: list[dict[str, Any]], foreground_names: Sequence[str]) -> None:
    """``loss.png`` (train loss per epoch) and ``dice.png`` (per-class and mean validation Dice per epoch)."""
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(epochs, [row["train_loss"] for row in history], marker=".", label="train loss")
    ax.set(xlabel="epoch", ylabel="Dice + CE loss", title="training loss")
    ax.legend()
    _save_figure(fig, plot_dir / "loss.png")

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for key, style in [(f"dice_{n}", "-") for n in foreground_names] + [("mean_dice", "k-")]:
        points = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), style, marker=".", label=key.removeprefix("dice_"))
    ax.set(xlabel="epoch", ylabel="Dice", title="validation Dice", ylim=(0, 1))
    ax.legend(fontsize="small", ncol=2)
    _save_figure(fig, plot_dir / "dice.png")


def _colourise(gray: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, W) gray in [0, 1] + (H, W) int labels -> (3, H, W) RGB with labels blended in."""
    rgb = np.repeat(gray[None], 3, axis=0)
    fg = labels > 0
    colours = _PALETTE[(labels[fg] - 1) % len(_PALETTE)].T  # (3, n_fg)
    rgb[:, fg] = (1 - alpha) * rgb[:, fg] + alpha * colours
    return rgb


def overlay_image(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, slice_axis: int = 2) -> np.ndarray:
    """Side-by-side (3, H, 2W) RGB overlay: ground truth left, prediction right.

    ``image`` (C, *spatial) normalised, ``truth``/``pred`` (*spatial) int. For 3D images the slice along
    ``slice_axis`` with the most ground-truth foreground is shown.
    """
    gray = image[0]
    if gray.ndim == 3:
        other = tuple(a for a in range(3) if a != slice_axis)
        index = int(np.argmax((truth > 0).sum(axis=other)))
        gray, truth, pred = (np.take(a, index, axis=slice_axis) for a in (gray, truth, pred))
    lo, hi = np.percentile(gray, [0.5, 99.5]) if gray.size else (0.0, 1.0)
    gray = np.clip((gray - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
    return np.concatenate([_colourise(gray, truth), _colourise(gray, pred)], axis=2)

