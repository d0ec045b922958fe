"""Per-case segmentation metrics computed the way the challenges of the U-Mamba 2D suite compute them.

All functions take boolean masks or integer label arrays of shape ``(*spatial)`` (2D or 3D, in the
file's voxel index order) and the voxel spacing in mm for each of those axes.

Challenge rules (FLARE22 / U-Mamba evaluation scripts):
- DSC and NSD: empty truth and empty prediction = 1; a prediction on an empty truth = 0; an empty
  prediction on a non-empty truth = 0.
- HD95: undefined (NaN) when either mask is empty; callers exclude NaN from means.
- Instance F1 (NeurIPS 2022 Cell Segmentation): instances are the connected components
  (full connectivity) of the interior class; a true positive is a one-to-one match with IoU >= 0.5;
  cells within 2 pixels of the image border are ignored; F1 = 0 when there is no true positive.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

# the challenge scripts ignore cells touching this many pixels at the image border
BORDER_MARGIN = 2


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks of equal shape ``(*spatial)``, with the challenge's empty rules."""
    n_pred, n_truth = int(pred.sum()), int(truth.sum())
    if n_truth == 0:
        return 1.0 if n_pred == 0 else 0.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / (n_pred + n_truth)


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


def overlapping_pairs(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth id, prediction id, IoU) of every pair of instances that overlap, from two instance maps.

    Sparse, so that whole-slide images with thousands of cells need no dense IoU matrix.
    """
    n_pred = int(pred.max(initial=0))
    truth, pred = truth.astype(np.int64).ravel(), pred.astype(np.int64).ravel()
    area_truth, area_pred = np.bincount(truth), np.bincount(pred, minlength=n_pred + 1)
    both = (truth > 0) & (pred > 0)
    pairs, overlap = np.unique(truth[both] * (n_pred + 1) + pred[both], return_counts=True)
    truth_ids, pred_ids = np.divmod(pairs, n_pred + 1)
    iou = overlap / (area_truth[truth_ids] + area_pred[pred_ids] - overlap)
    return truth_ids, pred_ids, iou


def count_matches(truth_ids: np.ndarray, pred_ids: np.ndarray, iou: np.ndarray, threshold: float = 0.5) -> int:
    """Most one-to-one truth/prediction pairs with IoU >= ``threshold``.

    The challenge solves an assignment whose cost counts pairs above the threshold first (IoU only
    breaks ties), i.e. a maximum-cardinality matching of the above-threshold pairs; it is computed
    here on the sparse pair graph, so thousands of cells stay cheap.
    """
    above = iou >= threshold
    if not above.any():
        return 0
    graph = csr_matrix((np.ones(int(above.sum())), (truth_ids[above], pred_ids[above])))
    return int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())


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
    iou_threshold: float = 0.5,
    exclude_border: bool = True,
) -> InstanceScores:
    """Instance F1 of two semantic label maps ``(*spatial)``: instances = components of ``interior_label``."""
    truth_instances = label_instances(truth == interior_label, exclude_border)
    pred_instances = label_instances(pred == interior_label, exclude_border)
    n_truth, n_pred = int(truth_instances.max(initial=0)), int(pred_instances.max(initial=0))
    tp = count_matches(*overlapping_pairs(truth_instances, pred_instances), threshold=iou_threshold)
    return InstanceScores(tp=tp, fp=n_pred - tp, fn=n_truth - tp)


@dataclass(frozen=True)
class ClassScores:
    """Metrics of one class in one case; ``hd95`` is NaN when either mask is empty."""

    dsc: float
    nsd: float
    hd95: float
    truth_voxels: int
    pred_voxels: int


def class_scores(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float,
    truth_slices_axis: int | None = None,
) -> ClassScores:
    """DSC, NSD and HD95 of one class, from boolean masks ``(*spatial)``.

    ``truth_slices_axis``: restrict both masks to the slices along that axis where the truth is
    labelled (FLARE22 does this for aorta, IVC and oesophagus, whose annotated extent is arbitrary).
    """
    if truth_slices_axis is not None and truth.any():
        pred, truth = restrict_to_truth_slices(pred, truth, truth_slices_axis)
    return ClassScores(
        dsc=dice_score(pred, truth),
        nsd=surface_dice(pred, truth, spacing, tolerance_mm),
        hd95=hausdorff95(pred, truth, spacing),
        truth_voxels=int(truth.sum()),
        pred_voxels=int(pred.sum()),
    )


def restrict_to_truth_slices(pred: np.ndarray, truth: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Both masks limited to the truth's labelled range along ``axis``.

    FLARE22's reference code slices ``[first:last]`` (last labelled slice excluded); that is kept so
    that scores match the published ones, except that a single labelled slice is kept.
    """
    other_axes = tuple(a for a in range(truth.ndim) if a != axis)
    labelled = np.flatnonzero(truth.any(axis=other_axes))
    first, last = int(labelled[0]), int(labelled[-1])
    keep = [slice(None)] * truth.ndim
    keep[axis] = slice(first, max(last, first + 1))
    return pred[tuple(keep)], truth[tuple(keep)]
