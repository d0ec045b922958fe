"""The planned recipe as commented YAML: what was planned and why, then plain recipe data."""

from __future__ import annotations

import datetime
from typing import Any

import yaml

import usema
from usema.planning.planner import GIB, Plan

# nnU-Net's training schedule: 1000 epochs of 250 iterations, SGD (momentum 0.99, nesterov) lr 0.01, poly decay
EPOCHS = 1000
ITERATIONS_PER_EPOCH = 250


def recipe_data(plan: Plan, fingerprint: dict[str, Any], root: str, name: str) -> dict[str, Any]:
    """The recipe mapping (what ``usema.config.recipe_from_dict`` validates)."""
    data: dict[str, Any] = {
        "source": "nnunet",
        "root": root,
        "spatial_dims": plan.spatial_dims,
        "normalization": plan.normalization,
        "target_spacing": plan.target_spacing,
        "patch_size": plan.patch_size,
        "augmentation": "nnunet",
        "labels": {int(k): v for k, v in fingerprint["labels"].items()},
    }
    if plan.slice_axis is not None:
        data["slice_axis"] = plan.slice_axis
    model: dict[str, Any] = {"name": "usema", "preset": plan.preset}
    if plan.overrides:
        model["overrides"] = plan.overrides
    return {
        "name": name,
        "data": data,
        "model": model,
        "train": {"epochs": EPOCHS, "iterations_per_epoch": ITERATIONS_PER_EPOCH, "batch_size": plan.batch_size},
    }


def header(plan: Plan, fingerprint: dict[str, Any]) -> str:
    """Comment lines stating the plan's inputs and each decision."""
    cases = fingerprint["cases"]
    dims = f"{plan.spatial_dims}D"
    spacing_rule = "median, out-of-plane axis from the anisotropy rule (10th percentile)" if plan.anisotropic else "median"
    lines = [
        f"Planned by `usema plan` (usema {usema.__version__}) on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} from {fingerprint['dataset']}: "
        f"{len(cases)} training cases; fingerprint.json beside this file holds what was measured.",
        "Rules: docs/recipes.md, section Planning.",
        f"- target spacing (array order, mm; null = not resampled): {_fmt(plan.target_spacing)} ({spacing_rule})",
    ]
    if plan.slice_axis is not None:
        lines.append(f"- {dims}: slices along voxel axis {plan.slice_axis} (the coarsest), resampled in-plane only")
    lines += [
        f"- median shape at target spacing ({dims} axes): {_fmt(plan.median_shape)}",
        f"- patch {plan.patch_size}: the median shape shrunk along its largest axis until a training step fits "
        f"{plan.budget_bytes / GIB:.1f} GiB",
        f"- stages: {plan.stages} (bottleneck {[p // 2 ** (plan.stages - 1) for p in plan.patch_size]} voxels)",
        f"- batch {plan.batch_size}: as many as fit (estimated {plan.memory_bytes / GIB:.2f} GiB per step, float32), "
        f"at least 2, at most {plan.batch_cap} (5% of the dataset's voxels)",
        f"- normalisation: {plan.normalization} (channel names {list(fingerprint['channel_names'].values())})",
        "- augmentation: nnU-Net v2's default set; schedule: nnU-Net's 1000 epochs x 250 iterations",
    ]
    return "".join(f"# {line}\n" for line in lines)


def _fmt(values: list) -> str:
    return "[" + ", ".join("null" if v is None else f"{v:.4g}" for v in values) + "]"


def recipe_text(plan: Plan, fingerprint: dict[str, Any], root: str, name: str) -> str:
    return header(plan, fingerprint) + yaml.safe_dump(recipe_data(plan, fingerprint, root, name), sort_keys=False)
