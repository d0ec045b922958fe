"""NeurIPS 2022 Cell Segmentation instance F1, as the benchmark's ``compute_cell_metric.py`` computes it.

Ground truth = the dataset's instance masks (one id per cell); prediction instances = connected components
(full connectivity) of the interior class. In each scored region (the whole image, or each 2000×2000 tile of
an image with at least 25 M pixels, zero-padded to whole tiles), cells with a pixel within 2 px of the region's
border are removed from both maps and the ids renumbered; TP = the most one-to-one pairs with IoU >= 0.5
(``linear_sum_assignment`` on the reference's cost); a region without predicted cells adds no TP. Counts are
summed over tiles; precision = TP / predicted cells, recall = TP / true cells, F1 = 0 when TP = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.measure import label as connected_components_of

BORDER_MARGIN = 2
TILE_THRESHOLD_PIXELS = 25_000_000
TILE_SIZE = 2000
IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class CellCounts:
    """Matched, true and predicted cell counts of one image (summed over its tiles)."""

    tp: int
    n_true: int
    n_pred: int

    @property
    def precision(self) -> float:
        return self.tp / self.n_pred if self.tp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / self.n_true if self.tp else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if self.tp else 0.0

    def __add__(self, other: CellCounts) -> CellCounts:
        return CellCounts(self.tp + other.tp, self.n_true + other.n_true, self.n_pred + other.n_pred)


def remove_border_cells(instances: np.ndarray) -> np.ndarray:
    """Instances renumbered 1..n after dropping every cell with a pixel within BORDER_MARGIN of the border."""
    inner = np.zeros(instances.shape, dtype=bool)
    inner[tuple(slice(BORDER_MARGIN, s - BORDER_MARGIN) for s in instances.shape)] = True
    kept = instances.copy()
    kept[np.isin(instances, np.unique(instances[~inner]))] = 0
    return relabel_sequential(kept)


def relabel_sequential(instances: np.ndarray) -> np.ndarray:
    """Ids renumbered 1..n in increasing order, 0 kept (only cell pixels are sorted; no table sized by an id)."""
    out = np.zeros(instances.shape, dtype=np.int64)
    foreground = instances > 0
    ids = instances[foreground]
    out[foreground] = np.searchsorted(np.unique(ids), ids) + 1
    return out


def _overlapping_pairs(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth id, prediction id, IoU) of every overlapping pair; sparse, so thousands of cells stay cheap."""
    n_pred = int(pred.max(initial=0))
    truth, pred = truth.ravel(), pred.ravel()
    area_truth, area_pred = np.bincount(truth), np.bincount(pred, minlength=n_pred + 1)
    both = (truth > 0) & (pred > 0)
    pairs, overlap = np.unique(truth[both] * (n_pred + 1) + pred[both], return_counts=True)
    truth_ids, pred_ids = np.divmod(pairs, n_pred + 1)
    return truth_ids, pred_ids, overlap / (area_truth[truth_ids] + area_pred[pred_ids] - overlap)


def count_true_positives(truth: np.ndarray, pred: np.ndarray) -> int:
    """The reference's Hungarian TP count, solved per group of cells linked by IoU >= 0.5 pairs.

    Its cost ``-(IoU >= 0.5) - IoU / (2 n_min)`` counts above-threshold pairs first (the IoU term sums to
    less than 1), so the TP count is the largest matching of those pairs, which splits into the groups.
    """
    n_true, n_pred = int(truth.max(initial=0)), int(pred.max(initial=0))
    truth_ids, pred_ids, iou = _overlapping_pairs(truth, pred)
    above = iou >= IOU_THRESHOLD
    truth_ids, pred_ids, iou = truth_ids[above], pred_ids[above], iou[above]
    if not iou.size:
        return 0
    graph = coo_matrix((np.ones(iou.size), (truth_ids, n_true + 1 + pred_ids)), shape=(n_true + n_pred + 2,) * 2)
    group = connected_components(graph, directed=False)[1][truth_ids]
    single = np.bincount(group)[group] == 1  # IoU >= 0.5 pairs are almost always one-to-one already
    tp = int(single.sum())
    for g in np.unique(group[~single]):
        members = group == g
        rows, row_ids = np.unique(truth_ids[members], return_inverse=True)
        cols, col_ids = np.unique(pred_ids[members], return_inverse=True)
        block = np.zeros((rows.size, cols.size))
        block[row_ids, col_ids] = iou[members]
        r, c = linear_sum_assignment(-(block >= IOU_THRESHOLD).astype(float) - block / (2 * min(n_true, n_pred)))
        tp += int((block[r, c] >= IOU_THRESHOLD).sum())
    return tp


def region_counts(truth: np.ndarray, pred: np.ndarray) -> CellCounts:
    """Counts of one scored region (image or tile): border cells removed, ids renumbered, then matched."""
    truth, pred = remove_border_cells(truth), remove_border_cells(pred)
    n_true, n_pred = int(truth.max(initial=0)), int(pred.max(initial=0))
    tp = count_true_positives(truth, pred) if n_pred else 0
    return CellCounts(tp, n_true, n_pred)


def prediction_instances(pred_labels: np.ndarray, interior_label: int) -> np.ndarray:
    """Connected components (full connectivity, skimage's default) of the interior class."""
    return connected_components_of(pred_labels == interior_label).astype(np.int64)


def cell_counts(truth_instances: np.ndarray, pred_labels: np.ndarray, interior_label: int = 1) -> CellCounts:
    """Instance counts of one image: ``truth_instances`` ids (H, W), ``pred_labels`` semantic classes (H, W)."""
    pred = prediction_instances(pred_labels, interior_label)
    truth = truth_instances.astype(np.int64)
    if truth.size < TILE_THRESHOLD_PIXELS:
        return region_counts(truth, pred)
    padded_shape = tuple(-(-s // TILE_SIZE) * TILE_SIZE for s in truth.shape)
    total = CellCounts(0, 0, 0)
    for top in range(0, padded_shape[0], TILE_SIZE):
        for left in range(0, padded_shape[1], TILE_SIZE):
            tile = (slice(top, top + TILE_SIZE), slice(left, left + TILE_SIZE))
            total += region_counts(_padded_tile(truth, tile), _padded_tile(pred, tile))
    return total


def _padded_tile(array: np.ndarray, tile: tuple[slice, slice]) -> np.ndarray:
    """The TILE_SIZE² window ``tile`` of ``array`` zero-padded past its edge (the reference pads the image)."""
    out = np.zeros((TILE_SIZE, TILE_SIZE), dtype=array.dtype)
    part = array[tile]
    out[: part.shape[0], : part.shape[1]] = part
    return out
