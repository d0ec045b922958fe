"""Which files are scored, and how they are read: case matching, label maps, grid and value checks.

Decoding belongs to ``usema.io`` (NIfTI through nibabel with the header's zooms as spacing, ITK formats
through SimpleITK, PNG / TIFF unchanged with spacing 1); this module pairs predictions with references by
case name and refuses what cannot be scored before any per-class work is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable

import numpy as np

from usema.errors import UsemaError
from usema.io.images import SUFFIXES, Geometry
from usema.io.labels import geometry_spacing, read_label, same_grid

# the NeurIPS Cell dataset ships its instance masks as <case>_label.tiff
INSTANCE_SUFFIXES = ("_label.tiff", "_label.tif")


@dataclass
class LabelMap:
    """Integer labels ``(*spatial)`` as stored (int64), the spacing (mm) of each axis and the file's grid."""

    array: np.ndarray
    spacing: tuple[float, ...]
    geometry: Geometry | None


def read_labels(path: str | Path) -> LabelMap:
    """Read a label map; negative values are refused (no label is negative)."""
    array, geometry = read_label(path)
    if array.size and int(array.min()) < 0:
        raise UsemaError(f"{path}: expected label values >= 0, found {int(array.min())}")
    return LabelMap(array, tuple(geometry_spacing(geometry)), geometry)


def empty_like(truth: LabelMap) -> LabelMap:
    """An all-background prediction on the reference's grid (a missing prediction scored as empty)."""
    return LabelMap(np.zeros_like(truth.array), truth.spacing, truth.geometry)


def squeezed(label_map: LabelMap) -> LabelMap:
    """The map with its length-1 axes (and their spacing) dropped: a one-slice volume becomes its 2D image."""
    keep = [axis for axis, size in enumerate(label_map.array.shape) if size != 1]
    array = label_map.array.reshape([label_map.array.shape[a] for a in keep])
    return LabelMap(array, tuple(label_map.spacing[a] for a in keep), label_map.geometry)


def check_same_grid(pred: LabelMap, truth: LabelMap, case: str) -> None:
    """Refuse a prediction that is not on the reference's voxel grid (shape, spacing, position)."""
    if pred.array.shape != truth.array.shape:
        raise UsemaError(f"{case}: prediction shape {pred.array.shape} differs from the reference shape "
                         f"{truth.array.shape}")  # fmt: skip
    if not np.allclose(pred.spacing, truth.spacing, rtol=1e-4, atol=1e-5):
        raise UsemaError(f"{case}: prediction spacing {pred.spacing} differs from the reference {truth.spacing}")
    # formats place grids in different world conventions; only files of one kind have comparable positions
    same_kind = pred.geometry is not None and truth.geometry is not None and pred.geometry.kind == truth.geometry.kind
    if same_kind and not same_grid(pred.geometry, truth.geometry):
        raise UsemaError(f"{case}: prediction affine/origin/direction differs from the reference's")


def check_label_values(array: np.ndarray, classes: Collection[int], path: Path) -> None:
    """Refuse values that are not background or one of ``classes``, before anything is sized by them.

    The maximum is checked first, so that a single huge value costs one pass and no allocation.
    """
    top = int(array.max(initial=0))
    if top > max(classes, default=0):
        raise UsemaError(f"{path}: label value {top} is not among the classes {sorted(classes)}")
    # counting is linear but sized by the largest value; sorting is not, so it takes over for sparse huge values
    sparse = top > 4 * array.size
    present = np.unique(array) if sparse else np.flatnonzero(np.bincount(array.ravel(order="K"), minlength=top + 1))
    unknown = sorted(set(present.tolist()) - set(classes) - {0})
    if unknown:
        raise UsemaError(f"{path}: label values {unknown} are not among the classes {sorted(classes)}")


def labels_found(paths: Iterable[Path]) -> dict[int, str]:
    """Every non-zero label value in the files, named by its value (the fallback when no names are known)."""
    values: set[int] = set()
    for path in paths:
        values.update(int(v) for v in np.unique(read_labels(path).array))
    return {v: str(v) for v in sorted(values - {0})}


def find_label_files(folder: str | Path, suffixes: tuple[str, ...] = SUFFIXES) -> dict[str, Path]:
    """Case name -> file for every file in ``folder`` ending in one of ``suffixes`` (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsemaError(f"{folder}: expected a folder of label files")
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = path.name.lower()
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if suffix is None or path.name.startswith(".") or not path.is_file():
            continue
        case = path.name[: -len(suffix)]
        if case in cases:
            raise UsemaError(f"{path}: case {case!r} also exists as {cases[case].name}; expected one file per case")
        cases[case] = path
    return cases


CasePaths = tuple[str, "Path | None", Path]  # (case, prediction or None, reference)


def match_cases(
    pred_dir: Path, truth_dir: Path, missing_as_empty: bool, truth_suffixes: tuple[str, ...] = SUFFIXES
) -> tuple[list[CasePaths], list[str]]:
    """(case, prediction or None, reference) for every reference, and the predictions without a reference."""
    truths = find_label_files(truth_dir, truth_suffixes)
    if not truths:
        raise UsemaError(f"{truth_dir}: expected reference files ({', '.join(truth_suffixes)}), found none")
    preds = find_label_files(pred_dir)
    missing = [case for case in truths if case not in preds]
    if missing and not missing_as_empty:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UsemaError(
            f"{pred_dir}: no prediction for {len(missing)} reference case(s): {shown} "
            "(use --missing-as-empty to score them as empty predictions)"
        )
    extra = sorted(set(preds) - set(truths))
    return [(case, preds.get(case), path) for case, path in truths.items()], extra
