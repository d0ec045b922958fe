"""Resampling to a target spacing and back, as nnU-Net v2 does it.

- Images: cubic spline (order 3). When the data is strongly anisotropic (largest / smallest spacing > 3), the
  coarse axis is handled separately, as nnU-Net: order 3 within each plane, nearest neighbour (order 0) across
  planes.
- Labels: each class is resampled as a binary mask with linear interpolation and set where it reaches 0.5,
  class by class in increasing order (nnU-Net's ``resize_segmentation``): no new classes, no fractional values.
- Predicted probabilities go back onto the input grid with linear interpolation, one block of output planes
  at a time, so the caller can take the argmax block by block without the full-size probabilities in memory.

Grids are aligned at voxel edges (scikit-image ``resize`` convention): output voxel ``o`` of an axis resized
from ``n`` to ``m`` voxels samples input coordinate ``(o + 0.5) · n / m − 0.5``. A ``None`` target spacing keeps
that axis (2D models on volumes are resampled in-plane only).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from scipy import ndimage

ANISOTROPY_RATIO = 3.0


def target_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float | None]) -> tuple[int, ...]:
    """The shape of ``shape`` voxels of ``spacing`` mm resampled to ``target`` mm (None keeps the axis)."""
    return tuple(
        int(n) if t is None else max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target)
    )


def _coarse_axis(spacing: Sequence[float], axes: Sequence[int]) -> int | None:
    """The strongly anisotropic axis among ``axes`` (resampled separately), if any."""
    values = [spacing[a] for a in axes]
    if len(values) < 3 or max(values) <= ANISOTROPY_RATIO * min(values):
        return None
    return axes[int(np.argmax(values))]


def resize(array: np.ndarray, shape: Sequence[int], order: int, start: int = 0, axis: int = 0,
           length: int | None = None) -> np.ndarray:
    """``array`` (*S) resized to ``shape`` with spline ``order``; edge-aligned, edges extended (nearest).

    With ``length``, only output planes ``start .. start + length`` along ``axis`` are computed.
    """
    scale = np.array([n / m for n, m in zip(array.shape, shape)], float)
    out_shape = list(shape)
    first = np.zeros(len(shape))
    if length is not None:
        out_shape[axis] = length
        first[axis] = start
    offset = (first + 0.5) * scale - 0.5
    if tuple(out_shape) == array.shape and not offset.any():
        return np.array(array, dtype=np.float32)
    return ndimage.affine_transform(np.asarray(array, np.float32), scale, offset=offset, output_shape=out_shape,
                                    order=order, mode="nearest", prefilter=order > 1)


def resample_image(image: np.ndarray, spacing: Sequence[float], target: Sequence[float | None]) -> np.ndarray:
    """Image (C, *S) at ``spacing`` resampled to ``target`` (float32), nnU-Net's orders."""
    shape = target_shape(image.shape[1:], spacing, target)
    if shape == image.shape[1:]:
        return np.asarray(image, np.float32)
    coarse = _coarse_axis(spacing, [a for a, t in enumerate(target) if t is not None])
    out = np.empty((image.shape[0], *shape), np.float32)
    for c in range(image.shape[0]):
        if coarse is None:
            out[c] = _resize_planes(image[c], shape, 3, [a for a, t in enumerate(target) if t is None])
            continue
        in_plane = [shape[a] if a != coarse else image.shape[1 + a] for a in range(len(shape))]
        planes = _resize_planes(image[c], in_plane, 3, [coarse])
        out[c] = resize(planes, shape, 0)  # nearest across planes
    return out


def _resize_planes(volume: np.ndarray, shape: Sequence[int], order: int, kept: Sequence[int]) -> np.ndarray:
    """Resize ``volume`` to ``shape`` plane by plane along the single kept axis (so nothing mixes across it)."""
    if not kept:
        return resize(volume, shape, order)
    axis = kept[0]
    moved = np.moveaxis(volume, axis, 0)
    plane_shape = [s for a, s in enumerate(shape) if a != axis]
    out = np.stack([resize(plane, plane_shape, order) for plane in moved])
    return np.moveaxis(out, 0, axis)


def resample_labels(label: np.ndarray, shape: Sequence[int], kept: Sequence[int] = ()) -> np.ndarray:
    """Label map (*S) resized to ``shape`` class by class (linear on the mask, threshold 0.5), dtype kept.

    ``kept`` lists axes of unchanged size to resample plane by plane (2D models' slice axis).
    """
    if tuple(shape) == label.shape:
        return label.copy()
    out = np.zeros(tuple(shape), label.dtype)
    for cls in np.flatnonzero(np.bincount(label.reshape(-1).astype(np.int64))):
        if cls == 0:
            continue
        mask = _resize_planes((label == cls).astype(np.float32), shape, 1, list(kept))
        out[mask >= 0.5] = cls
    return out


def probability_blocks(
    probabilities: np.ndarray, shape: Sequence[int], axis: int, block_bytes: int = 64 * 2**20
) -> Iterator[tuple[slice, np.ndarray]]:
    """Probabilities (K, *S') brought back to ``shape`` (linear), as (planes along ``axis``, (K, *block)) pairs.

    Each block holds about ``block_bytes`` of float32 output, so the caller's argmax never needs the whole
    resampled probability volume at once.
    """
    plane_bytes = 4 * probabilities.shape[0] * int(np.prod(shape)) // max(shape[axis], 1)
    step = max(1, block_bytes // max(plane_bytes, 1))
    for start in range(0, shape[axis], step):
        length = min(step, shape[axis] - start)
        block = np.stack([resize(p, shape, 1, start=start, axis=axis, length=length) for p in probabilities])
        yield slice(start, start + length), block
