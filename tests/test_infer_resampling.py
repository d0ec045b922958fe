"""`usema infer` with a model trained at `data.target_spacing`: predict there, bring the probabilities back onto
the input's own grid, argmax last; the output keeps the input's exact geometry."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from test_inference import DTYPE_FIELDS, save_nifti
from synthetic_data import CT_STATS, TINY_USEMA

from usema.data.resample import resample_labels, target_shape
from usema.inference import pipeline
from usema.inference.model_loading import load_model
from usema.inference.pipeline import InferenceOptions, run_inference
from usema.inference.predictor import make_inferer, predict_logits
from usema.nets import build_network

SPACING = (0.7, 0.9, 3.0)
TARGET = [1.0, 1.0, None]


def oblique(spacing=SPACING) -> np.ndarray:
    c, s = np.cos(0.4), np.sin(0.4)
    rot = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]) @ np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)],
                                                                    [0, np.sin(0.3), np.cos(0.3)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = [12.5, -80.0, 33.0]
    return affine


def resampling_checkpoint(path: Path, target=TARGET, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = build_network("usema", 2, 1, 3, preset="tiny", deep_supervision=True, **TINY_USEMA)
    recipe = {
        "name": "resampled",
        "data": {"source": "nnunet", "root": "Dataset701_AbdomenCT", "spatial_dims": 2, "slice_axis": 2,
                 "normalization": "ct", "target_spacing": target, "patch_size": [32, 32], "labels": None},
        "val": {"roi_size": None, "overlap": 0.5, "sw_batch_size": 4},
    }
    ckpt = {
        "model": net.state_dict(),
        "network": {"name": "usema", "spatial_dims": 2, "in_channels": 1, "out_channels": 3, "preset": "tiny",
                    "overrides": TINY_USEMA},
        "recipe": recipe, "norm_stats": CT_STATS, "labels": {"0": "background", "1": "a", "2": "b"},
        "epoch": 1, "iteration": 1, "best_metric": 0.5, "metrics": {"history": []},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return resampling_checkpoint(tmp_path_factory.mktemp("ckpt") / "resampled.pt")


def smooth_ct(shape, seed=0):
    """CT-like intensities with structure at several scales, so that predictions vary across the image."""
    noise = np.random.default_rng(seed).normal(0, 1, shape)
    return (40 + 120 * ndimage.gaussian_filter(noise, (3, 3, 0.5)) / 0.05).clip(-500, 800).astype(np.int16)


def test_output_is_on_the_input_grid_exactly(ckpt, tmp_path):
    src = save_nifti(tmp_path / "in" / "case_0000.nii.gz", smooth_ct((53, 41, 6)), oblique())
    run_inference(ckpt, src, tmp_path / "out", InferenceOptions(progress=False))
    out, inp = nib.load(str(tmp_path / "out" / "case.nii.gz")), nib.load(str(src))
    assert out.shape == inp.shape and np.array_equal(out.affine, inp.affine)
    for key in inp.header.keys():
        if key not in DTYPE_FIELDS:
            assert np.array_equal(np.asarray(out.header[key]), np.asarray(inp.header[key])), key
    assert len(np.unique(np.asarray(out.dataobj))) > 1


def test_prediction_is_made_at_the_target_spacing(ckpt, tmp_path):
    """Independent reference: scipy's edge-aligned zoom to 1 mm in-plane, the network slice by slice there,
    softmax, linear zoom of the probabilities back, argmax."""
    model = load_model(ckpt)
    raw = smooth_ct((53, 41, 4), seed=3)
    src = save_nifti(tmp_path / "in" / "case_0000.nii.gz", raw, oblique())
    run_inference(model, src, tmp_path / "out", InferenceOptions(progress=False, save_probabilities=True))
    labels = np.asarray(nib.load(str(tmp_path / "out" / "case.nii.gz")).dataobj)

    normalized = (np.clip(raw.astype(np.float64), -100, 200) - 40) / 70
    shape = target_shape(raw.shape, SPACING, TARGET)
    zoomed = ndimage.zoom(normalized, (shape[0] / 53, shape[1] / 41, 1), order=3, mode="nearest", grid_mode=True)
    inferer = make_inferer([32, 32], 3, 2, slice_axis=2, overlap=0.5, sw_batch_size=4, device="cpu")
    logits = predict_logits(model.network, torch.from_numpy(zoomed.astype(np.float32))[None, None], inferer)[0]
    probs = torch.softmax(logits, 0).numpy()
    back = np.stack([ndimage.zoom(p, (53 / shape[0], 41 / shape[1], 1), order=1, mode="nearest", grid_mode=True)
                     for p in probs])
    # identical up to float32 ties at class boundaries
    assert (labels == back.argmax(0)).mean() > 0.999


def test_blocks_of_slices_give_the_same_result(ckpt, tmp_path, monkeypatch):
    src = save_nifti(tmp_path / "in" / "case_0000.nii.gz", smooth_ct((53, 41, 7), seed=5), oblique())
    run_inference(ckpt, src, tmp_path / "whole", InferenceOptions(progress=False))
    monkeypatch.setattr(pipeline, "LOGITS_BUDGET_BYTES", 3 * 53 * 41 * 4 * 2)  # two slices at a time
    run_inference(ckpt, src, tmp_path / "blocks", InferenceOptions(progress=False))
    whole = np.asarray(nib.load(str(tmp_path / "whole" / "case.nii.gz")).dataobj)
    blocks = np.asarray(nib.load(str(tmp_path / "blocks" / "case.nii.gz")).dataobj)
    assert np.array_equal(whole, blocks)


def test_a_label_volume_resampled_there_and_back_keeps_dice_098():
    """Organ-sized structures at 0.7 × 0.9 × 3 mm, to the 1 mm in-plane target and back."""
    shape = (160, 128, 30)
    grid = np.indices(shape).astype(float)
    label = np.zeros(shape, np.uint8)
    for cls, (centre, radii) in enumerate([((60, 50, 15), (35, 25, 10)), ((110, 80, 12), (20, 18, 8)),
                                           ((70, 95, 20), (15, 12, 6))], start=1):
        label[sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) < 1] = cls
    there = resample_labels(label, target_shape(shape, SPACING, TARGET), kept=[2])
    back = resample_labels(there, shape, kept=[2])
    for cls in (1, 2, 3):
        inter = ((back == cls) & (label == cls)).sum()
        assert 2 * inter / ((back == cls).sum() + (label == cls).sum()) >= 0.98


def test_a_volume_without_spacing_information_is_refused(ckpt, tmp_path, capsys):
    """PNG images carry no spacing; a model trained at a 3-axis target spacing cannot be used on them."""
    from PIL import Image

    from usema.cli import main

    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "a.png")
    assert main(["infer", str(ckpt), "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "out")]) == 2
    assert "data.target_spacing" in capsys.readouterr().err
    assert not (tmp_path / "out" / "a.png").exists()
