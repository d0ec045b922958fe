"""Image reading and label writing that keep the input's exact geometry.

Arrays are ``(C, *spatial)`` float32 in the file's voxel index order (docs/ARCHITECTURE.md):

- NIfTI (``.nii``, ``.nii.gz``) through nibabel: ``get_fdata()`` order (i, j, k); the output keeps the input's
  header (affine, qform/sform and their codes, pixdim, units, ...) and changes only the data type.
- Other ITK formats (``.nrrd``, ``.mha``) through SimpleITK: transposed arrays so that axis 0 is x; the output
  keeps origin, spacing and direction.
- 2D images (``.png``, ``.tif``, ``.tiff``): ``(C, rows, columns)``, i.e. numpy's natural (H, W) order.

A multi-channel case is a list of single-channel files (nnU-Net naming ``CASE_0000``, ``CASE_0001``...) which
are stacked along the channel axis; they must share one grid.
"""

from __future__ import annotations

import contextlib
import glob
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import tifffile
from PIL import Image

from usema.errors import UsemaError
from usema.io.files import atomic_path

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".mha")
PLANAR_SUFFIXES = (".png", ".tif", ".tiff")
SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + PLANAR_SUFFIXES

# nnU-Net channel naming: CASE_0000.nii.gz, CASE_0001.nii.gz, ...
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


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


@dataclass
class Case:
    """One case: its name (output stem), its channel files in channel order and their common suffix."""

    name: str
    paths: list[Path]
    suffix: str


def image_suffix(path: str | Path) -> str | None:
    """The supported suffix of ``path`` (case-insensitive), or None."""
    name = Path(path).name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def _stem(path: Path) -> str:
    """The file name without its image suffix (``a_0000.nii.gz`` -> ``a_0000``)."""
    return path.name[: len(path.name) - len(image_suffix(path))]


def _split_name(path: Path) -> tuple[str, int | None, str]:
    """(case name, nnU-Net channel index or None, suffix) of an image file name."""
    stem = _stem(path)
    match = _CHANNEL_RE.match(stem)
    if match is None:
        return stem, None, image_suffix(path)
    return match["case"], int(match["channel"]), image_suffix(path)


def _group(paths: Sequence[Path]) -> list[Case]:
    """Group files into cases by nnU-Net channel naming (CASE_0000, CASE_0001, ...).

    A ``_NNNN`` name without a ``_0000`` sibling (``scan_2023``) is a one-channel case of its own. Channels must
    run 0000..N-1 without gaps, and no two cases may share an output name (``a.nii.gz`` beside ``a_0000.nii.gz``).
    """
    cases, groups = [], {}
    for path in sorted(paths):
        case, channel, suffix = _split_name(path)
        if channel is None:
            cases.append(Case(case, [path], suffix))
        else:
            groups.setdefault((case, suffix), {})[channel] = path
    for (case, suffix), channels in sorted(groups.items()):
        if 0 not in channels:  # not nnU-Net naming
            cases += [Case(_stem(p), [p], suffix) for p in channels.values()]
        elif sorted(channels) != list(range(len(channels))):
            found = ", ".join(f"{c:04d}" for c in sorted(channels))
            raise UsemaError(
                f"{channels[0]}: case {case!r} has channels {found}, expected 0000..{len(channels) - 1:04d}"
            )
        else:
            cases.append(Case(case, [channels[c] for c in sorted(channels)], suffix))
    seen: dict[tuple[str, str], Path] = {}
    for case in cases:
        other = seen.setdefault((case.name, case.suffix), case.paths[0])
        if other != case.paths[0]:
            raise UsemaError(f"{case.paths[0]}: case {case.name!r} is also given by {other.name}; rename one of them")
    return sorted(cases, key=lambda c: (c.name, c.suffix))


def find_cases(input_path: str | Path) -> list[Case]:
    """The cases under ``input_path``: a directory (every supported image in it) or one image file.

    A single ``CASE_0000`` file brings its sibling channels ``CASE_0001``... along.
    """
    input_path = Path(input_path)
    if input_path.is_dir():
        files = [p for p in input_path.iterdir() if p.is_file() and image_suffix(p) and not p.name.startswith(".")]
        if not files:
            raise UsemaError(f"{input_path}: expected image files ({', '.join(SUFFIXES)}), found none")
        return _group(files)
    if not input_path.exists():
        raise UsemaError(f"{input_path}: no such file or directory")
    if image_suffix(input_path) is None:
        raise UsemaError(f"{input_path}: expected an image file ({', '.join(SUFFIXES)})")
    case, channel, suffix = _split_name(input_path)
    if channel is None:
        return [Case(case, [input_path], suffix)]
    written_suffix = input_path.name[-len(suffix) :]  # as spelt on disk: the glob is case-sensitive
    siblings = input_path.parent.glob(f"{glob.escape(case)}_[0-9][0-9][0-9][0-9]{glob.escape(written_suffix)}")
    return [c for c in _group(list(siblings)) if input_path in c.paths]


def _check_array(array: np.ndarray, path: Path) -> None:
    """Reject what no network can segment: 1D or 4D+ grids, empty axes and non-finite values."""
    spatial = array.shape[1:]
    if len(spatial) not in (2, 3):
        raise UsemaError(f"{path}: expected a 2D or 3D image, got spatial shape {tuple(spatial)}")
    if 0 in spatial:
        raise UsemaError(f"{path}: expected a non-empty image, got spatial shape {tuple(spatial)}")
    if not np.isfinite(array).all():
        raise UsemaError(f"{path}: expected finite intensities, found NaN or inf")


def _read_nifti(path: Path) -> tuple[np.ndarray, Geometry]:
    img = nib.load(str(path))
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise UsemaError(f"{path}: expected a NIfTI-1/2 image, got {type(img).__name__}")
    if 0 in img.shape:  # nibabel would flatten an empty volume to shape (0,)
        raise UsemaError(f"{path}: expected a non-empty image, got shape {img.shape}")
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if data.ndim == 4 and data.shape[3] == 1:  # a trailing singleton time axis is still one 3D volume
        data = data[..., 0]
    geometry = Geometry("nifti", data.shape, image_suffix(path), nifti_header=img.header.copy(), nifti_class=type(img))
    return data[None], geometry


def _read_itk(path: Path) -> tuple[np.ndarray, Geometry]:
    img = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(img).astype(np.float32)
    ndim = img.GetDimension()
    # SimpleITK arrays are (z, y, x) or (z, y, x, components): make them (C, x, y, z)
    channels = array[None] if img.GetNumberOfComponentsPerPixel() == 1 else np.moveaxis(array, -1, 0)
    data = np.ascontiguousarray(channels.transpose(0, *range(ndim, 0, -1)))
    itk = {"origin": img.GetOrigin(), "spacing": img.GetSpacing(), "direction": img.GetDirection()}
    return data, Geometry("itk", data.shape[1:], image_suffix(path), itk=itk)


def _read_planar(path: Path) -> tuple[np.ndarray, Geometry]:
    suffix = image_suffix(path)
    if suffix == ".png":
        with Image.open(path) as opened:
            # drop alpha / CMYK; palette images keep their indices (label maps are often stored that way)
            modes = {"RGBA": "RGB", "CMYK": "RGB", "LA": "L", "PA": "P"}
            array = np.asarray(opened.convert(modes[opened.mode]) if opened.mode in modes else opened)
    else:
        array = tifffile.imread(path)
    if array.ndim == 3 and array.shape[-1] <= 4 < min(array.shape[:2]):
        array = np.moveaxis(array, -1, 0)  # (H, W, C) -> (C, H, W)
    data = np.asarray(array, dtype=np.float32)
    data = data[None] if data.ndim == 2 else data
    if data.ndim != 3:
        raise UsemaError(f"{path}: expected a 2D image (H, W) or (H, W, C), got shape {array.shape}")
    return data, Geometry("planar", data.shape[1:], suffix)


def _read_one(path: Path) -> tuple[np.ndarray, Geometry]:
    suffix = image_suffix(path)
    if suffix is None:
        raise UsemaError(f"{path}: expected an image file ({', '.join(SUFFIXES)})")
    if not path.is_file():
        raise UsemaError(f"{path}: no such file")
    reader = _read_nifti if suffix in NIFTI_SUFFIXES else _read_itk if suffix in ITK_SUFFIXES else _read_planar
    try:
        data, geometry = reader(path)
    except UsemaError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the file is not a readable image
        raise UsemaError(f"{path}: expected a readable {suffix} image ({type(exc).__name__}: {exc})") from exc
    _check_array(data, path)
    return data, geometry


def read_image(paths: str | Path | Sequence[str | Path]) -> tuple[np.ndarray, Geometry]:
    """Read one file or a list of per-channel files into ``(C, *spatial)`` float32 and the first file's geometry."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    arrays, geometry = [], None
    for path in paths:
        data, geo = _read_one(path)
        if geometry is not None and geo.shape != geometry.shape:
            raise UsemaError(f"{path}: expected the spatial shape {geometry.shape} of {paths[0].name}, got {geo.shape}")
        geometry = geometry or geo
        arrays.append(data)
    return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)), geometry


def label_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned integer type for labels 0..num_classes-1."""
    return np.dtype(np.uint8 if num_classes <= 256 else np.uint16)


def _nifti_like(array: np.ndarray, geometry: Geometry) -> nib.Nifti1Image:
    """A NIfTI image of ``array`` carrying ``geometry``'s header: same affine, q/sform codes, pixdim, units."""
    header = geometry.nifti_header.copy()
    header.set_data_dtype(array.dtype)
    header.set_slope_inter(1.0, 0.0)  # the data are stored as they are: no scaling from the input carried over
    return geometry.nifti_class(array, None, header=header)


def _itk_like(array: np.ndarray, geometry: Geometry, vector: bool = False) -> sitk.Image:
    """A SimpleITK image of ``array`` (x-first axes, channel last when ``vector``) on ``geometry``'s grid."""
    ndim = len(geometry.shape)
    order = (*range(ndim - 1, -1, -1), ndim) if vector else tuple(range(ndim - 1, -1, -1))
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(order)), isVector=vector)
    img.SetOrigin(geometry.itk["origin"])
    img.SetSpacing(geometry.itk["spacing"])
    img.SetDirection(geometry.itk["direction"])
    return img


@contextlib.contextmanager
def _result_file(path: str | Path) -> Iterator[Path]:
    """``atomic_path`` with SimpleITK's write failures (RuntimeError) also reported as a one-line UsemaError."""
    try:
        with atomic_path(path) as tmp:
            yield tmp
    except RuntimeError as exc:  # atomic_path already reports OSError (disk full, no permission)
        reason = " ".join(str(exc).split())[:200]
        raise UsemaError(f"{path}: could not write the result ({reason})") from exc


def write_label(path: str | Path, array: np.ndarray, geometry: Geometry) -> Path:
    """Atomically write integer labels ``array`` (*spatial) onto ``geometry``'s grid at ``path``."""
    if tuple(array.shape) != tuple(geometry.shape):
        raise ValueError(f"label shape {array.shape} does not match the image grid {geometry.shape}")
    with _result_file(path) as tmp:
        if geometry.kind == "nifti":
            nib.save(_nifti_like(array, geometry), str(tmp))
        elif geometry.kind == "itk":
            sitk.WriteImage(_itk_like(array, geometry), str(tmp), useCompression=True)
        elif geometry.suffix == ".png":
            Image.fromarray(array).save(tmp, format="PNG")
        else:
            tifffile.imwrite(tmp, array, compression="zlib")
    return Path(path)


def probability_path(label_path: str | Path, suffix: str) -> Path:
    """Where ``write_probabilities`` puts the probabilities of the case whose labels are at ``label_path``.

    ``suffix`` is the input's; 2D images get a float TIFF since PNG cannot hold probabilities.
    """
    label_path = Path(label_path)
    stem = label_path.name[: len(label_path.name) - len(suffix)]
    return label_path.with_name(f"{stem}_prob{'.tif' if suffix in PLANAR_SUFFIXES else suffix}")


def write_probabilities(path: str | Path, probs: np.ndarray, geometry: Geometry) -> Path:
    """Atomically write float32 class probabilities ``probs`` (K, *spatial) channel-last on ``geometry``'s grid.

    NIfTI: a (*spatial, K) image with the input's header; ITK: a vector image; 2D images: a (H, W, K) TIFF.
    """
    channel_last = np.ascontiguousarray(np.moveaxis(probs.astype(np.float32, copy=False), 0, -1))
    with _result_file(path) as tmp:
        if geometry.kind == "nifti":
            nib.save(_nifti_like(channel_last, geometry), str(tmp))
        elif geometry.kind == "itk":
            sitk.WriteImage(_itk_like(channel_last, geometry, vector=True), str(tmp), useCompression=True)
        else:
            tifffile.imwrite(tmp, channel_last, compression="zlib")
    return Path(path)
