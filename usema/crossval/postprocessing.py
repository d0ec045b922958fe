"""Choose nnU-Net's post-processing on the cross-validation predictions.

First "keep the largest connected component of all foreground together", then, on top of what was kept, the
same for each class on its own; a step is kept only if it raises the mean Dice (over cases, then classes) of the
cross-validation predictions. Dice is NaN (ignored) where truth and prediction are both empty, as in scoring.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from usema.evaluation.reading import match_cases, read_labels
from usema.evaluation.scoring import dice_or_nan
from usema.inference.postprocessing import Postprocessing, keep_largest_foreground, keep_largest_of_class

Pairs = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


def class_dice(pred: np.ndarray, truth: np.ndarray, classes: list[int]) -> np.ndarray:
    """Dice of each class in ``classes`` (NaN where both masks are empty)."""
    return np.array([dice_or_nan(truth == c, pred == c) for c in classes])


def _mean(per_case: list[np.ndarray]) -> np.ndarray:
    """Per-class mean over cases, ignoring NaN (a class absent from both)."""
    stacked = np.array(per_case, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.array([np.nanmean(col) if np.isfinite(col).any() else math.nan for col in stacked.T])


def _overall(per_class: np.ndarray) -> float:
    finite = per_class[np.isfinite(per_class)]
    return float(finite.mean()) if finite.size else math.nan


def _raises(after: float, before: float) -> bool:
    return math.isfinite(after) and (not math.isfinite(before) or after > before)


def choose(pairs: Pairs, classes: list[int]) -> Postprocessing:
    """The decision for (prediction, truth) label maps that ``pairs()`` yields (called once per pass)."""
    base, merged = [], []
    for pred, truth in pairs():
        base.append(class_dice(pred, truth, classes))
        merged.append(class_dice(keep_largest_foreground(pred, classes), truth, classes))
    before, after_merged = _mean(base), _mean(merged)
    all_foreground = _raises(_overall(after_merged), _overall(before))
    start = after_merged if all_foreground else before
    per_class_scores = []
    for pred, truth in pairs():
        if all_foreground:
            pred = keep_largest_foreground(pred, classes)
        per_class_scores.append([dice_or_nan(truth == c, keep_largest_of_class(pred, c) == c) for c in classes])
    after_each = _mean(per_class_scores)
    chosen = [c for i, c in enumerate(classes) if _raises(after_each[i], start[i])]
    final = np.array([after_each[i] if c in chosen else start[i] for i, c in enumerate(classes)])
    scores = {
        "mean_dice_before": _overall(before),
        "mean_dice_all_foreground_lcc": _overall(after_merged),
        "per_class_dice_before": _listed(start, classes),
        "per_class_dice_lcc": _listed(after_each, classes),
        "mean_dice_after": _overall(final),
    }
    return Postprocessing(all_foreground, chosen, scores)


def _listed(values: np.ndarray, classes: list[int]) -> dict[str, float | None]:
    return {str(c): (float(v) if math.isfinite(v) else None) for c, v in zip(classes, values)}


def choose_for_folders(pred_dir: Path, truth_dir: Path, classes: list[int]) -> Postprocessing:
    """The decision for the predictions in ``pred_dir`` against the same-named references in ``truth_dir``."""
    cases, _ = match_cases(pred_dir, truth_dir, missing_as_empty=False)

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for _, pred, truth in cases:
            yield read_labels(pred).array, read_labels(truth).array

    return choose(pairs, classes)
