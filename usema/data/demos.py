"""Real demo data that installs offline from PyPI wheels (``pip install "usema[demo]"``).

- brain: the MNI152 2009a T1 template with its grey/white matter probability maps from ``nilearn``.
  Labels: brain = T1/255 > 0.2; inside it argmax over (1 - gm - wm, gm, wm) -> 1 CSF, 2 GM, 3 WM.
  Grid 197 x 233 x 189 (1 mm); 2D networks see axial slices (voxel axis 2).
- nuclei: stardist's expert-labelled fluorescence nuclei image ``img2d.tif`` / ``mask2d.tif`` (512 x 512).

Neither package is imported (both are slow to import): files are located with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from usema.errors import UsemaError
from usema.io.labels import geometry_affine, read_image, read_label

BRAIN_LABELS = {0: "background", 1: "CSF", 2: "GM", 3: "WM"}
BRAIN_SHAPE = (197, 233, 189)
BRAIN_SLICE_AXIS = 2
BRAIN_VAL_SLAB = (95, 115)  # held-out axial slices z in [95, 115)
BRAIN_GAP = 5  # slices this close to the held-out slab are in neither split
BRAIN_THRESHOLD = 0.2

NUCLEI_LABELS = {
    "binary": {0: "background", 1: "nucleus"},
    "instance_boundary": {0: "background", 1: "interior", 2: "boundary"},
}
NUCLEI_VAL_COLUMN = 384  # train on columns 0..383, validate on 384..511 (x = last array axis)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsemaError(f"{package}: demo data needs the package; install it with pip install \"usema[demo]\"")
    return Path(list(spec.submodule_search_locations)[0])


def brain_files() -> dict[str, Path]:
    """Paths of the T1, GM and WM template files inside the installed nilearn package."""
    data = _package_dir("nilearn") / "datasets" / "data"
    files = {k: data / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    for path in files.values():
        if not path.is_file():
            raise UsemaError(f"{path}: missing from nilearn; reinstall it with pip install \"usema[demo]\"")
    return files


@dataclass
class BrainDemo:
    """The demo volume: ``t1`` (197, 233, 189) float32 raw 0..255, ``label`` uint8 classes, ``affine`` 4x4."""

    t1: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def brain_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Tissue classes from the template (all arrays 0..255): 0 outside, 1 CSF, 2 GM, 3 WM."""
    gm, wm = gm / np.float32(255), wm / np.float32(255)
    csf = 1 - gm - wm
    # argmax over (csf, gm, wm) with ties to the first, without stacking three volumes
    tissue = np.where(gm > csf, 2, 1).astype(np.uint8)
    tissue[wm > np.maximum(csf, gm)] = 3
    tissue[t1 / np.float32(255) <= BRAIN_THRESHOLD] = 0
    return tissue


def load_brain() -> BrainDemo:
    """Read the MNI152 template and derive its labels."""
    files = brain_files()
    (t1, *_), geometry = read_image(files["t1"])
    (gm, *_), _ = read_image(files["gm"])
    (wm, *_), _ = read_image(files["wm"])
    return BrainDemo(t1, brain_labels(t1, gm, wm), geometry_affine(geometry))


def brain_train_ranges() -> list[tuple[int, int]]:
    """Axial slice ranges [start, stop) used for training: all slices at least BRAIN_GAP from the held-out slab."""
    lo, hi = BRAIN_VAL_SLAB
    return [(0, lo - BRAIN_GAP), (hi + BRAIN_GAP, BRAIN_SHAPE[BRAIN_SLICE_AXIS])]


def nuclei_files() -> dict[str, Path]:
    """Paths of ``img2d.tif`` and ``mask2d.tif`` inside the installed stardist package."""
    images = _package_dir("stardist") / "data" / "images"
    files = {"image": images / "img2d.tif", "mask": images / "mask2d.tif"}
    for path in files.values():
        if not path.is_file():
            raise UsemaError(f"{path}: missing from stardist; reinstall it with pip install \"usema[demo]\"")
    return files


def instance_to_semantic(instances: np.ndarray, target: str) -> np.ndarray:
    """Instance ids (H, W) -> classes: binary (0 bg, 1 nucleus) or instance_boundary (0 bg, 1 interior, 2 boundary).

    Boundary = the instance's own pixels with a 4-neighbour of another label (background or another instance),
    i.e. skimage's ``find_boundaries(mode="inner")``.
    """
    foreground = instances > 0
    if target == "binary":
        return foreground.astype(np.uint8)
    cross = ndimage.generate_binary_structure(2, 1)
    highest = ndimage.maximum_filter(instances, footprint=cross)
    touches_other = highest != ndimage.minimum_filter(instances, footprint=cross)
    return np.where(foreground, np.where(touches_other, 2, 1), 0).astype(np.uint8)


def nuclei_tiles(tiles: int, shape: tuple[int, int] = (512, 512)) -> list[tuple[slice, slice]]:
    """(rows, columns) of ``tiles`` x ``tiles`` tiles covering the training columns 0..383 of the nuclei image, row
    by row: rows cut into ``tiles`` bands, the training columns into ``tiles`` bands (near-equal sizes)."""
    if not 1 <= tiles <= 32:
        raise UsemaError(f"--tiles: expected 1..32 tiles per side, got {tiles}")
    rows = np.array_split(np.arange(shape[0]), tiles)
    cols = np.array_split(np.arange(NUCLEI_VAL_COLUMN), tiles)
    return [(slice(r[0], r[-1] + 1), slice(c[0], c[-1] + 1)) for r in rows for c in cols]


def load_nuclei() -> tuple[np.ndarray, np.ndarray]:
    """The nuclei image (512, 512) float32 and its instance mask (512, 512) int32."""
    files = nuclei_files()
    (image, *_), _ = read_image(files["image"])
    return image, read_label(files["mask"])[0].astype(np.int32)
