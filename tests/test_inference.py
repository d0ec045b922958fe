"""`usema infer`: exact output geometry, 2D-on-3D slicing, nnU-Net case folders, PNG, TTA, refusals."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from usema.cli import main
from usema.errors import UsemaError
from usema.inference import pipeline
from usema.io.images import find_cases, read_image
from usema.inference.model_loading import inference_memory_format, load_model
from usema.inference.pipeline import InferenceOptions, predict_case, run_inference
from usema.nets import build_network

from synthetic_data import CT_STATS, TINY_USEMA

TINY = TINY_USEMA
QUIET = {"progress": False}


def make_checkpoint(
    path: Path,
    in_channels: int = 1,
    out_channels: int = 3,
    normalization: str = "ct",
    deep_supervision: bool = True,
    preset: str = "tiny",
    seed: int = 0,
) -> Path:
    """A checkpoint in the documented dict format around a randomly initialised tiny 2D USEMA."""
    torch.manual_seed(seed)
    net = build_network("usema", 2, in_channels, out_channels, preset=preset, deep_supervision=deep_supervision, **TINY)
    recipe = {
        "name": "test",
        "data": {
            "source": "demo_brain",
            "spatial_dims": 2,
            "slice_axis": 2,
            "normalization": normalization,
            "patch_size": [32, 32],
            "labels": None,
        },
        "val": {"roi_size": None, "overlap": 0.5, "sw_batch_size": 4},
        "train": {"deep_supervision": deep_supervision},
    }
    ckpt = {
        "model": net.state_dict(),
        "network": {
            "name": "usema",
            "spatial_dims": 2,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "preset": preset,
            "overrides": TINY,
        },
        "recipe": recipe,
        "norm_stats": CT_STATS if normalization == "ct" else None,
        "labels": {str(i): ("background" if i == 0 else f"class{i}") for i in range(out_channels)},
        "epoch": 1,
        "iteration": 1,
        "best_metric": 0.5,
        "metrics": {"history": []},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("run") / "checkpoints" / "last.pt")


def ct_volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth-ish CT-like volume in HU so that predictions are not all one class."""
    rng = np.random.default_rng(seed)
    return (rng.normal(40, 80, shape)).astype(np.int16)


def oblique_affine() -> np.ndarray:
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array(
        [[c, -s, 0], [s * np.cos(0.2), c * np.cos(0.2), -np.sin(0.2)], [s * np.sin(0.2), c * np.sin(0.2), np.cos(0.2)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.78, 0.82, 2.5])
    affine[:3, 3] = [-120.5, 33.25, 7.0]
    return affine


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"usema test"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


# header fields that must change when float intensities become integer labels
DTYPE_FIELDS = {"datatype", "bitpix", "scl_slope", "scl_inter", "cal_min", "cal_max", "glmin", "glmax"}


@pytest.mark.parametrize("affine", [oblique_affine(), np.diag([0.7, 0.7, 5.0, 1.0])], ids=["oblique", "anisotropic"])
def test_nifti_output_keeps_input_geometry(ckpt: Path, tmp_path: Path, affine: np.ndarray) -> None:
    src = save_nifti(tmp_path / "in" / "case_0000.nii.gz", ct_volume((37, 29, 5)), affine)
    run_inference(ckpt, src, tmp_path / "out", InferenceOptions(**QUIET))
    out, inp = nib.load(str(tmp_path / "out" / "case.nii.gz")), nib.load(str(src))
    assert out.shape == inp.shape
    assert np.array_equal(out.affine, inp.affine)
    assert out.header.get_qform(coded=True)[1] == 1 and out.header.get_sform(coded=True)[1] == 2
    for key in inp.header.keys():
        if key not in DTYPE_FIELDS:
            assert np.array_equal(np.asarray(out.header[key]), np.asarray(inp.header[key])), key
    assert out.get_data_dtype() == np.uint8
    labels = np.asarray(out.dataobj)
    assert labels.max() < 3 and len(np.unique(labels)) > 1


def test_itk_output_keeps_origin_spacing_direction(ckpt: Path, tmp_path: Path) -> None:
    img = sitk.GetImageFromArray(ct_volume((4, 30, 34)).astype(np.float32))
    img.SetSpacing((0.6, 0.9, 3.0))
    img.SetOrigin((10.0, -20.0, 5.5))
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(tmp_path / "vol.nrrd"))
    run_inference(ckpt, tmp_path / "vol.nrrd", tmp_path / "out", InferenceOptions(**QUIET))
    src, out = sitk.ReadImage(str(tmp_path / "vol.nrrd")), sitk.ReadImage(str(tmp_path / "out" / "vol.nrrd"))
    assert out.GetSize() == src.GetSize()
    assert (out.GetSpacing(), out.GetOrigin(), out.GetDirection()) == (
        src.GetSpacing(),
        src.GetOrigin(),
        src.GetDirection(),
    )
    assert out.GetPixelID() == sitk.sitkUInt8


def test_2d_model_on_volume_equals_per_slice_prediction(ckpt: Path) -> None:
    model = load_model(ckpt)
    volume = ct_volume((40, 36, 3)).astype(np.float32)[None]
    options = InferenceOptions(**QUIET)
    logits3d = predict_case(model, volume, options, torch.device("cpu"))
    assert logits3d.shape == (3, 40, 36, 3)
    for k in range(volume.shape[-1]):
        logits2d = predict_case(model, volume[..., k], options, torch.device("cpu"))
        torch.testing.assert_close(logits3d[..., k], logits2d, rtol=1e-4, atol=1e-4)


def test_directory_of_nnunet_cases(tmp_path: Path) -> None:
    ckpt2 = make_checkpoint(tmp_path / "two.pt", in_channels=2, normalization="zscore")
    for case in ("alpha", "beta"):
        for channel in range(2):
            save_nifti(
                tmp_path / "in" / f"{case}_{channel:04d}.nii.gz", ct_volume((33, 32, 2), seed=channel), np.eye(4)
            )
    summary = run_inference(ckpt2, tmp_path / "in", tmp_path / "out", InferenceOptions(**QUIET))
    assert summary.cases == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["alpha.nii.gz", "beta.nii.gz"]
    # a case missing a channel file is refused, naming the file
    (tmp_path / "in" / "beta_0001.nii.gz").unlink()
    with pytest.raises(UsemaError, match="beta_0000.nii.gz: expected 2 channel"):
        run_inference(ckpt2, tmp_path / "in", tmp_path / "out2", InferenceOptions(**QUIET))


def test_case_grouping_rules(tmp_path: Path) -> None:
    for name in ("scan_2023", "scan_2024", "b_0000", "b_0001", "c"):
        save_nifti(tmp_path / f"{name}.nii.gz", ct_volume((8, 8, 2)), np.eye(4))
    cases = {c.name: [p.name for p in c.paths] for c in find_cases(tmp_path)}
    # _NNNN without a _0000 sibling is not channel naming: such files are cases of their own
    assert cases == {
        "b": ["b_0000.nii.gz", "b_0001.nii.gz"],
        "c": ["c.nii.gz"],
        "scan_2023": ["scan_2023.nii.gz"],
        "scan_2024": ["scan_2024.nii.gz"],
    }
    save_nifti(tmp_path / "c_0000.nii.gz", ct_volume((8, 8, 2)), np.eye(4))
    with pytest.raises(UsemaError, match="case 'c' is also given by"):
        find_cases(tmp_path)
    (tmp_path / "c_0000.nii.gz").unlink()
    save_nifti(tmp_path / "b_0003.nii.gz", ct_volume((8, 8, 2)), np.eye(4))
    with pytest.raises(UsemaError, match="b_0000.nii.gz: case 'b' has channels 0000, 0001, 0003"):
        find_cases(tmp_path)


def test_png_inference_writes_png_of_same_size(tmp_path: Path) -> None:
    ckpt_rgb = make_checkpoint(tmp_path / "rgb.pt", in_channels=3, normalization="rgb")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (45, 38, 3), dtype=np.uint8)).save(tmp_path / "cell.png")
    run_inference(ckpt_rgb, tmp_path / "cell.png", tmp_path / "out", InferenceOptions(**QUIET))
    out = np.asarray(Image.open(tmp_path / "out" / "cell.png"))
    assert out.shape == (45, 38) and out.dtype == np.uint8 and out.max() < 3


def test_existing_output_is_refused_and_kept(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = save_nifti(tmp_path / "in" / "a.nii.gz", ct_volume((32, 32, 2)), np.eye(4))
    args = [str(ckpt), "--input", str(src), "--output", str(tmp_path / "out"), "--no-progress"]
    assert main(["infer", *args]) == 0
    result = tmp_path / "out" / "a.nii.gz"
    result.write_bytes(b"previous result")
    capsys.readouterr()
    assert main(["infer", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "a.nii.gz" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert result.read_bytes() == b"previous result"
    assert main(["infer", *args, "--overwrite"]) == 0
    assert nib.load(str(result)).shape == (32, 32, 2)
    assert not [p for p in result.parent.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_output_may_not_replace_input(ckpt: Path, tmp_path: Path) -> None:
    src = save_nifti(tmp_path / "a.nii.gz", ct_volume((16, 16, 2)), np.eye(4))
    with pytest.raises(UsemaError, match="replace an input"):
        run_inference(ckpt, src, tmp_path, InferenceOptions(overwrite=True, **QUIET))


def test_tta_keeps_shape_and_is_mirror_equivariant(ckpt: Path) -> None:
    model = load_model(ckpt)
    image = ct_volume((40, 32, 1)).astype(np.float32)[None]
    options = InferenceOptions(tta=True, **QUIET)
    logits = predict_case(model, image, options, torch.device("cpu"))
    assert logits.shape == (3, 40, 32, 1)
    mirrored = predict_case(model, np.ascontiguousarray(image[:, ::-1]), options, torch.device("cpu"))
    torch.testing.assert_close(mirrored.flip(1), logits, rtol=1e-4, atol=1e-4)


def test_probabilities_are_channel_last_and_match_labels(ckpt: Path, tmp_path: Path) -> None:
    src = save_nifti(tmp_path / "p.nii.gz", ct_volume((32, 30, 2)), oblique_affine())
    run_inference(ckpt, src, tmp_path / "out", InferenceOptions(save_probabilities=True, **QUIET))
    probs = nib.load(str(tmp_path / "out" / "p_prob.nii.gz"))
    labels = np.asarray(nib.load(str(tmp_path / "out" / "p.nii.gz")).dataobj)
    assert probs.shape == (32, 30, 2, 3) and np.array_equal(probs.affine, nib.load(str(src)).affine)
    p = probs.get_fdata()
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    assert np.array_equal(p.argmax(-1), labels)


@pytest.mark.parametrize(
    "data, message",
    [
        (np.full((8, 8, 3), np.nan, np.float32), "finite"),
        (np.zeros((8, 8, 3, 2), np.float32), "2D or 3D"),
        (np.zeros((8, 0, 3), np.float32), "non-empty"),
    ],
    ids=["nan", "4d", "empty-axis"],
)
def test_bad_images_name_the_file(ckpt: Path, tmp_path: Path, data: np.ndarray, message: str) -> None:
    src = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(src))
    with pytest.raises(UsemaError, match=f"bad.nii.gz: expected .*{message}"):
        read_image(src)


def test_truncated_and_foreign_files_are_refused(ckpt: Path, tmp_path: Path) -> None:
    good = save_nifti(tmp_path / "good.nii.gz", ct_volume((16, 16, 2)), np.eye(4)).read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.nii.gz").write_text("not an image")
    for name in ("trunc.nii.gz", "text.nii.gz"):
        with pytest.raises(UsemaError, match=f"{name}: expected a readable"):
            read_image(tmp_path / name)


def test_foreign_checkpoints_are_refused(ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(UsemaError, match="junk.pt: expected a usema checkpoint"):
        load_model(tmp_path / "junk.pt")
    torch.save({"model": {}, "payload": Fraction(1, 3)}, tmp_path / "pickled.pt")  # any non-tensor object
    with pytest.raises(UsemaError, match="pickled.pt: refused: it holds Python objects"):
        load_model(tmp_path / "pickled.pt")
    swapped = torch.load(ckpt, weights_only=True)
    swapped["network"]["preset"] = "small"
    swapped["network"]["overrides"] = {}
    torch.save(swapped, tmp_path / "swapped.pt")
    with pytest.raises(UsemaError, match="swapped.pt: weights do not match the network usema"):
        load_model(tmp_path / "swapped.pt")
    with pytest.raises(UsemaError, match="no such run directory"):
        load_model(tmp_path / "missing")


def test_run_directory_prefers_best_checkpoint(ckpt: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt", seed=1)
    make_checkpoint(run / "checkpoints" / "best.pt", seed=2, deep_supervision=False)
    model = load_model(run)
    assert model.source.name == "best.pt" and model.spec.deep_supervision is False


def test_failed_write_keeps_the_previous_result(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = save_nifti(tmp_path / "a.nii.gz", ct_volume((32, 32, 2)), np.eye(4))
    run_inference(ckpt, src, tmp_path / "out", InferenceOptions(**QUIET))
    before = (tmp_path / "out" / "a.nii.gz").read_bytes()

    def disk_full(img: object, path: str) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", disk_full)
    with pytest.raises(UsemaError, match="a.nii.gz: could not write the result .*No space left"):
        run_inference(ckpt, src, tmp_path / "out", InferenceOptions(overwrite=True, **QUIET))
    assert (tmp_path / "out" / "a.nii.gz").read_bytes() == before
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.nii.gz"]


def test_3d_model_uses_3d_windows(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_network(
        "usema",
        3,
        1,
        2,
        preset="tiny",
        features=[8, 16],
        encoder_blocks=[1, 1],
        sema_num_stages=1,
        sema_depth=[1],
        head_dim=8,
        window_size=4,
    )
    recipe = {
        "name": "test3d",
        "data": {"source": "demo_brain", "spatial_dims": 3, "normalization": "zscore", "patch_size": [16, 16, 16]},
        "val": {"roi_size": None, "overlap": 0.25, "sw_batch_size": 2},
    }
    torch.save(
        {
            "model": net.state_dict(),
            "recipe": recipe,
            "network": {
                "name": "usema",
                "spatial_dims": 3,
                "in_channels": 1,
                "out_channels": 2,
                "preset": "tiny",
                "overrides": {
                    "features": [8, 16],
                    "encoder_blocks": [1, 1],
                    "sema_num_stages": 1,
                    "sema_depth": [1],
                    "head_dim": 8,
                    "window_size": 4,
                },
            },
        },
        tmp_path / "3d.pt",
    )
    model = load_model(tmp_path / "3d.pt")
    volume = ct_volume((20, 18, 17)).astype(np.float32)[None]
    logits = predict_case(model, volume, InferenceOptions(**QUIET), torch.device("cpu"))
    assert logits.shape == (2, 20, 18, 17)
    with pytest.raises(UsemaError, match="expected a 3D image for this 3D model"):
        run_inference(model, save_planar(tmp_path / "flat.png"), tmp_path / "out", InferenceOptions(**QUIET))


def save_planar(path: Path) -> Path:
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(path)
    return path


def test_all_zero_image_is_segmented(ckpt: Path, tmp_path: Path) -> None:
    src = save_nifti(tmp_path / "zero.nii.gz", np.zeros((32, 32, 2), np.int16), np.eye(4))
    run_inference(ckpt, src, tmp_path / "out", InferenceOptions(**QUIET))
    labels = np.asarray(nib.load(str(tmp_path / "out" / "zero.nii.gz")).dataobj)
    assert labels.shape == (32, 32, 2) and labels.max() < 3


def test_slice_blocks_give_the_whole_volume_result(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(ckpt)
    volume = ct_volume((36, 32, 5)).astype(np.float32)[None]
    options = InferenceOptions(save_probabilities=True, **QUIET)
    whole = predict_case(model, volume, options, torch.device("cpu"))
    monkeypatch.setattr(pipeline, "LOGITS_BUDGET_BYTES", 2 * 3 * 36 * 32 * 4)  # two slices of 3-class logits
    assert len(pipeline.slice_chunks(model, (36, 32, 5))[1]) == 3
    labels, probs = pipeline.segment_case(model, volume, options, torch.device("cpu"))
    assert np.array_equal(labels, whole.argmax(0).numpy())
    np.testing.assert_allclose(probs, torch.softmax(whole, 0).numpy(), atol=1e-5)


def test_usema_is_run_channels_last_on_cpu_with_the_same_logits(ckpt: Path, tmp_path: Path) -> None:
    """CPU inference converts USEMA's weights to its declared layout (channels-last: faster on oneDNN) and the
    predictions do not change; MONAI's networks and other devices keep PyTorch's default layout."""
    model = load_model(ckpt)
    volume = ct_volume((40, 36, 3)).astype(np.float32)[None]
    options = InferenceOptions(**QUIET)
    expected = predict_case(model, volume, options, torch.device("cpu"))
    src = save_nifti(tmp_path / "vol.nii.gz", ct_volume((40, 36, 3)), np.eye(4))
    run_inference(model, src, tmp_path / "out", options)
    weight = model.network.encoder[1][0].conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    torch.testing.assert_close(predict_case(model, volume, options, torch.device("cpu")), expected, rtol=1e-4, atol=1e-4)
    peer = build_network("basicunet", 2, 1, 3)
    assert inference_memory_format(peer, torch.device("cpu")) == torch.contiguous_format
    assert inference_memory_format(model.network, torch.device("cuda")) == torch.contiguous_format
