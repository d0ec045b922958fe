"""Data side: normalisation, demo datasets and splits, nnU-Net reading, deterministic patches, dataset checks."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from usema.cli import main
from usema.config import recipe_from_dict
from usema.data import demos, prepare_data, split_cases
from usema.data.command import export_nuclei
from usema.data.nnunet import check_dataset
from usema.data.preprocess import ct_foreground_stats, normalize
from usema.errors import UsemaError


def nnunet_recipe(root: Path, **data) -> object:
    spatial_dims = data.pop("spatial_dims", 2)
    patch = data.pop("patch_size", [32] * spatial_dims)
    return recipe_from_dict({
        "name": "t",
        "data": {"source": "nnunet", "root": str(root), "spatial_dims": spatial_dims, "patch_size": patch,
                 "val_fraction": 0.25, **data},
        "train": {"epochs": 1, "iterations_per_epoch": 4, "batch_size": 2},
    })


def copy_dataset(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


# --- normalisation ---------------------------------------------------------------------------


def test_zscore_is_per_image_per_channel_and_safe_on_constant_images():
    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(100, 20, (16, 16)), rng.normal(-5, 0.1, (16, 16)), np.full((16, 16), 7.0)])
    out = normalize(image, "zscore")
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_allclose(out[:2].mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(out[:2].std(axis=(1, 2)), 1, atol=1e-4)
    assert np.all(out[2] == 0)  # constant channel: std floor, no NaN


def test_ct_normalisation_clips_then_standardises():
    stats = {"lower": -100.0, "upper": 200.0, "mean": 50.0, "std": 25.0}
    out = normalize(np.array([[-1000.0, 50.0, 3000.0]]), "ct", stats)
    np.testing.assert_allclose(out, [[-6.0, 0.0, 6.0]])
    with pytest.raises(UsemaError, match="ct normalisation needs stats"):
        normalize(np.zeros((1, 3)), "ct", None)


def test_non_finite_intensities_name_the_case():
    image = np.ones((1, 4, 4))
    image[0, 1, 1] = np.nan
    with pytest.raises(UsemaError, match="case_7: expected finite intensities"):
        normalize(image, "zscore", name="case_7")


def test_ct_stats_are_foreground_percentiles_mean_std():
    rng = np.random.default_rng(1)
    images = [rng.normal(0, 100, (1, 20, 20)) for _ in range(2)]
    labels = [np.zeros((20, 20), int) for _ in range(2)]
    labels[0][5:10, 5:10] = 1
    labels[1][0:3, :] = 2
    stats = ct_foreground_stats(images, labels)
    fg = np.concatenate([images[0][0][labels[0] > 0], images[1][0][labels[1] > 0]])
    assert stats["lower"] == pytest.approx(np.percentile(fg, 0.5))
    assert stats["upper"] == pytest.approx(np.percentile(fg, 99.5))
    assert stats["mean"] == pytest.approx(fg.mean()) and stats["std"] == pytest.approx(fg.std())
    with pytest.raises(UsemaError, match="foreground"):
        ct_foreground_stats([images[0]], [np.zeros((20, 20))])


# --- demo data -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def brain_data(tmp_path_factory):
    recipe = recipe_from_dict({"name": "b", "data": {"source": "demo_brain", "patch_size": [64, 64]}})
    return prepare_data(recipe, tmp_path_factory.mktemp("brain"))


def test_brain_labels_follow_the_definition():
    t1 = np.array([0.0, 100.0, 100.0, 100.0, 100.0]) * 2.55  # T1/255 = 0, .39, ...
    gm = np.array([0.9, 0.1, 0.7, 0.2, 0.0]) * 255
    wm = np.array([0.0, 0.1, 0.2, 0.7, 0.0]) * 255
    assert demos.brain_labels(t1, gm, wm).tolist() == [0, 1, 2, 3, 1]  # outside, CSF, GM, WM, CSF


@pytest.mark.slow
def test_brain_demo_split_and_labels(brain_data):
    demo = demos.load_brain()
    assert demo.t1.shape == demos.BRAIN_SHAPE == (197, 233, 189)
    assert np.all(demo.label[demo.t1 / 255 <= 0.2] == 0) and set(np.unique(demo.label)) == {0, 1, 2, 3}
    assert brain_data.labels == {0: "background", 1: "CSF", 2: "GM", 3: "WM"} and brain_data.in_channels == 1
    (val,) = brain_data.val_cases
    assert val["image"].shape == (1, 197, 233, 20)
    np.testing.assert_array_equal(val["label"], demo.label[..., 95:115])
    # training = z in [0, 90) and [120, 189): nothing within 5 slices of the held-out slab
    pieces = [case.label for case in brain_data.train_dataset.cases]
    assert sum(p.shape[2] for p in pieces) == 90 + 69
    np.testing.assert_array_equal(np.concatenate(pieces, axis=2), demo.label[..., np.r_[0:90, 120:189]])
    # whole-volume z-score: the slabs are pieces of one normalised volume
    whole = normalize(demo.t1[None], "zscore")
    np.testing.assert_allclose(val["image"], whole[..., 95:115], rtol=1e-5)


@pytest.mark.slow
def test_brain_patches_are_2d_axial_slices(brain_data):
    sample = brain_data.train_dataset[3]
    assert sample["image"].shape == (1, 64, 64) and sample["label"].shape == (1, 64, 64)
    assert sample["image"].dtype == torch.float32 and sample["label"].dtype == torch.float32
    assert set(sample["label"].unique().tolist()) <= {0, 1, 2, 3}


@pytest.mark.parametrize("target, classes", [("binary", {0, 1}), ("instance_boundary", {0, 1, 2})])
def test_nuclei_split_and_targets(tmp_path, target, classes):
    recipe = recipe_from_dict({"name": "n", "data": {"source": "demo_nuclei", "patch_size": [64, 64],
                                                     "target": target}})
    data = prepare_data(recipe, tmp_path)
    (val,) = data.val_cases
    (train,) = data.train_dataset.cases
    assert val["image"].shape == (1, 512, 128) and train.image.shape == (1, 512, 384)
    raw, instances = demos.load_nuclei()
    whole = normalize(raw[None], "zscore")
    np.testing.assert_allclose(train.image, whole[..., :384], rtol=1e-6)
    np.testing.assert_allclose(val["image"], whole[..., 384:], rtol=1e-6)
    assert set(np.unique(val["label"])) == classes and set(data.labels) == classes
    np.testing.assert_array_equal(val["label"] > 0, instances[:, 384:] > 0)


def test_boundary_pixels_touch_another_instance_or_background():
    instances = np.zeros((7, 9), int)
    instances[1:6, 1:4] = 1
    instances[1:6, 4:8] = 2
    semantic = demos.instance_to_semantic(instances, "instance_boundary")
    assert semantic[3, 2] == 1 and semantic[3, 3] == 2 and semantic[3, 4] == 2 and semantic[1, 2] == 2
    assert np.all(semantic[instances == 0] == 0)
    _, real = demos.load_nuclei()
    np.testing.assert_array_equal(demos.instance_to_semantic(real, "instance_boundary") == 2, inner_boundaries(real))


def inner_boundaries(instances: np.ndarray) -> np.ndarray:
    """skimage's ``find_boundaries(mode="inner")``, written out: an instance's pixels with a 4-neighbour of another
    value (the image edge repeats the border pixel, so it is no boundary by itself)."""
    padded = np.pad(instances, 1, mode="edge")
    neighbours = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
    return (instances != 0) & np.any([n != instances for n in neighbours], axis=0)


def test_export_nuclei_writes_readable_pair_and_refuses_overwrite(tmp_path, capsys):
    from usema.io.labels import read_image, read_label

    assert main(["datasets", "export-demo", "nuclei", "--output", str(tmp_path / "demo")]) == 0
    image, label, meta = (Path(line) for line in capsys.readouterr().out.split())
    array, _ = read_image(image)
    classes, _ = read_label(label)
    assert array.shape == (1, 512, 512) and classes.shape == (512, 512) and set(np.unique(classes)) == {0, 1}
    assert json.loads(meta.read_text())["labels"] == {"background": 0, "nucleus": 1}
    with pytest.raises(UsemaError, match="--overwrite"):
        export_nuclei(tmp_path / "demo", "binary")
    export_nuclei(tmp_path / "demo", "instance_boundary", overwrite=True)
    assert set(np.unique(read_label(label)[0])) == {0, 1, 2}


@pytest.mark.slow
def test_export_brain_keeps_the_template_grid(tmp_path):
    from usema.data.command import export_brain
    from usema.io.labels import geometry_affine, read_image, read_label

    image, label, _ = export_brain(tmp_path / "demo")
    demo = demos.load_brain()
    array, geometry = read_image(image)
    classes, label_geometry = read_label(label)
    np.testing.assert_array_equal(array[0], demo.t1)
    np.testing.assert_array_equal(classes, demo.label)
    np.testing.assert_allclose(geometry_affine(geometry), demo.affine)
    np.testing.assert_allclose(geometry_affine(label_geometry), demo.affine)


# --- nnU-Net datasets ------------------------------------------------------------------------


def test_ct_2d_on_3d_slices_volumes_and_keeps_validation_3d(ct_dataset, tmp_path):
    data = prepare_data(nnunet_recipe(ct_dataset, normalization="ct", slice_axis=2), tmp_path)
    assert data.labels == {0: "background", 1: "liver", 2: "spleen", 3: "kidney"} and data.in_channels == 1
    sample = data.train_dataset[0]
    assert sample["image"].shape == (1, 32, 32) and sample["label"].shape == (1, 32, 32)
    assert [v["name"] for v in data.val_cases] == ["case_002"]
    val = data.val_cases[0]
    assert val["image"].shape == (1, 48, 40, 12) and val["image"].dtype == np.float32
    assert val["label"].shape == (48, 40, 12) and np.issubdtype(val["label"].dtype, np.integer)
    assert set(data.norm_stats) == {"lower", "upper", "mean", "std"}
    # slicing along another voxel axis gives patches of that plane
    other = prepare_data(nnunet_recipe(ct_dataset, normalization="ct", slice_axis=0, patch_size=[16, 16]), tmp_path)
    assert other.train_dataset[1]["image"].shape == (1, 16, 16)


def test_ct_stats_come_from_training_foreground_and_are_cached(ct_dataset, tmp_path):
    recipe = nnunet_recipe(ct_dataset, normalization="ct")
    data = prepare_data(recipe, tmp_path)
    train = ("case_000", "case_001", "case_003")  # case_002 is the validation case (val_fraction 0.25, seed 0)
    images = [nib.load(ct_dataset / "imagesTr" / f"{c}_0000.nii.gz").get_fdata()[None] for c in train]
    labels = [nib.load(ct_dataset / "labelsTr" / f"{c}.nii.gz").get_fdata() for c in train]
    expected = ct_foreground_stats(images, labels)
    assert data.norm_stats == pytest.approx(expected, rel=1e-4)  # validation case_002 not included
    cache = tmp_path / "norm_stats.json"
    saved = json.loads(cache.read_text())
    saved["mean"] = 12345.0  # a resumed run reuses the cached statistics instead of recomputing
    cache.write_text(json.dumps(saved))
    assert prepare_data(recipe, tmp_path).norm_stats["mean"] == 12345.0


def test_3d_network_gets_3d_patches(ct_dataset, tmp_path):
    data = prepare_data(nnunet_recipe(ct_dataset, spatial_dims=3, patch_size=[32, 32, 16]), tmp_path)
    sample = data.train_dataset[0]
    assert sample["image"].shape == (1, 32, 32, 16)  # 12 slices padded to 16


def test_multichannel_cases_stack_channels(mr_dataset, tmp_path):
    data = prepare_data(nnunet_recipe(mr_dataset, normalization="zscore"), tmp_path)
    assert data.in_channels == 2 and data.train_dataset[0]["image"].shape == (2, 32, 32)
    assert data.val_cases[0]["image"].shape == (2, 48, 40, 12) and data.norm_stats is None


def test_rgb_png_cases_are_channels_first(png_dataset, tmp_path):
    data = prepare_data(nnunet_recipe(png_dataset, cache=False), tmp_path)
    assert data.in_channels == 3 and data.labels == {0: "background", 1: "interior", 2: "boundary"}
    assert data.train_dataset[0]["image"].shape == (3, 32, 32)
    assert data.val_cases[0]["image"].shape == (3, 64, 48) and data.val_cases[0]["label"].shape == (64, 48)


def test_foreground_oversampling_centres_patches_on_labels(ct_dataset, tmp_path):
    always = prepare_data(nnunet_recipe(ct_dataset, fg_oversample=1.0, patch_size=[8, 8]), tmp_path).train_dataset
    never = prepare_data(nnunet_recipe(ct_dataset, fg_oversample=0.0, patch_size=[8, 8]), tmp_path).train_dataset
    hit_always = np.mean([always[i]["label"].max().item() > 0 for i in range(30)])
    hit_never = np.mean([never[i]["label"].max().item() > 0 for i in range(30)])
    assert hit_always == 1.0 and hit_never < hit_always


def test_train_samples_depend_only_on_seed_and_index(ct_dataset, tmp_path):
    recipe = nnunet_recipe(ct_dataset, normalization="ct")
    first = prepare_data(recipe, tmp_path / "a").train_dataset
    again = prepare_data(recipe, tmp_path / "b").train_dataset
    order = [5, 0, 3, 1]
    loader = torch.utils.data.DataLoader(again, batch_size=None, sampler=order, num_workers=2)
    for index, sample in zip(order, loader):
        expected = first[index]
        assert torch.equal(sample["image"], expected["image"]) and torch.equal(sample["label"], expected["label"])
    assert not torch.equal(first[0]["image"], first[1]["image"])
    reseeded = prepare_data(nnunet_recipe(ct_dataset, normalization="ct"), tmp_path / "c").train_dataset
    reseeded.seed = 1
    assert not torch.equal(reseeded[0]["image"], first[0]["image"])


def test_split_is_deterministic_disjoint_and_seeded():
    names = [f"c{i}" for i in range(10)]
    train, val = split_cases(names[::-1], 0.2, seed=0)
    assert (train, val) == split_cases(names, 0.2, seed=0)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == names
    assert any(split_cases(names, 0.2, seed=s)[1] != val for s in range(1, 5))
    assert split_cases(["only"], 0.2, seed=0) == (["only"], [])


def test_relative_root_resolves_against_nnunet_raw(ct_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(ct_dataset.parent))
    data = prepare_data(nnunet_recipe(Path(ct_dataset.name)), tmp_path)
    assert data.in_channels == 1


# --- dataset problems ------------------------------------------------------------------------


def _relabel(path: Path, edit) -> None:
    img = nib.load(str(path))
    array = np.asarray(img.dataobj).copy()
    array, affine = edit(array, img.affine.copy())
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _break(kind: str, root: Path) -> str:
    """Introduce one problem into the dataset copy ``root``; return a string its report must contain."""
    meta_path = root / "dataset.json"
    meta = json.loads(meta_path.read_text())
    if kind == "missing_label":
        (root / "labelsTr" / "case_001.nii.gz").unlink()
        return "labelsTr/case_001.nii.gz: missing label"
    if kind == "shape":
        _relabel(root / "labelsTr" / "case_001.nii.gz", lambda a, m: (a[:-1], m))
        return "labelsTr/case_001.nii.gz: expected the image's shape"
    if kind == "affine":
        _relabel(root / "labelsTr" / "case_001.nii.gz", lambda a, m: (a, np.diag([1.0, 1.0, 1.0, 1.0])))
        return "labelsTr/case_001.nii.gz: expected the same affine"
    if kind == "label_values":
        _relabel(root / "labelsTr" / "case_001.nii.gz", lambda a, m: (np.where(a == 3, 9, a).astype(np.uint8), m))
        return "labelsTr/case_001.nii.gz: label values [9]"
    if kind == "num_training":
        meta["numTraining"] = 7
    elif kind == "channels":
        meta["channel_names"] = {"0": "CT", "1": "PET"}
    elif kind == "escape":
        meta["dataset"] = {"case_000": {"images": ["../../etc/passwd"], "label": "labelsTr/case_000.nii.gz"}}
    meta_path.write_text(json.dumps(meta))
    return {"num_training": "numTraining is 7", "channels": "expected 2 channel(s)",
            "escape": "escapes the dataset folder"}[kind]


PROBLEMS = ["missing_label", "shape", "affine", "label_values", "num_training", "channels", "escape"]


@pytest.mark.parametrize("kind", PROBLEMS)
def test_check_reports_each_problem_and_training_refuses(ct_dataset, tmp_path, capsys, kind):
    root = copy_dataset(ct_dataset, tmp_path)
    expected = _break(kind, root)
    assert main(["datasets", "check", str(root)]) == 2
    out = capsys.readouterr().out
    assert expected in out and "problems (" in out
    with pytest.raises(UsemaError, match=re.escape(expected)):
        prepare_data(nnunet_recipe(root), tmp_path / "run")


def test_check_summarises_a_clean_dataset(ct_dataset, capsys):
    assert main(["datasets", "check", str(ct_dataset)]) == 0
    out = capsys.readouterr().out
    assert "training cases: 4 usable of 4" in out and "no problems found" in out
    assert "spacing 0.8" in out and "label values present in labelsTr: [0, 1, 2, 3]" in out


def test_check_collects_every_problem_at_once(ct_dataset, tmp_path):
    root = copy_dataset(ct_dataset, tmp_path)
    _break("missing_label", root)
    _relabel(root / "labelsTr" / "case_002.nii.gz", lambda a, m: (np.where(a == 3, 9, a).astype(np.uint8), m))
    ds, _ = check_dataset(root)
    assert len(ds.problems) == 2


def test_unreadable_and_missing_inputs_are_one_line_errors(ct_dataset, tmp_path):
    root = copy_dataset(ct_dataset, tmp_path)
    (root / "imagesTr" / "case_000_0000.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(UsemaError, match="case_000_0000.nii.gz"):
        prepare_data(nnunet_recipe(root), tmp_path / "run")
    (root / "dataset.json").unlink()
    with pytest.raises(UsemaError, match="dataset.json: missing"):
        prepare_data(nnunet_recipe(root), tmp_path / "run")
    with pytest.raises(UsemaError, match="no such dataset folder"):
        prepare_data(nnunet_recipe(tmp_path / "nowhere"), tmp_path / "run")


def test_nan_image_names_the_file(tmp_path):
    from synthetic_data import make_volume_dataset

    root = make_volume_dataset(tmp_path, n_cases=2, n_test=0)
    path = root / "imagesTr" / "case_001_0000.nii.gz"
    img = nib.load(str(path))
    data = img.get_fdata().astype(np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    with pytest.raises(UsemaError, match="case_001_0000.nii.gz: expected finite"):
        prepare_data(nnunet_recipe(root, val_fraction=0.0), tmp_path / "run")


def test_palette_png_labels_read_as_class_indices(png_dataset, tmp_path):
    from PIL import Image

    root = copy_dataset(png_dataset, tmp_path)
    for path in (root / "labelsTr").glob("*.png"):
        classes = np.asarray(Image.open(path))
        palette = Image.fromarray(classes, mode="P")
        palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)  # class 1 red, class 2 green
        palette.save(path)
    data = prepare_data(nnunet_recipe(root), tmp_path / "run")
    assert set(np.unique(data.val_cases[0]["label"])) == {0, 1, 2}
