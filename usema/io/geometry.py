"""Voxel grids: what is needed to write an array back onto a file's grid, and comparing two grids."""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

# NIfTI headers store affines as float32: compare grids with a tolerance (nnU-Net uses a similar one)
AFFINE_ATOL = 1e-3
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Geometry:
    """Everything needed to write an array back onto the grid of the file it was read from.

    ``kind`` is "nifti", "itk" or "planar"; ``shape`` the spatial shape in array order.
    """

    kind: str
    shape: tuple[int, ...]
    suffix: str
    nifti_header: nib.Nifti1Header | None = None
    nifti_class: type | None = None
    itk: dict = field(default_factory=dict)


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
