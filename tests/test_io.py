"""The image I/O layer's contract (usema/io): one suffix table, the nnU-Net channel convention, grid geometry,
compact integer label maps, the input-file check, the voxel limit, and whole-image work without full-size
temporaries. Expected values come from independent computations written here (nibabel's own affine, numpy in
float64), not from the layer itself.
"""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from test_inference import ct_volume, make_checkpoint

from usema.data.nnunet import scan_dataset
from usema.data.preprocess import normalize
from usema.errors import UsemaError
from usema.inference.pipeline import InferenceOptions, run_inference
from usema.io import arrays
from usema.io.files import check_input_file, read_input_text
from usema.io.images import SUFFIXES, image_suffix, read_image, split_channel
from usema.io.labels import geometry_affine, geometry_spacing, read_label, same_grid
from usema.io.limits import max_image_voxels


def peak_bytes(run: Callable[[], object]) -> tuple[object, int]:
    """(result, peak bytes allocated by Python and numpy while ``run()`` ran)."""
    tracemalloc.start()
    try:
        result = run()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------------------------ suffixes, channels
def test_one_suffix_table_names_every_supported_format() -> None:
    assert set(SUFFIXES) == {".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".tif", ".tiff"}
    for suffix in SUFFIXES:
        assert image_suffix(f"CASE_0000{suffix.upper()}") == suffix
    assert image_suffix("scan.nii.gz.bak") is None and image_suffix("notes.gz") is None


def test_mhd_is_read_like_mha(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(np.arange(2 * 5 * 7, dtype=np.int16).reshape(2, 5, 7))
    image.SetSpacing((0.5, 0.7, 2.0))
    image.SetOrigin((10.0, -4.0, 3.5))
    sitk.WriteImage(image, str(tmp_path / "a.mha"))
    sitk.WriteImage(image, str(tmp_path / "a.mhd"))
    (mha, mha_geo), (mhd, mhd_geo) = read_image(tmp_path / "a.mha"), read_image(tmp_path / "a.mhd")
    np.testing.assert_array_equal(mha, mhd)
    assert mha.shape == (1, 7, 5, 2)  # x first
    np.testing.assert_array_equal(geometry_affine(mha_geo), geometry_affine(mhd_geo))


def test_datasets_accept_every_suffix_of_the_table_and_nothing_else(ct_dataset: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(ct_dataset, tmp_path / ct_dataset.name))
    meta = json.loads((root / "dataset.json").read_text())
    for ending, accepted in ((".mhd", True), (".tiff", True), (".jpg", False), (".gz", False)):
        (root / "dataset.json").write_text(json.dumps({**meta, "file_ending": ending}))
        if accepted:
            scan_dataset(root)
        else:
            with pytest.raises(UsemaError, match="file_ending: expected one of .nii.gz"):
                scan_dataset(root)


@pytest.mark.parametrize(
    "stem, expected",
    [("case_0000", ("case", 0)), ("a_b_0012", ("a_b", 12)), ("scan_2023", ("scan", 2023)),
     ("case_000", ("case_000", None)), ("case0000", ("case0000", None)), ("_0001", ("_0001", None))],
)
def test_nnunet_channel_convention(stem: str, expected: tuple[str, int | None]) -> None:
    assert split_channel(stem) == expected


# ---------------------------------------------------------------------------------------------- geometry
def save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine, dtype=data.dtype), str(path))
    return path


def test_same_grid_tolerates_float32_rounding_only(tmp_path: Path) -> None:
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    data = np.zeros((6, 5, 4), np.int16)
    _, ref = read_image(save(tmp_path / "a.nii", data, affine))
    near, far, other_shape = affine.copy(), affine.copy(), np.zeros((6, 5, 3), np.int16)
    near[0, 3] += 1e-5
    far[0, 3] += 0.05
    assert same_grid(ref, read_image(save(tmp_path / "near.nii", data, near))[1])
    assert not same_grid(ref, read_image(save(tmp_path / "far.nii", data, far))[1])
    assert not same_grid(ref, read_image(save(tmp_path / "short.nii", other_shape, affine))[1])


def test_channel_files_must_share_one_grid(tmp_path: Path) -> None:
    data = np.zeros((6, 5, 4), np.int16)
    shifted = np.eye(4)
    shifted[2, 3] = 5.0
    first, second = save(tmp_path / "c_0000.nii", data, np.eye(4)), save(tmp_path / "c_0001.nii", data, shifted)
    with pytest.raises(UsemaError, match=r"c_0001.nii: expected the same affine \(voxel-to-world\) as c_0000.nii"):
        read_image([first, second])  # `usema infer` and datasets read channels through this one function


def test_itk_geometry_is_the_ras_affine_nibabel_reads(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16))
    image.SetSpacing((0.7, 0.9, 3.0))
    image.SetOrigin((12.0, -30.5, 4.0))
    c, s = np.cos(0.4), np.sin(0.4)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(tmp_path / "a.mha"))
    sitk.WriteImage(image, str(tmp_path / "a.nii"))  # SimpleITK converts LPS to the RAS NIfTI affine
    _, geometry = read_image(tmp_path / "a.mha")
    np.testing.assert_allclose(geometry_affine(geometry), nib.load(str(tmp_path / "a.nii")).affine, atol=1e-5)
    assert geometry_spacing(geometry) == pytest.approx((0.7, 0.9, 3.0))


# ------------------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize(
    "values, dtype, expected",
    [([0, 1, 3], np.int64, np.uint8), ([0, 300], np.int32, np.uint16), ([-1, 2], np.int64, np.int16),
     ([0, 70000], np.int64, np.int32), ([0.0, 2.0, 3.0], np.float32, np.uint8), ([0.0, 1.0], np.float64, np.uint8)],
)
def test_read_label_returns_the_compact_integer_type(tmp_path: Path, values: list, dtype: type, expected: type) -> None:
    data = np.resize(np.asarray(values, dtype), (4, 5, 3))
    label, _ = read_label(save(tmp_path / "l.nii.gz", data, np.eye(4)))
    assert label.dtype == expected
    np.testing.assert_array_equal(label, data)


@pytest.mark.parametrize("bad, message", [(0.5, "fractional values"), (np.nan, "NaN or inf")])
def test_read_label_refuses_non_integer_values(tmp_path: Path, bad: float, message: str) -> None:
    data = np.zeros((4, 5, 3), np.float32)
    data[1, 2, 0] = bad
    with pytest.raises(UsemaError, match=message):
        read_label(save(tmp_path / "l.nii.gz", data, np.eye(4)))


def test_read_label_of_integers_makes_no_float_copy(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 4, (64, 64, 64)).astype(np.int16)
    path = save(tmp_path / "l.nii", data, np.eye(4))
    (label, _), peak = peak_bytes(lambda: read_label(path))
    np.testing.assert_array_equal(label, data)
    # the int16 voxels read (2 bytes) plus the uint8 result (1 byte); a float32 copy alone would add 4
    assert peak < 3 * data.size + 2**20


def test_palette_png_label_keeps_its_indices(tmp_path: Path) -> None:
    indices = np.arange(30, dtype=np.uint8).reshape(5, 6) % 3
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10])
    image.save(tmp_path / "l.png")
    label, _ = read_label(tmp_path / "l.png")
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, indices)


# ---------------------------------------------------------------------------------------- the file check
def test_input_file_check(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "outside.txt").write_text("x")
    (tmp_path / "data" / "link.txt").symlink_to(tmp_path / "outside.txt")  # datasets are assembled from links
    assert check_input_file(tmp_path / "data" / "link.txt", inside=tmp_path / "data") == tmp_path / "data" / "link.txt"
    with pytest.raises(UsemaError, match=r"outside.txt: expected the file inside"):
        check_input_file(tmp_path / "data" / ".." / "outside.txt", inside=tmp_path / "data")
    with pytest.raises(UsemaError, match="regular file, found a directory"):
        check_input_file(tmp_path / "data")
    with pytest.raises(UsemaError, match="gone.txt: no such file"):
        check_input_file(tmp_path / "gone.txt")


def test_text_inputs_are_read_up_to_a_size(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}" * 100)
    assert read_input_text(tmp_path / "a.json", 200) == "{}" * 100
    with pytest.raises(UsemaError, match="a.json: expected a file of at most 199 bytes"):
        read_input_text(tmp_path / "a.json", 199)


# --------------------------------------------------------------------------------------- the voxel limit
def test_default_voxel_limit_is_half_the_memory_as_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("USEMA_MAX_IMAGE_VOXELS", raising=False)
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total = int(meminfo["MemTotal"].split()[0]) * 1024
    assert max_image_voxels() == pytest.approx(total / 2 / 4, rel=0.01)
    monkeypatch.setenv("USEMA_MAX_IMAGE_VOXELS", "12345")
    assert max_image_voxels() == 12345


# ------------------------------------------------------------------------------ whole-image work in blocks
@pytest.mark.parametrize("order", ["C", "F", "strided"])
def test_blocks_cover_the_array_once(order: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arrays, "BLOCK_ELEMENTS", 50)
    base = np.arange(2 * 7 * 9 * 11, dtype=np.float64).reshape(2, 7, 9, 11)
    array = {"C": base, "F": np.asfortranarray(base), "strided": base[:, ::2, 1:, ::3]}[order]
    parts = list(arrays.blocks(array))
    assert all(p.size <= 50 for p in parts)
    assert sum(p.size for p in parts) == array.size
    assert sum(float(p.sum()) for p in parts) == float(array.sum())


def test_zscore_matches_float64_statistics_without_a_float64_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arrays, "BLOCK_ELEMENTS", 4096)
    image = np.random.default_rng(0).normal(300.0, 50.0, (2, 48, 48, 40)).astype(np.float32)
    expected = np.stack([(c.astype(np.float64) - c.astype(np.float64).mean()) / c.astype(np.float64).std()
                         for c in image])
    out, peak = peak_bytes(lambda: normalize(image, "zscore"))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert peak < image.nbytes * 1.25  # the float32 result; numpy's std would add a float64 copy (2x)
    same = image.copy()
    assert np.shares_memory(normalize(same, "zscore", in_place=True), same)
    np.testing.assert_allclose(same, expected, atol=1e-5)


def test_mhd_input_gives_one_mha_result_file(tmp_path: Path) -> None:
    """A .mhd result would name a data file still carrying its temporary name: results are single-file .mha."""
    image = sitk.GetImageFromArray(ct_volume((2, 32, 32)))
    image.SetSpacing((0.8, 0.9, 2.5))
    (tmp_path / "in").mkdir()
    sitk.WriteImage(image, str(tmp_path / "in" / "a.mhd"))
    model = make_checkpoint(tmp_path / "model" / "last.pt")
    run_inference(model, tmp_path / "in", tmp_path / "out", InferenceOptions(progress=False, save_probabilities=True))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.mha", "a_prob.mha"]
    result = sitk.ReadImage(str(tmp_path / "out" / "a.mha"))
    assert result.GetSize() == image.GetSize() and result.GetSpacing() == pytest.approx(image.GetSpacing())
