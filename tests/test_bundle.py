"""`usema export`: the MONAI bundle passes MONAI's own checks and segments like `usema infer`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from usema.bundle.configs import ALLOWED_EXPRESSIONS, detect_input_format, normalization_transforms
from usema.bundle.export import export_bundle
from usema.config import Recipe, recipe_from_dict
from usema.data.preprocess import normalize
from usema.errors import UsemaError
from usema.inference.pipeline import InferenceOptions, run_inference
from usema.nets import build_network

from synthetic_data import CT_STATS, TINY_USEMA

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO.parent / "shared" / "monai" / "meta_schema_20240725.json"
TINY = TINY_USEMA


def make_run(run: Path, name: str = "usema", overrides: dict | None = None) -> Path:
    """A run directory with checkpoints/best.pt in the documented format (random tiny 2D network, CT recipe)."""
    torch.manual_seed(0)
    overrides = TINY if overrides is None else overrides
    net = build_network(name, 2, 1, 3, preset="tiny", deep_supervision=True, img_size=[32, 32], **overrides)
    recipe = {
        "name": "bundle_test",
        "data": {
            "source": "demo_brain",
            "spatial_dims": 2,
            "slice_axis": 2,
            "normalization": "ct",
            "patch_size": [32, 32],
            "labels": None,
        },
        "val": {"roi_size": [32, 32], "overlap": 0.5, "sw_batch_size": 4},
    }
    ckpt = {
        "model": net.state_dict(),
        "network": {
            "name": name,
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": 3,
            "preset": "tiny",
            "overrides": overrides,
        },
        "recipe": recipe,
        "norm_stats": CT_STATS,
        "labels": {"0": "background", "1": "liver", "2": "spleen"},
        "epoch": 3,
        "iteration": 30,
        "best_metric": 0.61,
        "metrics": {  # the trainer's history: one row per epoch, None where not validated
            "history": [
                {"epoch": 1, "train_loss": 1.2, "dice_liver": 0.5, "dice_spleen": 0.4, "mean_dice": 0.45},
                {"epoch": 2, "train_loss": 1.0, "dice_liver": 0.7, "dice_spleen": 0.52, "mean_dice": 0.61},
                {"epoch": 3, "train_loss": 0.9, "dice_liver": None, "dice_spleen": None, "mean_dice": None},
            ],
        },
    }
    (run / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, run / "checkpoints" / "best.pt")
    return run


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    return export_bundle(make_run(root / "run"), root / "bundle")


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CT-like NIfTI with an oblique affine, named without channel postfix."""
    folder = tmp_path_factory.mktemp("images")
    affine = np.array([[0.7, 0.1, 0.0, -90.0], [-0.1, 0.7, 0.05, 20.0], [0.0, -0.04, 2.5, 3.0], [0, 0, 0, 1]])
    data = np.random.default_rng(0).normal(40, 90, (45, 38, 4)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, affine), str(folder / "patient7.nii.gz"))
    return folder / "patient7.nii.gz"


def monai_bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m monai.bundle ARGS` in ``cwd``; fails the test with its output when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny work: extra threads only wait for each other on a busy CPU
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def dollar_expressions(node: object) -> list[str]:
    if isinstance(node, dict):
        return [e for v in node.values() for e in dollar_expressions(v)]
    if isinstance(node, list):
        return [e for v in node for e in dollar_expressions(v)]
    return [node] if isinstance(node, str) and node.startswith("$") else []


def test_bundle_layout_and_safe_expressions(bundle: Path) -> None:
    for rel in ("LICENSE", "configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (bundle / rel).is_file(), rel
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert config["network_def"]["_target_"] == "usema.nets.USEMA"
    assert config["inferer"]["_target_"] == "SliceInferer" and config["inferer"]["spatial_dim"] == 2
    assert set(dollar_expressions(config)) <= set(ALLOWED_EXPRESSIONS)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background",
        "1": "liver",
        "2": "spleen",
    }
    assert meta["eval_metrics"] == pytest.approx(
        {"val_mean_dice": 0.61, "val_dice_liver": 0.7, "val_dice_spleen": 0.52, "epoch": 2}
    )
    assert "usema" in meta["required_packages_version"]
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_existing_bundle_is_refused_then_replaced(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    bundle = export_bundle(run, tmp_path / "bundle")
    (bundle / "models" / "model.pt").write_bytes(b"previous weights")
    with pytest.raises(UsemaError, match="bundle: exists"):
        export_bundle(run, bundle)
    assert (bundle / "models" / "model.pt").read_bytes() == b"previous weights"
    export_bundle(run, bundle, overwrite=True)
    assert torch.load(bundle / "models" / "model.pt", weights_only=True).keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "run"]  # no temporary directories left


@pytest.mark.parametrize("scheme", ["ct", "zscore", "rgb", "none"])
def test_bundle_preprocessing_equals_usema_normalization(scheme: str) -> None:
    image = np.random.default_rng(1).normal(40, 120, (2, 9, 8, 3)).astype(np.float32)
    transforms = ConfigParser({"t": {"_target_": "Compose", "transforms": normalization_transforms(scheme, CT_STATS)}})
    ours = normalize(image, scheme, CT_STATS)
    theirs = np.asarray(transforms.get_parsed_content("t")({"image": torch.from_numpy(image.copy())})["image"])
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)


def test_usema_infer_accepts_the_bundle(bundle: Path, volume: Path, tmp_path: Path) -> None:
    options = InferenceOptions(progress=False)
    run_inference(bundle, volume, tmp_path / "from_bundle", options)
    run_inference(bundle.parent / "run", volume, tmp_path / "from_run", options)
    a = np.asarray(nib.load(str(tmp_path / "from_bundle" / volume.name)).dataobj)
    b = np.asarray(nib.load(str(tmp_path / "from_run" / volume.name)).dataobj)
    assert np.array_equal(a, b)


@pytest.mark.slow
def test_verify_metadata(bundle: Path) -> None:
    if not SCHEMA.is_file():
        pytest.skip(f"offline schema {SCHEMA} is absent and the check would download it")
    monai_bundle("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(SCHEMA), cwd=bundle)


@pytest.mark.slow
def test_verify_net_in_out(bundle: Path) -> None:
    monai_bundle(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--device",
        "cpu",
        cwd=bundle,
    )


@pytest.mark.slow
def test_ckpt_export(bundle: Path, tmp_path: Path) -> None:
    how = json.loads((bundle / "configs" / "usema.json").read_text())["torchscript"]
    assert how in ("script", "trace"), how
    monai_bundle(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(tmp_path / "model.ts"),
        "--ckpt_file",
        "models/model.pt",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        *(["--use_trace", "True", "--input_shape", "[1, 1, 32, 32]"] if how == "trace" else []),
        cwd=bundle,
    )
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_bundle_run_matches_usema_infer(bundle: Path, volume: Path, tmp_path: Path) -> None:
    monai_bundle(
        "run",
        "--config_file",
        "configs/inference.json",
        "--meta_file",
        "configs/metadata.json",
        "--bundle_root",
        str(bundle),
        "--dataset_dir",
        str(volume.parent),
        "--output_dir",
        str(tmp_path / "monai"),
        cwd=bundle,
    )
    run_inference(bundle.parent / "run", volume, tmp_path / "usema", InferenceOptions(progress=False))
    ours = nib.load(str(tmp_path / "usema" / volume.name))
    theirs = nib.load(str(tmp_path / "monai" / volume.name))
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-5)
    agreement = (np.asarray(theirs.dataobj) == np.asarray(ours.dataobj)).mean()
    assert agreement >= 0.999, agreement


def save_tiny_run(run: Path, in_channels: int, data: dict) -> Path:
    """A run with checkpoints/last.pt around a random tiny 2D USEMA with 3 classes and recipe section ``data``."""
    torch.manual_seed(0)
    net = build_network("usema", 2, in_channels, 3, preset="tiny", **TINY)
    network = {"name": "usema", "spatial_dims": 2, "in_channels": in_channels, "out_channels": 3, "preset": "tiny"}
    recipe = {"name": run.name, "data": data, "val": {"roi_size": None, "overlap": 0.5, "sw_batch_size": 4}}
    (run / "checkpoints").mkdir(parents=True)
    ckpt = {"model": net.state_dict(), "recipe": recipe, "norm_stats": None, "network": {**network, "overrides": TINY}}
    torch.save(ckpt, run / "checkpoints" / "last.pt")
    return run


def run_bundle_in_process(bundle: Path, images: Path, output: Path) -> None:
    """What `python -m monai.bundle run ...` does, without a new interpreter."""
    from monai.bundle import run as bundle_run

    configs = bundle / "configs"
    bundle_run(
        config_file=str(configs / "inference.json"),
        meta_file=str(configs / "metadata.json"),
        bundle_root=str(bundle),
        dataset_dir=str(images),
        output_dir=str(output),
    )


def test_png_bundle_segments_like_usema_infer(tmp_path: Path) -> None:
    """A run trained on 2D images exports a PNG bundle (PILReader/PILWriter, 2D windows) equal to `usema infer`."""
    from PIL import Image

    data = {"source": "demo_nuclei", "spatial_dims": 2, "normalization": "zscore", "patch_size": [32, 32]}
    run = save_tiny_run(tmp_path / "cells", in_channels=3, data=data)
    (tmp_path / "images").mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (45, 38, 3), dtype=np.uint8)  # not square: catches transposes
    Image.fromarray(pixels).save(tmp_path / "images" / "cell.png")
    bundle = export_bundle(run, tmp_path / "bundle")
    assert json.loads((bundle / "configs" / "usema.json").read_text())["input_format"] == "png"
    run_bundle_in_process(bundle, tmp_path / "images", tmp_path / "monai")
    run_inference(run, tmp_path / "images", tmp_path / "usema", InferenceOptions(progress=False))
    theirs = np.asarray(Image.open(tmp_path / "monai" / "cell.png"))
    ours = np.asarray(Image.open(tmp_path / "usema" / "cell.png"))
    assert theirs.shape == ours.shape == (45, 38)
    assert (theirs == ours).mean() >= 0.999


def test_multichannel_bundle_reads_nnunet_channel_files(tmp_path: Path) -> None:
    data = {"source": "nnunet", "root": str(tmp_path / "gone"), "spatial_dims": 2, "slice_axis": 2, "normalization": "zscore", "patch_size": [32, 32]}
    run = save_tiny_run(tmp_path / "mr", in_channels=2, data=data)
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for channel in range(2):
        volume = rng.normal(300, 100, (40, 36, 3)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "images" / f"pat_{channel:04d}.nii.gz"))
    bundle = export_bundle(run, tmp_path / "bundle", input_format="nifti")
    run_bundle_in_process(bundle, tmp_path / "images", tmp_path / "monai")
    run_inference(run, tmp_path / "images", tmp_path / "usema", InferenceOptions(progress=False))
    # MONAI's SaveImaged names the output after the first channel file
    theirs = np.asarray(nib.load(str(tmp_path / "monai" / "pat_0000.nii.gz")).dataobj)
    ours = np.asarray(nib.load(str(tmp_path / "usema" / "pat.nii.gz")).dataobj)
    assert (theirs == ours).mean() >= 0.999


def test_input_format_follows_the_training_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "Dataset703_NeurIPSCell").mkdir()
    (tmp_path / "Dataset703_NeurIPSCell" / "dataset.json").write_text(json.dumps({"file_ending": ".png"}))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    def recipe(**data: str) -> Recipe:
        return recipe_from_dict({"name": "r", "data": data})

    assert detect_input_format(recipe(source="nnunet", root="Dataset703_NeurIPSCell")) == "png"
    assert detect_input_format(recipe(source="nnunet", root="Dataset999_Missing")) == "nifti"
    assert detect_input_format(recipe(source="demo_brain")) == "nifti"
