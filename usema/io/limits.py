"""Resource limits checked against an image's header before any voxel is allocated.

The voxel limit defaults to what fits in half of the machine's memory as float32 and can be set with the
environment variable ``USEMA_MAX_IMAGE_VOXELS`` (voxels of one file, channels included).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from usema.errors import UsemaError

VOXELS_ENV = "USEMA_MAX_IMAGE_VOXELS"
FLOAT32_BYTES = 4
# a compressed stream may run this far past the end of the data its header promises (writers' padding)
GZIP_SLACK_BYTES = 1 << 16
# bytes a NIfTI header and its extensions may take before the voxel data
MAX_HEADER_BYTES = 16 << 20
# text headers (MetaImage, NRRD) are read up to this size to find their data-file reference
MAX_TEXT_HEADER_BYTES = 1 << 16


def physical_memory_bytes() -> int:
    """Total physical memory of the machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def max_image_voxels() -> int:
    """The largest number of voxels one image file may hold ($USEMA_MAX_IMAGE_VOXELS or half the memory)."""
    raw = os.environ.get(VOXELS_ENV, "").strip()
    if not raw:
        return physical_memory_bytes() // 2 // FLOAT32_BYTES
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise UsemaError(f"{VOXELS_ENV}: expected a positive integer number of voxels, got {raw!r}")
    return limit


def check_voxels(path: str | Path, shape: Sequence[int], components: int = 1) -> None:
    """Refuse ``path`` when its header promises more than ``max_image_voxels()`` voxels (before reading data)."""
    if any(int(s) < 0 for s in shape) or components < 1:
        raise UsemaError(f"{path}: expected non-negative sizes in the header, got shape {tuple(shape)}")
    voxels = math.prod(int(s) for s in shape) * components
    limit = max_image_voxels()
    if voxels > limit:
        raise UsemaError(
            f"{path}: the header promises {voxels} voxels {tuple(int(s) for s in shape)}, more than the limit "
            f"of {limit} (set {VOXELS_ENV} to raise it)"
        )
