"""Label maps on top of ``usema.io.images`` (which owns decoding and the input checks).

Integer label maps in a compact type; the grid functions of ``usema.io.geometry`` are re-exported here, as
datasets and evaluation compare an image's grid with its label's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from usema.errors import UsemaError
from usema.io.arrays import integer_labels
from usema.io.geometry import Geometry, geometry_affine, geometry_spacing, same_grid
from usema.io.images import decode, read_image

__all__ = ["Geometry", "read_image", "read_label", "geometry_affine", "geometry_spacing", "same_grid"]

LABEL_ATOL = 1e-3


def read_label(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Integer class map (*spatial) of a single-channel label file, in the smallest integer type holding it.

    Palette PNGs give their palette indices. Integer files are never converted through floats; float-stored
    labels must hold integers (within LABEL_ATOL) and are converted block by block. Raises UsemaError naming
    the file for multi-channel files, NaN/inf or fractional values.
    """
    data, geometry = decode(path, palette_indices=True)
    if data.shape[0] != 1:
        raise UsemaError(f"{path}: expected a single-channel label map, got {data.shape[0]} channels")
    return integer_labels(data[0], str(path), LABEL_ATOL), geometry
