"""Intensity normalisation (nnU-Net's schemes) and the CT foreground statistics it needs.

Schemes: ``ct`` clips to the training foreground's 0.5/99.5 percentiles, then z-scores with the
foreground mean/std; ``zscore`` z-scores each image per channel; ``rgb`` maps 0..255 to 0..1;
``none`` only casts to float32.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from usema.errors import UsemaError
from usema.io.arrays import all_finite, blocks

SCHEMES = ("ct", "zscore", "rgb", "none")
STD_FLOOR = 1e-8
CT_STATS_KEYS = ("lower", "upper", "mean", "std")
# nnU-Net samples at most 1e7 foreground voxels over the whole training set for its CT statistics
CT_SAMPLE_BUDGET = 10_000_000


def check_finite(array: np.ndarray, name: str) -> None:
    """Raise UsemaError naming ``name`` if ``array`` contains NaN or infinite values."""
    if not all_finite(array):
        bad = sum(int(block.size - np.count_nonzero(np.isfinite(block))) for block in blocks(array))
        raise UsemaError(f"{name}: expected finite intensities, found {bad} NaN/inf voxels")


def mean_std(channel: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation in float64, two passes block by block.

    ``ndarray.std`` would allocate a float64 copy of the whole image (8 bytes a voxel).
    """
    count = channel.size
    mean = sum(float(block.sum(dtype=np.float64)) for block in blocks(channel)) / count
    squares = 0.0
    for block in blocks(channel):
        centred = block.astype(np.float64).reshape(-1) - mean
        squares += float(centred @ centred)
    return mean, (squares / count) ** 0.5


def normalize(image: np.ndarray, scheme: str, stats: dict | None = None, name: str = "image",
              in_place: bool = False) -> np.ndarray:
    """Normalise ``image`` (C, *spatial) with ``scheme``; returns a float32 array of the same shape.

    ``stats`` = {"lower", "upper", "mean", "std"} is required for ``ct``. ``name`` (the case) is used in errors.
    With ``in_place`` a float32 ``image`` is overwritten instead of copied (inference of a large volume).
    """
    if scheme not in SCHEMES:
        raise UsemaError(f"data.normalization: expected one of {', '.join(SCHEMES)}, got {scheme!r}")
    check_finite(image, name)
    out = np.asarray(image, dtype=np.float32)  # a new array unless the image already is float32
    if np.may_share_memory(out, image) and not (in_place and out.flags.writeable):
        out = out.copy()
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, not printed as a warning
        _apply(out, scheme, stats, name)
    if not all_finite(out):
        raise UsemaError(f"{name}: expected intensities whose {scheme} normalisation fits in float32, got an overflow")
    return out


def _apply(out: np.ndarray, scheme: str, stats: dict | None, name: str) -> None:
    """Normalise the float32 ``out`` in place."""
    if scheme == "zscore":
        for channel in out:
            mean, std = mean_std(channel)
            channel -= np.float32(mean)
            channel /= np.float32(max(std, STD_FLOOR))
    elif scheme == "ct":
        if not stats or any(k not in stats for k in CT_STATS_KEYS):
            raise UsemaError(f"{name}: ct normalisation needs stats with keys {', '.join(CT_STATS_KEYS)}")
        np.clip(out, stats["lower"], stats["upper"], out=out)
        out -= np.float32(stats["mean"])
        out /= np.float32(max(stats["std"], STD_FLOOR))
    elif scheme == "rgb":
        out /= np.float32(255.0)


def foreground_sample(image: np.ndarray, label: np.ndarray, budget: int, rng: np.random.Generator,
                      name: str = "image") -> np.ndarray:
    """At most ``budget`` random foreground (label > 0) intensities of channel 0 of ``image`` (C, *spatial)."""
    check_finite(image, name)
    fg = np.asarray(image[0])[np.asarray(label).reshape(image.shape[1:]) > 0]
    if fg.size > budget:  # with replacement, as nnU-Net: cheap on large volumes
        fg = fg[rng.integers(0, fg.size, budget)]
    return fg.astype(np.float64)


def stats_from_samples(samples: Sequence[np.ndarray]) -> dict:
    """{"lower": 0.5 pct, "upper": 99.5 pct, "mean", "std"} of the pooled foreground samples (unclipped, as nnU-Net)."""
    values = np.concatenate(list(samples)) if len(samples) else np.empty(0)
    if values.size == 0:
        raise UsemaError("labelsTr: ct normalisation needs foreground voxels (label > 0) in the training labels")
    lower, upper = np.percentile(values, [0.5, 99.5])
    return {"lower": float(lower), "upper": float(upper), "mean": float(values.mean()), "std": float(values.std())}


def ct_foreground_stats(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    names: Sequence[str] | None = None,
    seed: int = 1234,
) -> dict:
    """nnU-Net CT statistics of the foreground (label > 0) intensities of the first channel.

    images: (C, *spatial) arrays; labels: (*spatial) or (1, *spatial) class maps of the same spatial shape.
    Each case contributes at most ``CT_SAMPLE_BUDGET / len(images)`` randomly sampled foreground voxels.
    Returns {"lower": 0.5 pct, "upper": 99.5 pct, "mean", "std"}.
    """
    names = list(names) if names is not None else [f"case {i}" for i in range(len(images))]
    rng = np.random.default_rng(seed)
    budget = max(1, CT_SAMPLE_BUDGET // max(len(images), 1))
    return stats_from_samples([foreground_sample(im, lb, budget, rng, n) for im, lb, n in zip(images, labels, names)])
