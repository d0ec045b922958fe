"""Tiny synthetic datasets in exactly the nnU-Net raw layouts the recipes read (shared by all test files).

    Dataset701_AbdomenCT/          make_volume_dataset(tmp_path)              3D NIfTI CT, 3 organs
    Dataset702_AbdomenMR/          make_volume_dataset(tmp_path, modality="MR")
      dataset.json                 channel_names, labels {name: int}, numTraining, file_ending
      imagesTr/case_000_0000.nii.gz  (+ _0001 ... with channels > 1)
      labelsTr/case_000.nii.gz
      imagesTs/case_100_0000.nii.gz
    Dataset703_NeurIPSCell/        make_png_dataset(tmp_path)                 RGB PNG, 3 classes
      imagesTr/cell_000_0000.png   one (H, W, 3) RGB file per case; labelsTr/cell_000.png (H, W) uint8

Volumes are (48, 40, 12) voxels by default on a real, non-identity affine (0.8 x 0.8 x 2.5 mm, rotated
10 degrees about z, non-zero origin); every organ is an ellipsoid blob present in every case with its own
intensity, so a few iterations of training already separate them. Everything is seeded: the same call
writes the same bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from PIL import Image

VOLUME_SHAPE = (48, 40, 12)
PNG_SHAPE = (64, 48)
ORGANS = {1: "liver", 2: "spleen", 3: "kidney"}
CELL_LABELS = {0: "background", 1: "interior", 2: "boundary"}
# organ -> (CT Hounsfield units, MR arbitrary units)
ORGAN_INTENSITY = {0: (-100.0, 50.0), 1: (60.0, 400.0), 2: (120.0, 700.0), 3: (250.0, 1000.0)}


def synthetic_affine(spacing: Sequence[float] = (0.8, 0.8, 2.5), angle_deg: float = 10.0,
                     origin: Sequence[float] = (-20.0, 15.0, 30.0)) -> np.ndarray:
    """A 4x4 voxel-to-world affine: rotation about z, anisotropic spacing, non-zero origin."""
    a = math.radians(angle_deg)
    rotation = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def blob_label(shape: Sequence[int], n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Integer map (*shape) uint8 with classes 1..n_classes as non-overlapping-ish ellipsoid blobs."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    for cls in range(1, n_classes + 1):
        # centres spread along axis 0 so that classes rarely overlap; radii ~ 1/6 of each side (>= 1.5 voxels)
        centre = np.array([(cls - 0.5) / n_classes * shape[0]] + [n / 2 for n in shape[1:]])
        centre += rng.uniform(-0.05, 0.05, len(shape)) * np.array(shape)
        radii = np.maximum(np.array(shape) / 6 * rng.uniform(0.8, 1.2, len(shape)), 1.5)
        inside = (((grid - centre) / radii) ** 2).sum(-1) <= 1
        label[inside] = cls
    return label


def volume_intensities(label: np.ndarray, modality: str, rng: np.random.Generator) -> np.ndarray:
    """Float32 image of ``label``'s shape: per-class mean intensity (CT HU or MR units) plus gaussian noise."""
    column = 0 if modality == "CT" else 1
    means = np.array([ORGAN_INTENSITY[min(c, 3)][column] for c in range(int(label.max()) + 1)], np.float32)
    noise = 20.0 if modality == "CT" else 60.0
    return (means[label] + rng.normal(0, noise, label.shape)).astype(np.float32)


def write_dataset_json(root: Path, channels: Sequence[str], labels: dict[int, str], num_training: int,
                       file_ending: str) -> Path:
    """nnU-Net v2 dataset.json: channel_names {"0": name}, labels {name: int}, numTraining, file_ending."""
    meta = {
        "channel_names": {str(i): c for i, c in enumerate(channels)},
        "labels": {name: value for value, name in sorted(labels.items())},
        "numTraining": num_training,
        "file_ending": file_ending,
    }
    path = root / "dataset.json"
    path.write_text(json.dumps(meta, indent=2))
    return path


def make_volume_dataset(
    parent: Path,
    modality: str = "CT",
    n_cases: int = 4,
    n_test: int = 1,
    shape: Sequence[int] = VOLUME_SHAPE,
    n_organs: int = 3,
    channels: int = 1,
    seed: int = 0,
    name: str | None = None,
) -> Path:
    """Write a 3D NIfTI nnU-Net dataset under ``parent``; returns the DatasetXXX_Name folder.

    modality "CT" -> Dataset701_AbdomenCT, "MR" -> Dataset702_AbdomenMR (unless ``name`` is given).
    Images are float32 (channels beyond the first are scaled copies with their own noise), labels uint8;
    image and label share ``synthetic_affine()``. Cases case_000.. are training, case_100.. test.
    """
    name = name or ("Dataset701_AbdomenCT" if modality == "CT" else "Dataset702_AbdomenMR")
    root = Path(parent) / name
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = synthetic_affine()
    cases = [(f"case_{i:03d}", "Tr") for i in range(n_cases)] + [(f"case_{100 + i:03d}", "Ts") for i in range(n_test)]
    for case, split in cases:
        label = blob_label(shape, n_organs, rng)
        for c in range(channels):
            image = volume_intensities(label, modality, rng) * (1.0 + 0.5 * c)
            nib.save(nib.Nifti1Image(image, affine), str(root / f"images{split}" / f"{case}_{c:04d}.nii.gz"))
        if split == "Tr":
            nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"{case}.nii.gz"))
    labels = {0: "background", **{k: v for k, v in ORGANS.items() if k <= n_organs}}
    channel_names = [modality] + [f"{modality}{c}" for c in range(1, channels)]
    write_dataset_json(root, channel_names, labels, n_cases, ".nii.gz")
    return root


def make_png_dataset(
    parent: Path,
    n_cases: int = 4,
    n_test: int = 1,
    shape: Sequence[int] = PNG_SHAPE,
    n_classes: int = 2,
    seed: int = 0,
    name: str = "Dataset703_NeurIPSCell",
) -> Path:
    """Write a 2D RGB PNG nnU-Net dataset (one 3-channel file per case) under ``parent``; returns its folder.

    Default: NeurIPS-cell-like classes 0 background, 1 interior, 2 boundary (``n_classes`` foreground classes;
    use ``n_classes=7, name="Dataset704_Endovis17"`` for an endoscopy-like layout). Labels are uint8 PNGs.
    """
    root = Path(parent) / name
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (n_classes + 1, 3))
    cases = [(f"cell_{i:03d}", "Tr") for i in range(n_cases)] + [(f"cell_{100 + i:03d}", "Ts") for i in range(n_test)]
    for case, split in cases:
        label = blob_label(shape, n_classes, rng)
        rgb = np.clip(palette[label] + rng.normal(0, 10, (*shape, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(rgb, mode="RGB").save(root / f"images{split}" / f"{case}_0000.png")
        if split == "Tr":
            Image.fromarray(label, mode="L").save(root / "labelsTr" / f"{case}.png")
    labels = CELL_LABELS if n_classes == 2 else {0: "background", **{c: f"class{c}" for c in range(1, n_classes + 1)}}
    write_dataset_json(root, ["R", "G", "B"], labels, n_cases, ".png")
    return root


# a USEMA small enough for CPU tests: 3 stages, SEMA on the bottleneck stage only (USEMA keyword overrides)
TINY_USEMA = {
    "features": [8, 16, 32],
    "encoder_blocks": [1, 1, 1],
    "sema_num_stages": 1,
    "sema_depth": [1],
    "head_dim": 8,
    "window_size": 4,
}
# CT normalisation statistics in the checkpoint format (clip range, then z-score)
CT_STATS = {"lower": -100.0, "upper": 200.0, "mean": 40.0, "std": 70.0}
