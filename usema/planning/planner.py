"""nnU-Net's experiment planning, for USEMA: target spacing, patch size, stages, batch size and normalisation
from a dataset fingerprint and a memory budget.

Rules (nnU-Net v2's ExperimentPlanner, adapted where USEMA differs; docs/recipes.md states each):
- target spacing = the median spacing per axis; when the data is strongly anisotropic (largest median spacing
  > 3 × the smallest, and that axis holds < 1/3 of the voxels of the others), that axis gets the 10th percentile
  instead (at least the largest in-plane spacing). A 2D plan slices along the coarsest axis and resamples in-plane
  only.
- the patch starts at the median shape at target spacing (in-plane for 2D), at most a box of 256³ (3D) or 2048²
  (2D) voxels that is isotropic in millimetres, and is shrunk one network stride at a time along the axis with
  the largest patch / median-shape ratio (so the aspect of the median shape is kept; ties: the longest side) until
  a training step with batch 2 fits the budget (``memory``);
- stages: as many as the preset has, fewer when the bottleneck would be under 4 voxels per side; USEMA pools all
  axes together, so every side is a multiple of 2^(stages - 1);
- batch size: as many as fit the budget, at least 2, at most 5% of the dataset's voxels per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from usema.errors import UsemaError
from usema.nets import PRESETS

ANISOTROPY_RATIO = 3.0
MIN_BOTTLENECK = 4
MIN_BATCH = 2
MAX_BATCH_FRACTION = 0.05
GIB = 1024**3
# nnU-Net's initial patch: this many voxels, isotropic in millimetres, before the median shape caps it
INITIAL_PATCH_VOXELS = {2: 2048**2, 3: 256**3}
# channel names (dataset.json channel_names, lower case) that choose a normalisation, as nnU-Net's
CT_NAMES = {"ct"}
RGB_NAMES = {"rgb", "rgb_to_0_1", "r", "g", "b", "red", "green", "blue"}
NO_NORM_NAMES = {"none", "nonorm"}

MemoryEstimate = Callable[[Sequence[int], int, dict[str, Any]], int]
"""(patch_size, batch_size, model overrides) -> estimated peak training bytes."""


@dataclass
class Plan:
    """The planned settings; spacings and shapes in array (voxel index) order, patches in network axes."""

    spatial_dims: int
    data_dims: int
    slice_axis: int | None
    target_spacing: list[float | None]
    anisotropic: bool
    median_shape: list[float]
    patch_size: list[int]
    stages: int
    batch_size: int
    batch_cap: int
    normalization: str
    memory_bytes: int
    budget_bytes: int
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)


def median_target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[np.ndarray, bool]:
    """(target spacing, whether the anisotropy rule changed it) from per-case spacings and shapes (N, ndim)."""
    target = np.median(spacings, axis=0)
    if target.size < 3:
        return target, False
    worst = int(np.argmax(target))
    others = [a for a in range(target.size) if a != worst]
    shape_at_target = np.median(shapes * spacings / target, axis=0)
    aniso_spacing = target[worst] > ANISOTROPY_RATIO * min(target[others])
    aniso_voxels = shape_at_target[worst] * ANISOTROPY_RATIO < min(shape_at_target[others])
    if not (aniso_spacing and aniso_voxels):
        return target, False
    coarse = float(np.percentile(spacings[:, worst], 10))
    finest_allowed = float(max(target[others]))
    target = target.copy()
    target[worst] = coarse if coarse >= finest_allowed else finest_allowed + 1e-5
    return target, True


def normalization_scheme(channel_names: dict[str, str]) -> str:
    """usema's one scheme for all channels, from dataset.json's channel names (nnU-Net's mapping)."""
    names = {str(n).strip().lower() for n in channel_names.values()}
    if names & CT_NAMES:
        return "ct"
    if names <= RGB_NAMES:
        return "rgb"
    if names <= NO_NORM_NAMES:
        return "none"
    return "zscore"


def stages_for(patch: Sequence[int], max_stages: int) -> int:
    """Most stages (≤ ``max_stages``) that leave ≥ MIN_BOTTLENECK voxels per side at the bottleneck."""
    fit = 1 + int(math.floor(math.log2(max(min(patch), 1) / MIN_BOTTLENECK))) if min(patch) >= MIN_BOTTLENECK else 1
    return max(1, min(max_stages, fit))


def stage_overrides(spatial_dims: int, preset: str, stages: int) -> dict[str, Any]:
    """USEMA overrides that keep the first ``stages`` stages of ``preset`` ({} when all are kept)."""
    config = PRESETS[spatial_dims][preset]
    if stages >= len(config.features):
        return {}
    return {"features": list(config.features[:stages]), "encoder_blocks": list(config.encoder_blocks[:stages])}


def _round_up(values: Sequence[float], multiple: int) -> list[int]:
    return [int(math.ceil(v / multiple) * multiple) for v in values]


def plan_experiment(
    fingerprint: dict[str, Any],
    spatial_dims: int,
    budget_gib: float,
    estimate: MemoryEstimate,
    preset: str = "base",
) -> Plan:
    """Plan a ``spatial_dims``-D USEMA recipe for the fingerprinted dataset within ``budget_gib``."""
    spacings = np.array([c["spacing"] for c in fingerprint["cases"]], float)
    shapes = np.array([c["shape"] for c in fingerprint["cases"]], float)
    data_dims = spacings.shape[1]
    if spatial_dims > data_dims:
        raise UsemaError(f"--dims: expected at most the data's {data_dims} dimensions, got {spatial_dims}")
    if not (spacings > 0).all():
        raise UsemaError(f"{fingerprint['dataset']}: expected positive voxel spacings in every case header")
    target, anisotropic = median_target_spacing(spacings, shapes)
    slice_axis = None
    axes = list(range(data_dims))
    if spatial_dims == 2 and data_dims == 3:
        slice_axis = int(np.argmax(target)) if target.max() > target.min() * (1 + 1e-6) else 2
        axes.remove(slice_axis)
        target = np.median(spacings, axis=0)  # in-plane only: the slice axis is never resampled
    median_shape = np.median(shapes * spacings / target, axis=0)[axes]
    initial = np.minimum(median_shape, initial_box(target[axes]))
    budget = int(budget_gib * GIB)
    max_stages = len(PRESETS[spatial_dims][preset].features)
    patch, stages, memory, overrides = _fit_patch(initial, median_shape, spatial_dims, preset, max_stages, budget,
                                                  estimate)
    total_voxels = float(np.prod(shapes * spacings / target, axis=1).sum())
    cap = max(MIN_BATCH, int(MAX_BATCH_FRACTION * total_voxels / np.prod(patch)))
    batch = _fit_batch(patch, overrides, memory, budget, estimate, cap)
    spacing_out: list[float | None] = [float(t) for t in target]
    if slice_axis is not None:
        spacing_out[slice_axis] = None
    return Plan(
        spatial_dims=spatial_dims, data_dims=data_dims, slice_axis=slice_axis, target_spacing=spacing_out,
        anisotropic=anisotropic, median_shape=[float(s) for s in median_shape], patch_size=patch, stages=stages,
        batch_size=batch, batch_cap=cap, normalization=normalization_scheme(fingerprint["channel_names"]),
        memory_bytes=estimate(patch, batch, overrides), budget_bytes=budget, preset=preset, overrides=overrides,
    )  # fmt: skip


def initial_box(spacing: np.ndarray) -> np.ndarray:
    """Sides (voxels) of a box isotropic in millimetres holding INITIAL_PATCH_VOXELS voxels at ``spacing``."""
    per_mm = 1.0 / np.asarray(spacing, float)
    return per_mm * (INITIAL_PATCH_VOXELS[len(per_mm)] / np.prod(per_mm)) ** (1.0 / len(per_mm))


def _fit_patch(
    initial: np.ndarray, median_shape: np.ndarray, spatial_dims: int, preset: str, max_stages: int, budget: int,
    estimate: MemoryEstimate,
) -> tuple[list[int], int, int, dict[str, Any]]:
    """Shrink ``initial`` a stride at a time (largest patch / median ratio first) until batch 2 fits ``budget``."""
    patch = [max(float(s), 1.0) for s in initial]
    while True:
        stages = stages_for(patch, max_stages)
        stride = 2 ** (stages - 1)
        rounded = _round_up(patch, stride)
        overrides = stage_overrides(spatial_dims, preset, stages)
        memory = estimate(rounded, MIN_BATCH, overrides)
        if memory <= budget:
            return rounded, stages, memory, overrides
        ratios = [p / max(m, 1.0) for p, m in zip(patch, median_shape)]
        axis = max(range(len(patch)), key=lambda a: (round(ratios[a], 6), patch[a]))
        if rounded[axis] <= MIN_BOTTLENECK:
            raise UsemaError(f"--gpu-memory: {budget / GIB:.1f} GiB cannot hold a training step of batch {MIN_BATCH} "
                             f"even at patch {rounded}; expected a larger budget or a smaller preset")
        patch[axis] = max(rounded[axis] - stride, MIN_BOTTLENECK)


def _fit_batch(patch: list[int], overrides: dict[str, Any], memory_at_two: int, budget: int,
               estimate: MemoryEstimate, cap: int) -> int:
    """Largest batch that fits ``budget`` (memory grows linearly with the batch), within [2, cap]."""
    per_sample = max(estimate(patch, MIN_BATCH + 1, overrides) - memory_at_two, 1)
    fitting = MIN_BATCH + int((budget - memory_at_two) // per_sample)
    return max(MIN_BATCH, min(fitting, cap))
