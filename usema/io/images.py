"""Image reading and label writing that keep the input's exact geometry: the one reader of the package.

Arrays are ``(C, *spatial)`` in the file's voxel index order (docs/ARCHITECTURE.md):

- NIfTI (``.nii``, ``.nii.gz``) through nibabel: ``get_fdata()`` order (i, j, k); the output keeps the input's
  header (affine, qform/sform and their codes, pixdim, units, ...) and changes only the data type.
- ITK formats (``.nrrd``, ``.mha``, ``.mhd``) through SimpleITK: transposed arrays so that axis 0 is x; the output
  keeps origin, spacing and direction.
- 2D images (``.png``, ``.tif``, ``.tiff``): ``(C, rows, columns)``, i.e. numpy's natural (H, W) order.

Before any voxel is allocated every file passes ``check_input_file`` (a regular file, never a FIFO or device), a
MetaImage / NRRD header may only name a data file beside itself, and the header's promised size is checked
against ``usema.io.limits``; a gzip stream may not inflate past that promise. Complex images are refused.

A multi-channel case is a list of single-channel files (nnU-Net naming ``CASE_0000``, ``CASE_0001``...) which
are stacked along the channel axis; they must share one grid.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import tifffile
from nibabel.fileholders import FileHolder
from PIL import Image

from usema.errors import UsemaError
from usema.io.arrays import all_finite
from usema.io.files import atomic_path, check_input_file, open_input
from usema.io.geometry import Geometry, same_grid
from usema.io.limits import GZIP_SLACK_BYTES, MAX_HEADER_BYTES, MAX_TEXT_HEADER_BYTES, check_voxels

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".mha", ".mhd")
PLANAR_SUFFIXES = (".png", ".tif", ".tiff")
SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + PLANAR_SUFFIXES

# nnU-Net channel naming: CASE_0000.nii.gz, CASE_0001.nii.gz, ...
CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# sizeof_hdr, the first int32 of a NIfTI file, in either byte order
_NIFTI_CLASSES = {348: nib.Nifti1Image, 540: nib.Nifti2Image}


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


def split_channel(stem: str) -> tuple[str, int | None]:
    """(case, channel) of an nnU-Net stem ``CASE_0001``; (stem, None) when it has no 4-digit channel postfix."""
    match = CHANNEL_RE.match(stem)
    return (stem, None) if match is None else (match["case"], int(match["channel"]))


def _stem(path: Path) -> str:
    """The file name without its image suffix (``a_0000.nii.gz`` -> ``a_0000``)."""
    return path.name[: len(path.name) - len(image_suffix(path))]


def _split_name(path: Path) -> tuple[str, int | None, str]:
    """(case name, nnU-Net channel index or None, suffix) of an image file name."""
    return (*split_channel(_stem(path)), image_suffix(path))


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

    A single ``CASE_0000`` file brings its sibling channels ``CASE_0001``... along. Every file found must be
    a regular file (a FIFO or device with an image name is refused here, before any case is processed).
    """
    input_path = Path(input_path)
    if input_path.is_dir():
        files = [p for p in input_path.iterdir() if image_suffix(p) and not p.name.startswith(".") and not p.is_dir()]
        if not files:
            raise UsemaError(f"{input_path}: expected image files ({', '.join(SUFFIXES)}), found none")
        for path in files:
            check_input_file(path, inside=input_path, what="image")
        return _group(files)
    if not input_path.exists():
        raise UsemaError(f"{input_path}: no such file or directory")
    if image_suffix(input_path) is None:
        raise UsemaError(f"{input_path}: expected an image file ({', '.join(SUFFIXES)})")
    check_input_file(input_path, what="image")
    case, channel, suffix = _split_name(input_path)
    if channel is None:
        return [Case(case, [input_path], suffix)]
    written_suffix = input_path.name[-len(suffix) :]  # as spelt on disk: the glob is case-sensitive
    siblings = input_path.parent.glob(f"{glob.escape(case)}_[0-9][0-9][0-9][0-9]{glob.escape(written_suffix)}")
    return [c for c in _group(list(siblings)) if input_path in c.paths]


def _check_shape(array: np.ndarray, path: Path) -> None:
    """Reject what no network can segment: 1D or 4D+ grids and empty axes."""
    spatial = array.shape[1:]
    if len(spatial) not in (2, 3):
        raise UsemaError(f"{path}: expected a 2D or 3D image, got spatial shape {tuple(spatial)}")
    if 0 in spatial:
        raise UsemaError(f"{path}: expected a non-empty image, got spatial shape {tuple(spatial)}")


def _refuse_complex(path: Path, dtype: np.dtype | str) -> None:
    if np.dtype(dtype).kind == "c":
        raise UsemaError(f"{path}: expected real-valued intensities, got complex ({np.dtype(dtype)}) voxels")


class _BoundedStream(io.IOBase):
    """A binary stream that refuses to move past ``limit`` bytes: a gzip bomb stops there, not in an OOM kill."""

    def __init__(self, inner: BinaryIO, path: Path, limit: int, reason: str) -> None:
        super().__init__()
        self.inner, self.path, self.limit, self.reason = inner, path, limit, reason

    def readable(self) -> bool:
        return True

    def allow(self, end: int) -> None:
        """Refuse (UsemaError with the current reason) a position past ``limit``."""
        if end > self.limit:
            raise UsemaError(f"{self.path}: {self.reason}")

    def read(self, size: int | None = -1) -> bytes:
        room = self.limit + 1 - self.inner.tell()  # one byte more than allowed tells a bomb from a fit
        data = self.inner.read(room if size is None or size < 0 else min(size, room))
        self.allow(self.inner.tell())
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        with memoryview(buffer) as view, view.cast("B") as flat:
            self.allow(self.inner.tell() + len(flat))
            return self.inner.readinto(flat)

    def seek(self, offset: int, whence: int = 0) -> int:
        target = {0: offset, 1: self.inner.tell() + offset}.get(whence)
        if target is None:  # from the end would inflate the whole stream
            raise UsemaError(f"{self.path}: {self.reason}")
        self.allow(target)
        return self.inner.seek(target)

    def tell(self) -> int:
        return self.inner.tell()


def _nifti_image(path: Path, stream: _BoundedStream) -> nib.Nifti1Image:
    """The NIfTI-1/2 image (header and an array proxy reading from ``stream``) of ``path``."""
    head = stream.read(4)
    klass = next((_NIFTI_CLASSES[n] for n in (int.from_bytes(head, o) for o in ("little", "big"))
                  if len(head) == 4 and n in _NIFTI_CLASSES), None)
    if klass is None:
        raise UsemaError(f"{path}: expected a NIfTI-1/2 image (header size 348 or 540)")
    stream.seek(0)
    holder = FileHolder(fileobj=stream)
    return klass.from_file_map({"header": holder, "image": holder}, mmap=False)


def _read_nifti(path: Path, palette_indices: bool) -> tuple[np.ndarray, Geometry]:
    compressed = path.name.lower().endswith(".gz")
    with open_input(path, what="image") as raw, (gzip.GzipFile(fileobj=raw) if compressed else raw) as inner:
        stream = _BoundedStream(inner, path, MAX_HEADER_BYTES,
                                f"expected a NIfTI header with at most {MAX_HEADER_BYTES} bytes of extensions")
        img = _nifti_image(path, stream)
        proxy = img.dataobj
        _refuse_complex(path, proxy.dtype)
        stream.allow(proxy.offset)  # the voxel data must start within the header's budget too
        if 0 in proxy.shape:  # nibabel would flatten an empty volume to shape (0,)
            raise UsemaError(f"{path}: expected a non-empty image, got shape {proxy.shape}")
        check_voxels(path, proxy.shape)
        stream.limit = proxy.offset + int(np.prod(proxy.shape)) * proxy.dtype.itemsize + GZIP_SLACK_BYTES
        stream.reason = "decompresses to more data than its header promises (a gzip bomb?)"
        scaled = not (np.isnan(proxy.slope) or proxy.slope == 1) or not (np.isnan(proxy.inter) or proxy.inter == 0)
        data = np.asarray(proxy, dtype=np.float32) if scaled else proxy.get_unscaled()
        if compressed:
            stream.read()  # the rest of the stream: refused if it runs past the promise
    if data.ndim == 4 and data.shape[3] == 1:  # a trailing singleton time axis is still one 3D volume
        data = data[..., 0]
    geometry = Geometry("nifti", data.shape, image_suffix(path), nifti_header=img.header.copy(), nifti_class=type(img))
    return data[None], geometry


def _data_file_reference(path: Path) -> str | None:
    """The data file a MetaImage (ElementDataFile) or NRRD (data file) header names, read as text by us first."""
    with open_input(path, what="image") as fh:
        text = fh.read(MAX_TEXT_HEADER_BYTES).decode("latin-1")
    metaimage = image_suffix(path) in (".mha", ".mhd")
    for line in text.splitlines():
        if not metaimage and not line.strip():
            return None  # the end of a NRRD header: the data are attached
        key, sep, value = line.partition("=" if metaimage else ":")
        if sep and key.strip().lower() in (("elementdatafile",) if metaimage else ("data file", "datafile")):
            return value.strip()
    if metaimage:
        raise UsemaError(f"{path}: expected a MetaImage header with ElementDataFile in its first "
                         f"{MAX_TEXT_HEADER_BYTES} bytes")
    return None


def _check_data_file(path: Path) -> None:
    """A detached data file must be one regular file in the header's own folder (never a device or elsewhere)."""
    name = _data_file_reference(path)
    if name is None or name.upper() == "LOCAL":
        return
    if any(c in name for c in " \t%") or name.upper() == "LIST":
        raise UsemaError(f"{path}: expected the header to name one data file, got {name!r}")
    if name in (".", "..") or "/" in name or "\\" in name:
        raise UsemaError(f"{path}: expected the data file to be in the header's own folder, got {name!r}")
    check_input_file(path.parent / name, inside=path.parent, what="data file")


def _read_itk(path: Path, palette_indices: bool) -> tuple[np.ndarray, Geometry]:
    check_input_file(path, what="image")
    _check_data_file(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    if "complex" in pixel.lower():
        raise UsemaError(f"{path}: expected real-valued intensities, got {pixel} voxels")
    check_voxels(path, reader.GetSize(), reader.GetNumberOfComponents())
    img = reader.Execute()
    array = sitk.GetArrayFromImage(img)
    ndim = img.GetDimension()
    # SimpleITK arrays are (z, y, x) or (z, y, x, components): make them (C, x, y, z)
    channels = array[None] if img.GetNumberOfComponentsPerPixel() == 1 else np.moveaxis(array, -1, 0)
    data = np.ascontiguousarray(channels.transpose(0, *range(ndim, 0, -1)))
    itk = {"origin": img.GetOrigin(), "spacing": img.GetSpacing(), "direction": img.GetDirection()}
    return data, Geometry("itk", data.shape[1:], image_suffix(path), itk=itk)


def _png_array(path: Path, palette_indices: bool) -> np.ndarray:
    """(H, W) or (H, W, C) of a PNG; a palette PNG gives its indices for labels, else its colours (L or RGB)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # usema's own limit decides below
        try:
            opened = Image.open(path)
        except Image.DecompressionBombError:
            raise UsemaError(f"{path}: the header promises more than {2 * Image.MAX_IMAGE_PIXELS} pixels "
                             "(PIL's decompression-bomb limit)") from None
    with opened:
        check_voxels(path, opened.size[::-1], len(opened.getbands()))
        if opened.mode in ("P", "PA") and palette_indices:
            return np.asarray(opened.convert("P") if opened.mode == "PA" else opened)
        if opened.mode in ("P", "PA"):
            palette = np.asarray(opened.getpalette("RGB") or [0, 0, 0], np.uint8).reshape(-1, 3)
            return np.asarray(opened.convert("L" if (palette == palette[:, :1]).all() else "RGB"))
        modes = {"RGBA": "RGB", "CMYK": "RGB", "LA": "L"}  # alpha and CMYK carry no intensity of their own
        return np.asarray(opened.convert(modes[opened.mode]) if opened.mode in modes else opened)


def _tiff_array(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        _refuse_complex(path, series.dtype)
        check_voxels(path, series.shape)
        return series.asarray()


def _read_planar(path: Path, palette_indices: bool) -> tuple[np.ndarray, Geometry]:
    check_input_file(path, what="image")
    suffix = image_suffix(path)
    array = _png_array(path, palette_indices) if suffix == ".png" else _tiff_array(path)
    if array.ndim == 3 and array.shape[-1] <= 4 < min(array.shape[:2]):
        array = np.moveaxis(array, -1, 0)  # (H, W, C) -> (C, H, W)
    data = array[None] if array.ndim == 2 else array
    if data.ndim != 3:
        raise UsemaError(f"{path}: expected a 2D image (H, W) or (H, W, C), got shape {array.shape}")
    return data, Geometry("planar", data.shape[1:], suffix)


def decode(path: str | Path, palette_indices: bool = False) -> tuple[np.ndarray, Geometry]:
    """One file as ``(C, *spatial)`` in its stored type (float32 when a NIfTI scales its values) and its geometry.

    The common reader of images and labels: every check of the module's docstring is done here.
    ``palette_indices`` keeps a palette PNG's indices (labels) instead of its colours (images).
    """
    path = Path(path)
    suffix = image_suffix(path)
    if suffix is None:
        raise UsemaError(f"{path}: expected an image file ({', '.join(SUFFIXES)})")
    reader = _read_nifti if suffix in NIFTI_SUFFIXES else _read_itk if suffix in ITK_SUFFIXES else _read_planar
    try:
        data, geometry = reader(path, palette_indices)
    except UsemaError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the file is not a readable image
        reason = " ".join(str(exc).split())[:200]
        raise UsemaError(f"{path}: expected a readable {suffix} image ({type(exc).__name__}: {reason})") from exc
    _check_shape(data, path)
    return data, geometry


def _read_one(path: Path) -> tuple[np.ndarray, Geometry]:
    data, geometry = decode(path)
    data = np.asarray(data, dtype=np.float32)
    if not all_finite(data):
        raise UsemaError(f"{path}: expected finite intensities, found NaN or inf")
    return data, geometry


def read_image(paths: str | Path | Sequence[str | Path]) -> tuple[np.ndarray, Geometry]:
    """Read one file or a list of per-channel files into ``(C, *spatial)`` float32 and the first file's geometry.

    The channel files of one case must share one grid (shape and affine, ``same_grid``).
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    arrays, geometry = [], None
    for path in paths:
        data, geo = _read_one(path)
        if geometry is not None and geo.shape != geometry.shape:
            raise UsemaError(f"{path}: expected the spatial shape {geometry.shape} of {paths[0].name}, got {geo.shape}")
        if geometry is not None and not same_grid(geometry, geo):
            raise UsemaError(f"{path}: expected the same affine (voxel-to-world) as {paths[0].name}")
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


def result_suffix(suffix: str) -> str:
    """The suffix of a result written for an input with ``suffix``: the same, except ``.mha`` for ``.mhd``.

    A ``.mhd`` header names a separate data file, which would keep the temporary name of an atomic write.
    """
    return ".mha" if suffix == ".mhd" else suffix


def probability_path(label_path: str | Path, suffix: str) -> Path:
    """Where ``write_probabilities`` puts the probabilities of the case whose labels are at ``label_path``.

    ``suffix`` is the input's; 2D images get a float TIFF since PNG cannot hold probabilities.
    """
    label_path = Path(label_path)
    stem = label_path.name[: len(label_path.name) - len(result_suffix(suffix))]
    return label_path.with_name(f"{stem}_prob{'.tif' if suffix in PLANAR_SUFFIXES else result_suffix(suffix)}")


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
