"""Surface distances as DeepMind's ``surface-distance`` package computes them (the benchmark scripts call it).

Surface elements sit on the corners of the voxel grid. The 2×2 (2D) or 2×2×2 (3D) neighbourhood of a corner
is encoded as a bit code; codes other than "all outside" and "all inside" are surface elements, whose contour
length (2D) or marching-cubes area (3D) comes from DeepMind's lookup table at the given spacing. Each element's
distance is the Euclidean distance in mm to the nearest element of the other surface (scipy's exact EDT on the
corner grid, as DeepMind does). MONAI ships DeepMind's tables unchanged; they are read from MONAI and evaluated
in float64 (MONAI's own surface metrics use float32 and a KD-tree, which can flip an element lying exactly at
the tolerance).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from monai.metrics.utils import _get_neighbour_code_to_normals_table, create_table_neighbour_code_to_contour_length
from scipy import ndimage

# DeepMind's neighbourhood encoding: the corner's lower neighbour along every axis carries the highest bit
ENCODING_KERNEL = {
    2: np.array([[8, 4], [2, 1]]),
    3: np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]]),
}


@dataclass(frozen=True)
class SurfaceDistances:
    """Distances (mm) of each surface element to the other surface and the elements' sizes (mm or mm²)."""

    truth_to_pred: np.ndarray
    pred_to_truth: np.ndarray
    truth_areas: np.ndarray
    pred_areas: np.ndarray


@functools.lru_cache(maxsize=64)
def measure_table(spacing: tuple[float, ...]) -> np.ndarray:
    """Contour length (2D) or surface area (3D) of every neighbourhood code at ``spacing`` (float64)."""
    if len(spacing) == 2:
        return np.asarray(create_table_neighbour_code_to_contour_length(spacing)[0].numpy(), dtype=np.float64)
    # each triangle's normal has the triangle's area as length; scaling axes scales its components like this
    normals = _get_neighbour_code_to_normals_table().double().numpy()
    scale = np.array([spacing[1] * spacing[2], spacing[0] * spacing[2], spacing[0] * spacing[1]])
    return np.linalg.norm(normals * scale, axis=-1).sum(axis=-1)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel (mask must have one)."""
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Code of every corner of ``mask``'s voxel grid (shape + 1 per axis); outside the array counts as 0."""
    padded = np.pad(mask.astype(np.uint16), 1)
    kernel = ENCODING_KERNEL[mask.ndim]
    codes = np.zeros(tuple(s + 1 for s in mask.shape), dtype=np.uint16)
    for offset in np.ndindex(*kernel.shape):
        window = tuple(slice(o, o + n) for o, n in zip(offset, codes.shape))
        codes += padded[window] * np.uint16(kernel[offset])
    return codes


def _distance_map(border: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    if not border.any():
        return np.full(border.shape, np.inf)
    return ndimage.distance_transform_edt(~border, sampling=spacing)


def surface_distances(truth: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> SurfaceDistances:
    """DeepMind's ``compute_surface_distances`` of two boolean masks (2D or 3D) at ``spacing`` (mm per axis)."""
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != truth.ndim or truth.ndim not in (2, 3):
        raise ValueError(f"spacing {spacing} does not match a {truth.ndim}D mask")
    union = truth | pred
    if not union.any():
        empty = np.zeros(0)
        return SurfaceDistances(empty, empty, empty, empty)
    box = _bounding_box(union)
    full = (1 << (2**truth.ndim)) - 1
    codes_truth, codes_pred = neighbour_codes(truth[box]), neighbour_codes(pred[box])
    border_truth = (codes_truth != 0) & (codes_truth != full)
    border_pred = (codes_pred != 0) & (codes_pred != full)
    table = measure_table(spacing)
    return SurfaceDistances(
        truth_to_pred=_distance_map(border_pred, spacing)[border_truth],
        pred_to_truth=_distance_map(border_truth, spacing)[border_pred],
        truth_areas=table[codes_truth[border_truth]],
        pred_areas=table[codes_pred[border_pred]],
    )


def surface_dice(distances: SurfaceDistances, tolerance_mm: float) -> float:
    """DeepMind's ``compute_surface_dice_at_tolerance``; NaN when both surfaces are empty (0/0, as there)."""
    total = distances.truth_areas.sum() + distances.pred_areas.sum()
    if total == 0:
        return math.nan
    close = (
        distances.truth_areas[distances.truth_to_pred <= tolerance_mm].sum()
        + distances.pred_areas[distances.pred_to_truth <= tolerance_mm].sum()
    )
    return float(close / total)


def _percentile_distance(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    if distances.size == 0:
        return math.inf
    order = np.lexsort((areas, distances))  # DeepMind sorts the (distance, area) pairs
    cumulative = np.cumsum(areas[order]) / areas.sum()
    index = int(np.searchsorted(cumulative, percent / 100.0))
    return float(distances[order][min(index, distances.size - 1)])


def robust_hausdorff(distances: SurfaceDistances, percent: float = 95.0) -> float:
    """DeepMind's ``compute_robust_hausdorff``: area-weighted ``percent`` percentile, the larger direction."""
    return max(
        _percentile_distance(distances.truth_to_pred, distances.truth_areas, percent),
        _percentile_distance(distances.pred_to_truth, distances.pred_areas, percent),
    )
