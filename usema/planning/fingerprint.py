"""The dataset fingerprint nnU-Net plans from: per-case shape and spacing, per-channel foreground intensity
statistics (sampled) and class voxel counts. JSON-ready plain data."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from usema.data.nnunet import MAX_CLASSES, load_case, scan_dataset
from usema.data.preprocess import foreground_sample
from usema.errors import UsemaError
from usema.io.files import read_input_text
from usema.io.labels import geometry_spacing

# nnU-Net samples 10,000 foreground voxels per case and channel for its intensity statistics
SAMPLES_PER_CASE = 10_000
FINGERPRINT_VERSION = 1
MAX_FINGERPRINT_BYTES = 256 << 20


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


def read_fingerprint(path: Path) -> dict[str, Any]:
    """A stored fingerprint.json, with what planning reads checked (cases with positive shapes and spacings)."""
    try:
        fingerprint = json.loads(read_input_text(path, MAX_FINGERPRINT_BYTES, what="fingerprint"))
    except ValueError as exc:
        raise UsemaError(f"{path}: expected JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(fingerprint, dict) or not {"dataset", "cases", "channel_names", "labels"} <= fingerprint.keys():
        raise UsemaError(f"{path}: expected the keys dataset, cases, channel_names and labels")
    cases = fingerprint["cases"]
    if not isinstance(cases, list) or not cases:
        raise UsemaError(f"{path}: cases: expected a non-empty list")
    for i, case in enumerate(cases):
        shape, spacing = (case.get("shape"), case.get("spacing")) if isinstance(case, dict) else (None, None)
        valid = isinstance(shape, list) and isinstance(spacing, list) and 2 <= len(shape) == len(spacing) <= 3
        if not valid or not all(isinstance(s, int) and 0 < s < 2**31 for s in shape) or not all(
                isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in spacing):
            raise UsemaError(f"{path}: cases[{i}]: expected a shape of positive integers and a spacing of positive "
                             "numbers, one per axis (2 or 3)")
    labels, channels = fingerprint["labels"], fingerprint["channel_names"]
    if not isinstance(labels, dict) or not all(str(k).isdigit() and int(k) <= MAX_CLASSES for k in labels):
        raise UsemaError(f"{path}: labels: expected a mapping from class values 0..{MAX_CLASSES} to names")
    if not isinstance(channels, dict) or not channels:
        raise UsemaError(f"{path}: channel_names: expected a non-empty mapping from channel index to name")
    if len({len(c["shape"]) for c in cases}) != 1:
        raise UsemaError(f"{path}: cases: expected every case to have the same number of axes")
    return fingerprint
