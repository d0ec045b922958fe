"""Hostile file inputs (issue 13, items 3-6, file side): special files, paths out of their folder, headers that
promise more than the machine holds, gzip bombs, complex and palette images, outputs that would overwrite each
other, and a dataset.json built to exhaust memory.

Every refusal runs the real CLI in-process and checks the contract of ``test_bad_inputs.refused``: exit status 2,
ONE stderr line ``usema: error: ...`` naming the file or key, no traceback, and nothing written.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import tracemalloc
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from test_bad_inputs import files, infer_args, refused
from test_inference import ct_volume, make_checkpoint, save_nifti

from usema.cli import main
from usema.io.images import read_image
from usema.io.labels import read_label


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random 2D USEMA (1 channel in, 3 classes, CT normalisation)."""
    return make_checkpoint(tmp_path_factory.mktemp("model") / "checkpoints" / "last.pt")


def infer_refused(ckpt: Path, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture, *fragments: str,
                  extra: tuple[str, ...] = ()) -> str:
    """`usema infer` of ``source`` is refused with ``fragments`` in its one line, and writes nothing."""
    out = tmp_path / "out"
    line = refused(infer_args(ckpt, source, out, *extra), capsys, *fragments)
    assert files(out) == {}
    return line


def dataset_copy(ct_dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ct_dataset, tmp_path / ct_dataset.name, symlinks=True))


def check_reports(root: Path, capsys: pytest.CaptureFixture, *fragments: str) -> str:
    """`usema datasets check ROOT` exits 2 and lists a problem line holding every fragment (never "no problems")."""
    code = main(["datasets", "check", str(root)])
    out = capsys.readouterr().out
    assert code == 2, out
    assert "no problems" not in out
    problems = [line for line in out.splitlines() if line.startswith("  - ")]
    assert any(all(f in line for f in fragments) for line in problems), out
    return out


# -------------------------------------------------------------------- 1. special files, paths out of a folder
def test_fifo_image_is_refused_without_blocking(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    os.mkfifo(tmp_path / "scan.nii.gz")  # opening it for reading would block for ever
    infer_refused(ckpt, tmp_path / "scan.nii.gz", tmp_path, capsys, "scan.nii.gz", "regular file, found a FIFO")


def test_fifo_in_a_folder_of_cases_is_refused_before_any_case(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    save_nifti(tmp_path / "in" / "a.nii.gz", ct_volume((32, 32, 2)), np.eye(4))
    os.mkfifo(tmp_path / "in" / "b.nii.gz")
    infer_refused(ckpt, tmp_path / "in", tmp_path, capsys, "b.nii.gz", "found a FIFO")


def test_link_to_a_device_as_image_is_refused(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "scan.nii").symlink_to("/dev/zero")
    infer_refused(ckpt, tmp_path / "scan.nii", tmp_path, capsys, "scan.nii", "found a character device")


def test_fifo_dataset_json_is_refused(ct_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = dataset_copy(ct_dataset, tmp_path)
    (root / "dataset.json").unlink()
    os.mkfifo(root / "dataset.json")
    refused(["datasets", "check", str(root)], capsys, "dataset.json", "found a FIFO")


def test_dataset_json_linked_to_dev_zero_is_refused(
    ct_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = dataset_copy(ct_dataset, tmp_path)
    (root / "dataset.json").unlink()
    (root / "dataset.json").symlink_to("/dev/zero")
    refused(["datasets", "check", str(root)], capsys, "dataset.json", "found a character device")


def test_fifo_label_is_reported_by_datasets_check(
    ct_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = dataset_copy(ct_dataset, tmp_path)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    os.mkfifo(root / "labelsTr" / "case_001.nii.gz")
    check_reports(root, capsys, "labelsTr/case_001.nii.gz", "found a FIFO")


def write_mhd(folder: Path, data_file: str, name: str = "scan.mhd") -> Path:
    """A MetaImage header for 32x32x2 int16 voxels stored in ``data_file``."""
    folder.mkdir(parents=True, exist_ok=True)
    header = ("ObjectType = Image\nNDims = 3\nDimSize = 32 32 2\nElementType = MET_SHORT\n"
              f"ElementSpacing = 1 1 1\nElementDataFile = {data_file}\n")
    (folder / name).write_text(header)
    return folder / name


@pytest.mark.parametrize(
    "target, fragment",
    [
        ("/dev/zero", "header's own folder, got '/dev/zero'"),
        ("../secret.raw", "header's own folder, got '../secret.raw'"),
        ("zero.raw", "zero.raw: expected the data file to be a regular file, found a character device"),
        ("fifo.raw", "fifo.raw: expected the data file to be a regular file, found a FIFO"),
        ("LIST", "expected the header to name one data file"),
    ],
    ids=["absolute-device", "dot-dot", "link-to-device", "fifo", "list"],
)
def test_metaimage_data_file_must_be_a_regular_file_beside_the_header(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture, target: str, fragment: str
) -> None:
    (tmp_path / "secret.raw").write_bytes(bytes(32 * 32 * 2 * 2))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "zero.raw").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "in" / "fifo.raw")
    header = write_mhd(tmp_path / "in", target)
    infer_refused(ckpt, header, tmp_path, capsys, fragment)


def test_metaimage_with_a_device_is_reported_by_datasets_check(
    ct_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = dataset_copy(ct_dataset, tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".mhd"}))
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        for path in (root / folder).glob("*.nii.gz"):
            image = sitk.ReadImage(str(path))
            stem = path.name[: -len(".nii.gz")]
            sitk.WriteImage(image, str(path.with_name(f"{stem}.mhd")))
            path.unlink()
    write_mhd(root / "imagesTr", "/dev/zero", "case_002_0000.mhd")
    check_reports(root, capsys, "imagesTr/case_002_0000.mhd", "header's own folder, got '/dev/zero'")


def test_nrrd_data_file_outside_its_folder_is_refused(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "in").mkdir()
    header = "NRRD0004\ntype: short\ndimension: 3\nsizes: 32 32 2\nencoding: raw\ndata file: /dev/zero\n\n"
    (tmp_path / "in" / "scan.nrrd").write_text(header)
    infer_refused(ckpt, tmp_path / "in" / "scan.nrrd", tmp_path, capsys, "scan.nrrd", "got '/dev/zero'")


# ------------------------------------------------------------------------- 2. headers promising too much
def nifti_bytes(shape: tuple[int, ...], payload: bytes, dtype: type = np.int16) -> bytes:
    """A single-file NIfTI-1 (header, 4-byte extension flag, then ``payload``) claiming ``shape`` of ``dtype``."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    return header.binaryblock + bytes(4) + payload


def test_gzip_nifti_promising_a_huge_shape_is_refused_before_allocating(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(nifti_bytes((30000, 30000, 30000), bytes(1000))))  # 5.4e13 bytes promised
    assert path.stat().st_size < 2000
    infer_refused(ckpt, path, tmp_path, capsys, "bomb.nii.gz", "the header promises 27000000000000 voxels",
                  "USEMA_MAX_IMAGE_VOXELS")


def test_gzip_nifti_inflating_past_its_promise_is_refused(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "bomb.nii.gz"
    volume = ct_volume((32, 32, 2)).tobytes(order="F")
    path.write_bytes(gzip.compress(nifti_bytes((32, 32, 2), volume + bytes(64 << 20)), compresslevel=9))
    assert path.stat().st_size < 200_000  # 64 MiB of zeros after the promised 4 KiB
    infer_refused(ckpt, path, tmp_path, capsys, "bomb.nii.gz", "decompresses to more data than its header promises")


def test_voxel_limit_comes_from_the_environment(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = save_nifti(tmp_path / "in" / "scan.nii.gz", ct_volume((32, 32, 2)), np.eye(4))
    monkeypatch.setenv("USEMA_MAX_IMAGE_VOXELS", "2000")
    infer_refused(ckpt, source, tmp_path, capsys, "scan.nii.gz", "promises 2048 voxels", "limit of 2000")
    monkeypatch.setenv("USEMA_MAX_IMAGE_VOXELS", "lots")
    infer_refused(ckpt, source, tmp_path, capsys, "USEMA_MAX_IMAGE_VOXELS: expected a positive integer")


def png_header(width: int, height: int) -> bytes:
    """A PNG signature, an 8-bit greyscale IHDR of ``width`` x ``height``, one tiny IDAT and IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(width + 1))) + chunk(
        b"IEND", b"")


def tiff_header(width: int, height: int) -> bytes:
    """A little-endian baseline TIFF whose one IFD describes ``width`` x ``height`` 8-bit pixels in one tiny strip."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
            (273, 4, 8), (277, 3, 1), (278, 4, height), (279, 4, 16)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", t, k, 1, v) for t, k, v in tags)
    return b"II*\x00" + struct.pack("<I", 24) + bytes(16) + ifd + struct.pack("<I", 0)


@pytest.mark.parametrize(
    "name, data", [("huge.png", png_header(40960, 40960)), ("huge.tif", tiff_header(40960, 40960))]
)
def test_planar_header_of_40960_squared_is_refused(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, name: str, data: bytes
) -> None:
    monkeypatch.setenv("USEMA_MAX_IMAGE_VOXELS", str(10**8))  # a 16 GB machine's default is above 40960²
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / name).write_bytes(data)
    assert len(data) < 1000
    tracemalloc.start()
    try:
        infer_refused(ckpt, tmp_path / "in" / name, tmp_path, capsys, name, "promises")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * 2**20  # refused from the header: the 1.6 GB of pixels are never allocated


# --------------------------------------------------------------------------------- 3. silent garbage
def test_complex_nifti_is_refused(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = (ct_volume((32, 32, 2)) + 1j * ct_volume((32, 32, 2), seed=1)).astype(np.complex64)
    source = save_nifti(tmp_path / "in" / "scan.nii.gz", data, np.eye(4))
    infer_refused(ckpt, source, tmp_path, capsys, "scan.nii.gz", "expected real-valued intensities")


def test_complex_nrrd_is_refused(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "in").mkdir()
    image = sitk.GetImageFromArray(np.ones((2, 32, 32), np.complex64))
    sitk.WriteImage(image, str(tmp_path / "in" / "scan.nrrd"))
    infer_refused(ckpt, tmp_path / "in" / "scan.nrrd", tmp_path, capsys, "scan.nrrd",
                  "expected real-valued intensities")


def test_zscore_overflowing_float32_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = make_checkpoint(tmp_path / "model" / "last.pt", normalization="zscore")
    data = np.full((32, 32, 2), -3e38, np.float32)  # finite, but 3e38 minus a mean near -3e38 is not
    data[0, 0, 0] = 3e38
    source = save_nifti(tmp_path / "in" / "scan.nii.gz", data, np.eye(4))
    infer_refused(model, source, tmp_path, capsys, "scan.nii.gz", "zscore normalisation fits in float32")


def palette_png(path: Path, colours: list[tuple[int, int, int]]) -> np.ndarray:
    """A palette PNG of 40x48 random indices into ``colours``; returns the indices."""
    indices = np.random.default_rng(0).integers(0, len(colours), (40, 48), dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([c for colour in colours for c in colour])
    image.save(path)
    return indices


def test_palette_png_image_is_read_through_its_colours(tmp_path: Path) -> None:
    colours = [(250, 0, 0), (0, 120, 0), (10, 20, 200)]
    indices = palette_png(tmp_path / "cells.png", colours)
    image, _ = read_image(tmp_path / "cells.png")
    expected = np.moveaxis(np.asarray(colours, np.float32)[indices], -1, 0)
    np.testing.assert_array_equal(image, expected)
    label, _ = read_label(tmp_path / "cells.png")  # a label map keeps its class indices
    np.testing.assert_array_equal(label, indices)


def test_grey_palette_png_image_is_one_channel_of_its_grey_levels(tmp_path: Path) -> None:
    greys = [(0, 0, 0), (90, 90, 90), (255, 255, 255)]
    indices = palette_png(tmp_path / "scan.png", greys)
    image, _ = read_image(tmp_path / "scan.png")
    np.testing.assert_array_equal(image, np.asarray([0, 90, 255], np.float32)[indices][None])


# ------------------------------------------------------------------- 4. results overwriting each other
def test_png_and_tif_of_one_name_would_share_a_probability_file(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "in" / "a.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "in" / "a.tif")
    infer_refused(ckpt, tmp_path / "in", tmp_path, capsys, "a_prob.tif", "a.png", "a.tif",
                  extra=("--save-probabilities",))


def test_probabilities_of_x_would_overwrite_the_labels_of_x_prob(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    save_nifti(tmp_path / "in" / "x.nii.gz", ct_volume((32, 32, 2)), np.eye(4))
    save_nifti(tmp_path / "in" / "x_prob.nii.gz", ct_volume((32, 32, 2)), np.eye(4))
    infer_refused(ckpt, tmp_path / "in", tmp_path, capsys, "out/x_prob.nii.gz", "in/x.nii.gz", "in/x_prob.nii.gz",
                  extra=("--save-probabilities",))


# ---------------------------------------------------------------------------------- 5. dataset.json
def edit_dataset_json(root: Path, **changes: object) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, **changes}))


def test_dataset_json_class_of_a_hundred_million_is_refused(
    ct_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = dataset_copy(ct_dataset, tmp_path)
    edit_dataset_json(root, labels={"background": 0, "liver": 1, "huge": 10**8})
    refused(["datasets", "check", str(root)], capsys, "dataset.json: labels.huge: expected a class value 0..999")


def test_dataset_json_labels_as_a_list_is_refused(
    ct_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = dataset_copy(ct_dataset, tmp_path)
    edit_dataset_json(root, labels=["background", "liver"])
    refused(["datasets", "check", str(root)], capsys, "dataset.json: labels: expected a mapping")


def test_label_value_far_above_the_classes_is_reported_without_counting_up_to_it(
    ct_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = dataset_copy(ct_dataset, tmp_path)
    path = root / "labelsTr" / "case_001.nii.gz"
    img = nib.load(str(path))
    label = np.asarray(img.dataobj).astype(np.int32)
    label[0, 0, 0] = 10**8
    nib.save(nib.Nifti1Image(label, img.affine, img.header), str(path))
    tracemalloc.start()
    try:
        check_reports(root, capsys, "labelsTr/case_001.nii.gz", "label values [100000000]")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * 2**20  # counting 0..10^8 with bincount would take 800 MB
