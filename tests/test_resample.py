"""Resampling to a target spacing: nnU-Net's orders, label round trips, block-wise return of probabilities, and
training on resampled cases."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from scipy import ndimage

from usema.config import load_recipe
from usema.data import prepare_data
from usema.data.resample import probability_blocks, resample_image, resample_labels, resize, target_shape


def blobs(shape, rng):
    grid = np.indices(shape).astype(float)
    label = np.zeros(shape, np.uint8)
    for cls in (1, 2, 3):  # ellipsoids spanning 30-50% of each axis
        centre = [rng.uniform(0.3, 0.7) * s for s in shape]
        radius = rng.uniform(0.15, 0.25)
        label[sum(((g - c) / (radius * s)) ** 2 for g, c, s in zip(grid, centre, shape)) < 1] = cls
    return label


def dice(a, b, cls):
    return 2 * ((a == cls) & (b == cls)).sum() / max((a == cls).sum() + (b == cls).sum(), 1)


def test_target_shape_follows_the_physical_extent():
    assert target_shape((512, 512, 100), (0.7, 0.7, 2.5), (1.0, 1.0, 2.5)) == (358, 358, 100)
    assert target_shape((512, 512, 100), (0.7, 0.7, 2.5), (1.0, 1.0, None)) == (358, 358, 100)
    assert target_shape((3, 3), (0.1, 0.1), (10.0, 10.0)) == (1, 1)


def test_resize_is_edge_aligned_like_scipy_grid_mode():
    """Independent reference: scipy's zoom with grid_mode=True (the scikit-image resize convention)."""
    rng = np.random.default_rng(0)
    a = rng.random((20, 30)).astype(np.float32)
    for order in (0, 1, 3):
        expected = ndimage.zoom(a, (33 / 20, 17 / 30), order=order, mode="nearest", grid_mode=True)
        assert np.allclose(resize(a, (33, 17), order), expected, atol=1e-5)


@pytest.mark.parametrize(
    "shape, spacing, target",
    [((64, 64, 20), (0.7, 0.9, 3.0), (1.0, 1.0, None)), ((40, 40, 40), (1.0, 1.0, 1.0), (0.8, 1.25, 1.1))],
    ids=["2d-in-plane", "3d"],
)
def test_label_round_trip_keeps_classes_and_shapes(shape, spacing, target):
    label = blobs(shape, np.random.default_rng(1))
    kept = [a for a, t in enumerate(target) if t is None]
    there = resample_labels(label, target_shape(shape, spacing, target), kept)
    back = resample_labels(there, shape, kept)
    assert back.shape == label.shape and back.dtype == label.dtype
    assert set(np.unique(there)) <= set(np.unique(label))
    for cls in (1, 2, 3):
        assert dice(back, label, cls) >= 0.95


def test_in_plane_resampling_never_mixes_slices():
    """A 2D plan keeps the slice axis: each output slice depends on its own input slice only."""
    rng = np.random.default_rng(2)
    image = rng.normal(size=(1, 30, 30, 6)).astype(np.float32)
    out = resample_image(image, (0.5, 0.5, 5.0), (1.0, 1.0, None))
    assert out.shape == (1, 15, 15, 6)
    changed = image.copy()
    changed[..., 3] += 100
    again = resample_image(changed, (0.5, 0.5, 5.0), (1.0, 1.0, None))
    assert np.array_equal(again[..., [0, 1, 2, 4, 5]], out[..., [0, 1, 2, 4, 5]])


def test_anisotropic_volumes_use_nearest_across_planes():
    """Spacing 0.8 × 0.8 × 4 mm (ratio 5 > 3): order 3 in-plane, order 0 across planes, as nnU-Net."""
    rng = np.random.default_rng(3)
    image = rng.normal(size=(1, 16, 16, 5)).astype(np.float32)
    out = resample_image(image, (0.8, 0.8, 4.0), (0.8, 0.8, 2.0))
    assert out.shape == (1, 16, 16, 10)
    # nearest along z: every output plane is one of the (unchanged) input planes
    for z in range(10):
        assert any(np.allclose(out[0, ..., z], image[0, ..., k], atol=1e-5) for k in range(5))


def test_probabilities_come_back_block_by_block_as_one_resize():
    rng = np.random.default_rng(4)
    probs = rng.random((3, 45, 45, 40)).astype(np.float32)
    shape = (64, 64, 20)
    whole = np.stack([resize(p, shape, 1) for p in probs])
    blocks = list(probability_blocks(probs, shape, axis=2, block_bytes=3 * 64 * 64 * 4 * 3))
    assert len(blocks) == 7
    joined = np.concatenate([b for _, b in blocks], axis=3)
    assert np.array_equal(joined, whole)
    assert [s.start for s, _ in blocks] == list(range(0, 20, 3))


def test_training_cases_are_resampled_to_the_recipe_spacing(ct_dataset, tmp_path):
    """Synthetic CT at 0.8 × 0.8 × 2.5 mm, 48 × 40 × 12 voxels, planned to 1.2 × 1.0 mm in-plane."""
    root = tmp_path / "ds"
    shutil.copytree(ct_dataset, root)
    recipe = load_recipe("flare22_small", [f"data.root={root}", "data.labels=null", "data.target_spacing=[1.2, 1.0, null]",
                                           "data.patch_size=[64, 64]", "model.preset=tiny"])
    data = prepare_data(recipe, tmp_path / "run")
    assert {c.shape for c in data.train_dataset.cases} == {(32, 32, 12)}
    assert all(v["image"].shape[1:] == v["label"].shape == (32, 32, 12) for v in data.val_cases)
