"""Training-side reading on top of ``usema.io.images`` (which owns decoding and geometry).

Adds what datasets need beyond images: integer label maps, and the affine / spacing of a grid so that an
image and its label can be compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from usema.errors import UsemaError
from usema.io.images import Geometry, image_suffix, read_image

__all__ = ["Geometry", "read_image", "read_label", "geometry_affine", "geometry_spacing", "same_grid"]

# NIfTI headers store affines as float32: compare grids with a tolerance (nnU-Net uses a similar one)
AFFINE_ATOL = 1e-3
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
LABEL_ATOL = 1e-3


def _read_palette_png(path: Path) -> tuple[np.ndarray, Geometry] | None:
    """(1, H, W) palette indices of a palette ("P" mode) PNG, else None: for labels the index is the class."""
    if image_suffix(path) != ".png" or not path.is_file():
        return None
    try:
        with Image.open(path) as img:
            if img.mode != "P":
                return None
            indices = np.asarray(img, dtype=np.float32)
    except OSError:
        return None  # read_image reports unreadable files
    return indices[None], Geometry("planar", indices.shape, ".png")


def read_label(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Integer class map (*spatial) int64 of a single-channel label file, and its geometry.

    Palette PNGs give their palette indices. Raises UsemaError naming the file for multi-channel files or
    values that are not integers (within LABEL_ATOL, which float-stored labels need).
    """
    path = Path(path)
    data, geometry = _read_palette_png(path) or read_image(path)
    if data.shape[0] != 1:
        raise UsemaError(f"{path}: expected a single-channel label map, got {data.shape[0]} channels")
    labels = np.rint(data[0])
    if np.abs(labels - data[0]).max(initial=0) > LABEL_ATOL:
        raise UsemaError(f"{path}: expected integer class labels, found fractional values")
    return labels.astype(np.int64), geometry


def geometry_affine(geometry: Geometry) -> np.ndarray:
    """Voxel-to-world (RAS, mm) 4x4 affine of a grid; identity for PNG/TIFF images."""
    ndim = len(geometry.shape)
    if geometry.kind == "nifti":
        return np.asarray(geometry.nifti_header.get_best_affine(), dtype=np.float64)
    affine = np.eye(4)
    if geometry.kind == "itk":
        direction = np.asarray(geometry.itk["direction"], dtype=np.float64).reshape(ndim, ndim)
        affine[:ndim, :ndim] = direction * np.asarray(geometry.itk["spacing"])[None, :]
        affine[:ndim, 3] = geometry.itk["origin"]
        affine = LPS_TO_RAS @ affine
    return affine


def geometry_spacing(geometry: Geometry) -> tuple[float, ...]:
    """Voxel size (mm) along each array axis; 1.0 for PNG/TIFF pixels."""
    ndim = len(geometry.shape)
    if geometry.kind == "nifti":
        return tuple(float(z) for z in geometry.nifti_header.get_zooms()[:ndim])
    if geometry.kind == "itk":
        return tuple(float(s) for s in geometry.itk["spacing"])
    return (1.0,) * ndim


def same_grid(a: Geometry, b: Geometry) -> bool:
    """Whether two geometries describe the same voxel grid (shape and affine within AFFINE_ATOL)."""
    return tuple(a.shape) == tuple(b.shape) and np.allclose(geometry_affine(a), geometry_affine(b), atol=AFFINE_ATOL)


def read_case_image(paths: Sequence[Path]) -> tuple[np.ndarray, Geometry]:
    """Channels of one case stacked as (C, *spatial) float32; every channel file must share one grid."""
    arrays, first = [], None
    for path in paths:
        data, geometry = read_image(path)
        if first is not None and not same_grid(first, geometry):
            raise UsemaError(f"{path}: expected the same shape and affine as {Path(paths[0]).name}")
        first = first or geometry
        arrays.append(data)
    return np.concatenate(arrays, axis=0), first
