"""How each protocol scores one case: per-class rows of DSC, NSD, HD95 and voxel counts.

HD95 is added to every protocol (DeepMind's robust Hausdorff for the benchmark protocols, MONAI's for
``generic``): a missed or a false class (exactly one mask empty) scores the image diagonal in mm and is
counted as penalised, so misses cannot improve the mean; both empty is excluded.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from usema.errors import UsemaError
from usema.evaluation import surface
from usema.evaluation.protocols import (
    AXIAL_AXIS,
    ENDOVIS_SPACING,
    ENDOVIS_TOLERANCE,
    FLARE22_ORGANS,
    SLICE_RULE_ORGANS,
)

HD_PERCENT = 95.0


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The HD95 penalty: the image's diagonal in mm, the largest distance two of its voxels can have."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def dice_or_nan(truth: np.ndarray, pred: np.ndarray) -> float:
    """DeepMind's ``compute_dice_coefficient``: NaN when both masks are empty."""
    total = int(truth.sum()) + int(pred.sum())
    return 2.0 * int(np.logical_and(truth, pred).sum()) / total if total else math.nan


def _hd95(distances: surface.SurfaceDistances, truth_any: bool, pred_any: bool, penalty: float) -> tuple[float, int]:
    """(HD95, 1 if penalised else 0); NaN when both are empty."""
    if truth_any and pred_any:
        return surface.robust_hausdorff(distances, HD_PERCENT), 0
    return (penalty, 1) if truth_any or pred_any else (math.nan, 0)


def _row(value: int, name: str, dsc: float, nsd: float, tol: float, hd: tuple[float, int], t: int, p: int) -> dict:
    return {"class_id": value, "class_name": name, "dsc": dsc, "nsd": nsd, "nsd_tolerance_mm": tol,
            "hd95": hd[0], "hd95_penalised": hd[1], "truth_voxels": t, "pred_voxels": p}  # fmt: skip


def _compact(array: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``array`` with the sorted ``order`` values renumbered 1..len(order) (other values 0), in a small type.

    A lookup table when it is no larger than the array; else a search, so a value of 10⁸ allocates nothing.
    """
    top = int(order[-1])
    if top < array.size:
        table = np.zeros(top + 1, dtype=np.min_scalar_type(order.size))
        table[order] = np.arange(1, order.size + 1)
        return table[np.clip(array, 0, top)] if int(array.max(initial=0)) > top else table[array]
    index = np.searchsorted(order, array)
    return np.where(order[np.minimum(index, order.size - 1)] == array, index + 1, 0)


def union_boxes(truth: np.ndarray, pred: np.ndarray, values: Sequence[int]) -> dict[int, tuple[slice, ...] | None]:
    """For each value: the union of its boxes in both maps (None when absent from both).

    One ``find_objects`` pass per map over the values renumbered 1..len(values), so nothing is sized by the
    largest label value. Every metric here is unchanged by cropping to it.
    """
    order = np.asarray(sorted(values))
    boxes: dict[int, list] = {v: [] for v in order.tolist()}
    for array in (truth, pred):
        for value, box in zip(order.tolist(), ndimage.find_objects(_compact(array, order), order.size)):
            if box is not None:
                boxes[value].append(box)
    return {
        value: tuple(slice(min(b[a].start for b in found), max(b[a].stop for b in found)) for a in range(truth.ndim))
        if found else None
        for value, found in boxes.items()
    }  # fmt: skip


def truth_slices(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks on the axial slices z_first..z_last-1 of the truth (the reference's ``[z_lower:z_upper]``).

    The last labelled slice is left out, as in the benchmark script, so a one-slice organ scores NaN there
    and drops out of the means.
    """
    labelled = np.flatnonzero(truth.any(axis=tuple(a for a in range(truth.ndim) if a != AXIAL_AXIS)))
    keep = [slice(None)] * truth.ndim
    keep[AXIAL_AXIS] = slice(int(labelled[0]), int(labelled[-1]))
    return truth[tuple(keep)], pred[tuple(keep)]


def score_abdomen(truth: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> list[dict]:
    """FLARE22 / AMOS rows, one per organ 1..13, of one 3D case (x, y, z) at the header ``spacing``."""
    if truth.ndim != 3:
        raise UsemaError(f"the abdomen protocols score 3D volumes (x, y, z), got shape {truth.shape}")
    penalty = image_diagonal_mm(truth.shape, spacing)
    boxes = union_boxes(truth, pred, [o.index for o in FLARE22_ORGANS])
    rows = []
    for organ in FLARE22_ORGANS:
        box = boxes[organ.index]
        if box is None:  # absent from both
            rows.append(_row(organ.index, organ.name, 1.0, 1.0, organ.tolerance_mm, (math.nan, 0), 0, 0))
            continue
        t, p = truth[box] == organ.index, pred[box] == organ.index
        if not t.any():  # a prediction on an empty truth
            hd = (penalty, 1)
            rows.append(_row(organ.index, organ.name, 0.0, 0.0, organ.tolerance_mm, hd, 0, int(p.sum())))
            continue
        if organ.index in SLICE_RULE_ORGANS:
            t, p = truth_slices(t, p)
        distances = surface.surface_distances(t, p, spacing)
        hd = _hd95(distances, bool(t.any()), bool(p.any()), penalty)
        nsd = surface.surface_dice(distances, organ.tolerance_mm)
        rows.append(_row(organ.index, organ.name, dice_or_nan(t, p), nsd, organ.tolerance_mm, hd, int(t.sum()),
                         int(p.sum())))  # fmt: skip
    return rows


def score_endovis_frame(truth: np.ndarray, pred: np.ndarray, names: Mapping[int, str]) -> list[dict]:
    """Endovis17 rows of one 2D frame (H, W): one per class present in the truth or the prediction."""
    if truth.ndim != 2:
        raise UsemaError(f"the endovis17 protocol scores 2D frames, got shape {truth.shape}")
    penalty = image_diagonal_mm(truth.shape, (1.0, 1.0))
    present = sorted((set(np.unique(truth).tolist()) | set(np.unique(pred).tolist())) - {0})
    rows = []
    for value in present:
        t, p = truth == value, pred == value
        name = names.get(value, str(value))
        if not t.any():
            rows.append(_row(value, name, 0.0, 0.0, ENDOVIS_TOLERANCE, (penalty, 1), 0, int(p.sum())))
            continue
        distances = surface.surface_distances(t[..., None], p[..., None], ENDOVIS_SPACING)
        hd = _hd95(distances, True, bool(p.any()), penalty)
        nsd = surface.surface_dice(distances, ENDOVIS_TOLERANCE)
        rows.append(_row(value, name, dice_or_nan(t, p), nsd, ENDOVIS_TOLERANCE, hd, int(t.sum()), int(p.sum())))
    return rows


def score_generic(
    truth: np.ndarray,
    pred: np.ndarray,
    spacing: Sequence[float],
    labels: Mapping[int, str],
    tolerances: Mapping[int, float],
) -> list[dict]:
    """Generic rows, one per class of ``labels``: MONAI DSC / NSD / HD95 with the challenges' empty rules."""
    from usema.evaluation import metrics  # noqa: PLC0415 - MONAI's metrics are only needed here
    penalty = image_diagonal_mm(truth.shape, spacing)
    boxes = union_boxes(truth, pred, list(labels))
    rows = []
    for value, name in labels.items():
        box = boxes[value]
        if box is None:
            rows.append(_row(value, name, 1.0, 1.0, tolerances[value], (math.nan, 0), 0, 0))
            continue
        t, p = truth[box] == value, pred[box] == value
        scores = metrics.class_scores(p, t, spacing, tolerances[value])
        hd = (scores.hd95, 0) if t.any() and p.any() else (penalty, 1)
        rows.append(_row(value, name, scores.dsc, scores.nsd, tolerances[value], hd, scores.truth_voxels,
                         scores.pred_voxels))  # fmt: skip
    return rows
