"""Per-case metrics of the ``generic`` protocol (MONAI surface metrics with the challenges' empty rules).

All functions take boolean masks or integer label arrays of shape ``(*spatial)`` (2D or 3D, in the
file's voxel index order) and the voxel spacing in mm for each of those axes.

Challenge rules (FLARE22 / U-Mamba evaluation scripts):
- DSC and NSD: empty truth and empty prediction = 1; a prediction on an empty truth = 0; an empty
  prediction on a non-empty truth = 0.
- HD95: NaN when either mask is empty; the protocols (usema.evaluation.scoring) score a one-sided miss with
  the image diagonal instead.
- Instance F1 of two semantic maps: instances are the connected components (full connectivity) of the
  interior class in both; a true positive is a one-to-one match with IoU >= 0.5; cells within 2 pixels of
  the image border are ignored; F1 = 0 when there is no true positive. (The benchmark's own rule, against
  instance ground truth, is ``usema.evaluation.cells``.)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage

from usema.evaluation.cells import BORDER_MARGIN, count_true_positives
from usema.evaluation.scoring import dice_or_nan


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks of equal shape ``(*spatial)``, with the challenge's empty rules: both empty = 1
    (where DeepMind's definition gives NaN), a prediction on empty truth = 0."""
    value = dice_or_nan(truth, pred)
    return 1.0 if math.isnan(value) else value


def crop_to_union(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to the bounding box of ``pred | truth`` plus one voxel (clipped to the image).

    Surface metrics only look at boundaries, so this changes no result; it bounds memory and time on
    large volumes. Requires at least one foreground voxel.
    """
    union = pred | truth
    box = []
    for axis in range(union.ndim):
        present = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(int(present[0]) - 1, 0), int(present[-1]) + 2))
    return pred[tuple(box)], truth[tuple(box)]


def _as_batch(mask: np.ndarray) -> torch.Tensor:
    """(*spatial) bool -> (1, 1, *spatial) bool tensor, the one-class one-hot layout MONAI expects."""
    return torch.from_numpy(np.ascontiguousarray(mask))[None, None]


def _spacing(spacing: Sequence[float], ndim: int) -> list[float]:
    if len(spacing) != ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {ndim}D mask")
    return [float(s) for s in spacing]  # MONAI wants one numeric type


def surface_dice(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Normalized surface Dice of two boolean masks ``(*spatial)`` (2D or 3D) at ``tolerance_mm``.

    Uses MONAI's ``compute_surface_dice`` with sub-voxel boundaries (DeepMind surface-distance
    convention: marching-squares contour lengths in 2D, marching-cubes surface areas in 3D; MONAI 1.6
    supports both). Empty rules as for DSC.
    """
    n_pred, n_truth = bool(pred.any()), bool(truth.any())
    if not n_truth:
        return 1.0 if not n_pred else 0.0
    if not n_pred:
        return 0.0
    pred, truth = crop_to_union(pred, truth)
    with warnings.catch_warnings():
        # MONAI 1.6 warns about its own internal use of a deprecated argument on every call
        warnings.simplefilter("ignore", FutureWarning)
        nsd = compute_surface_dice(
            _as_batch(pred),
            _as_batch(truth),
            class_thresholds=[float(tolerance_mm)],
            include_background=True,
            spacing=_spacing(spacing, pred.ndim),
            use_subvoxels=True,
        )
    return float(nsd[0, 0])


def hausdorff95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (MONAI); NaN when either mask is empty."""
    if not pred.any() or not truth.any():
        return float("nan")
    pred, truth = crop_to_union(pred, truth)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        hd = compute_hausdorff_distance(
            _as_batch(pred),
            _as_batch(truth),
            include_background=True,
            percentile=95,
            spacing=_spacing(spacing, pred.ndim),
        )
    return float(hd[0, 0])


def label_instances(mask: np.ndarray, exclude_border: bool = True) -> np.ndarray:
    """Connected components (full connectivity, like skimage.measure.label) of a boolean mask.

    Returns int32 instance ids ``(*spatial)``, 0 = background, 1..n consecutive. With
    ``exclude_border`` the components with a voxel within ``BORDER_MARGIN`` of the image border
    are dropped, as the NeurIPS Cell challenge does.
    """
    instances, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if not exclude_border or n == 0:
        return instances.astype(np.int32)
    inner = np.zeros(mask.shape, dtype=bool)
    inner[tuple(slice(BORDER_MARGIN, max(s - BORDER_MARGIN, BORDER_MARGIN)) for s in mask.shape)] = True
    touching = np.unique(instances[~inner])
    keep = np.ones(n + 1, dtype=bool)
    keep[touching] = False
    keep[0] = False
    # relabel the kept components 1..m in order
    new_ids = np.zeros(n + 1, dtype=np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new_ids[instances]


@dataclass(frozen=True)
class InstanceScores:
    """Instance detection counts and scores of one case."""

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp else 0.0

    @property
    def f1(self) -> float:
        """2TP / (2TP + FP + FN); 0 without a true positive (the challenge's rule, even when both are empty)."""
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp else 0.0


def instance_f1(
    pred: np.ndarray,
    truth: np.ndarray,
    interior_label: int = 1,
    exclude_border: bool = True,
) -> InstanceScores:
    """Instance F1 of two semantic label maps ``(*spatial)``: instances = components of ``interior_label``."""
    truth_instances = label_instances(truth == interior_label, exclude_border)
    pred_instances = label_instances(pred == interior_label, exclude_border)
    n_truth, n_pred = int(truth_instances.max(initial=0)), int(pred_instances.max(initial=0))
    tp = count_true_positives(truth_instances.astype(np.int64), pred_instances.astype(np.int64))
    return InstanceScores(tp=tp, fp=n_pred - tp, fn=n_truth - tp)


@dataclass(frozen=True)
class ClassScores:
    """Metrics of one class in one case; ``hd95`` is NaN when either mask is empty."""

    dsc: float
    nsd: float
    hd95: float
    truth_voxels: int
    pred_voxels: int


def class_scores(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> ClassScores:
    """DSC, NSD and HD95 of one class, from boolean masks ``(*spatial)``."""
    return ClassScores(
        dsc=dice_score(pred, truth),
        nsd=surface_dice(pred, truth, spacing, tolerance_mm),
        hd95=hausdorff95(pred, truth, spacing),
        truth_voxels=int(truth.sum()),
        pred_voxels=int(pred.sum()),
    )
