"""The dataset fingerprint nnU-Net plans from: per-case shape and spacing, per-channel foreground intensity
statistics (sampled) and class voxel counts. JSON-ready plain data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from usema.data.nnunet import load_case, scan_dataset
from usema.data.preprocess import foreground_sample
from usema.errors import UsemaError
from usema.io.labels import geometry_spacing

# nnU-Net samples 10,000 foreground voxels per case and channel for its intensity statistics
SAMPLES_PER_CASE = 10_000
FINGERPRINT_VERSION = 1


def channel_statistics(samples: np.ndarray) -> dict[str, float]:
    """nnU-Net's per-channel foreground statistics of pooled samples."""
    if samples.size == 0:
        return {k: float("nan") for k in ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5")}
    low, median, high = np.percentile(samples, [0.5, 50.0, 99.5])
    return {
        "mean": float(samples.mean()), "std": float(samples.std()), "median": float(median),
        "min": float(samples.min()), "max": float(samples.max()),
        "percentile_00_5": float(low), "percentile_99_5": float(high),
    }  # fmt: skip


def fingerprint_dataset(root: str | Path, seed: int = 1234) -> dict[str, Any]:
    """Decode every training case of an nnU-Net raw dataset once and summarise it.

    Returns {"version", "dataset", "channel_names", "labels", "file_ending", "cases": [{"name", "shape",
    "spacing"}], "intensity": {channel: stats}, "class_voxels": {label: count}}; shapes and spacings are in array
    (voxel index) order. A dataset with problems (``usema datasets check``) is refused.
    """
    ds = scan_dataset(root)
    if ds.problems:
        raise UsemaError(f"{ds.root}: {ds.problems[0]} (run `usema datasets check {ds.root}` for every problem)")
    if not ds.train:
        raise UsemaError(f"{ds.root / 'labelsTr'}: expected labelled training cases to plan from, found none")
    rng = np.random.default_rng(seed)
    cases, class_voxels = [], np.zeros(max(ds.labels) + 1, np.int64)
    samples: dict[int, list[np.ndarray]] = {c: [] for c in range(len(ds.channel_names))}
    for case in ds.train:
        loaded = load_case(ds, case)
        spacing = geometry_spacing(loaded.geometry)
        cases.append({"name": case.name, "shape": [int(s) for s in loaded.label.shape],
                      "spacing": [float(s) for s in spacing]})
        class_voxels += np.bincount(loaded.label.reshape(-1), minlength=class_voxels.size)[: class_voxels.size]
        for channel in samples:
            samples[channel].append(
                foreground_sample(loaded.image[channel:channel + 1], loaded.label, SAMPLES_PER_CASE, rng,
                                  str(case.images[channel]))
            )
    return {
        "version": FINGERPRINT_VERSION,
        "dataset": ds.root.name,
        "channel_names": {str(k): v for k, v in ds.channel_names.items()},
        "labels": {str(k): v for k, v in ds.labels.items()},
        "file_ending": ds.file_ending,
        "cases": cases,
        "intensity": {str(c): channel_statistics(np.concatenate(s)) for c, s in samples.items()},
        "class_voxels": {str(k): int(class_voxels[k]) for k in ds.labels},
    }
