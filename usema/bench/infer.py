"""Inference throughput of the 2D networks through the real `usema infer` pipeline, on a synthetic NIfTI.

Each network gets a random-weight checkpoint in the run format (the cost does not depend on the weights) whose
recipe slices the volume along its last axis with one window per slice, and ``run_inference`` segments the
volume in interleaved rounds. It runs in this process, as the forward timings do: a fresh ``usema infer``
process per run would add the import of torch and MONAI (seconds, the same for every network), which dilutes
the ratios. The wall time still covers loading the checkpoint, reading the NIfTI, normalising, the sliding
windows and writing the label map: what a user of `usema infer` waits for.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import nibabel as nib
import numpy as np
import torch

from usema.bench.settings import IN_CHANNELS, OUT_CHANNELS, parse_net
from usema.bench.timing import interleaved_rounds
from usema.config import Recipe, recipe_from_dict, recipe_to_dict
from usema.inference.pipeline import InferenceOptions, InferenceSummary, run_inference
from usema.io.files import atomic_write
from usema.run.checkpoint import save_checkpoint
from usema.run.spec import build_network_from_spec, spec_for_recipe, spec_to_dict

SLICE_AXIS = 2
# the warm-up volume: one sliding-window batch of slices (the recipe's val.sw_batch_size, 4 by default)
WARMUP_SLICES = 4
# CT-like voxel spacing in mm; nothing is resampled (no target spacing), so it only fills the header
SPACING = (0.8, 0.8, 2.5)


def write_volume(path: Path, shape: Sequence[int], seed: int = 0) -> Path:
    """A reproducible int16 CT-like NIfTI of ``shape`` (the same voxels for every seed-equal call)."""
    data = np.random.default_rng(seed).normal(40, 80, tuple(shape)).astype(np.int16)
    image = nib.Nifti1Image(data, np.diag([*SPACING, 1.0]))
    return atomic_write(path, lambda tmp: nib.save(image, str(tmp)))


def bench_recipe(net: str, patch: Sequence[int]) -> Recipe:
    """The validated recipe of a 2D ``net`` trained on ``patch``-sized slices along the volume's last axis.

    Without deep supervision, as the forward timings build the peers; z-score normalisation needs no dataset
    statistics.
    """
    family, preset = parse_net(net)
    data = {
        "name": f"bench-{net}",
        "data": {"source": "nnunet", "root": "synthetic", "spatial_dims": 2, "slice_axis": SLICE_AXIS,
                 "normalization": "zscore", "patch_size": list(patch)},
        "model": {"name": family, "preset": preset},
        "train": {"deep_supervision": False},
    }  # fmt: skip
    return recipe_from_dict(data, f"bench recipe for {net}")


def write_checkpoint(net: str, patch: Sequence[int], path: Path) -> Path:
    """A random-weight checkpoint of ``net`` that ``usema infer`` loads like a trained one."""
    recipe = bench_recipe(net, patch)
    spec = spec_for_recipe(recipe, IN_CHANNELS, OUT_CHANNELS)
    torch.manual_seed(0)
    network = build_network_from_spec(spec, recipe.data.patch_size, f"bench {net}")
    payload = {
        "model": network.state_dict(),
        "network": spec_to_dict(spec),
        "recipe": recipe_to_dict(recipe),
        "norm_stats": None,
        "labels": {"0": "background", **{str(k): f"class{k}" for k in range(1, OUT_CHANNELS)}},
    }
    return save_checkpoint(payload, path)


def _infer_step(checkpoint: Path, image: Path, output: Path, summaries: list[InferenceSummary]) -> Callable[[], None]:
    options = InferenceOptions(device="cpu", overwrite=True, progress=False)

    def step() -> None:
        summaries.append(run_inference(checkpoint, image, output, options))

    return step


def _rounds(checkpoints: dict[str, Path], image: Path, output: Path, repeats: int) -> dict[str, Any]:
    """Wall seconds and pipeline summaries of ``repeats`` interleaved `usema infer` runs of each network."""
    summaries: dict[str, list[InferenceSummary]] = {net: [] for net in checkpoints}
    steps = {net: _infer_step(ckpt, image, output / net, summaries[net]) for net, ckpt in checkpoints.items()}
    return {"wall": interleaved_rounds(steps, repeats), "summaries": summaries}


def _row(net: str, shape: Sequence[int], wall: list[float], summaries: list[InferenceSummary]) -> dict[str, Any]:
    voxels = summaries[0].voxels
    wall_s = statistics.median(wall)
    return {
        "net": net,
        "shape": list(shape),
        "voxels": voxels,
        "wall_s": wall_s,
        "wall_samples_s": wall,
        "pipeline_s": statistics.median(s.seconds for s in summaries),
        "repeats": len(wall),
        "voxels_per_s": voxels / wall_s,
    }


def bench_inference(
    nets: Sequence[str], shape: Sequence[int], repeats: int, workdir: Path, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """`usema infer` of every net on a synthetic volume of ``shape`` in ``workdir``: one warm-up round on a few
    slices, then ``repeats`` interleaved rounds on the whole volume; one row per net."""
    image = write_volume(workdir / "volume.nii.gz", shape)
    warmup = write_volume(workdir / "warmup.nii.gz", (*shape[:2], min(shape[2], WARMUP_SLICES)))
    log(f"infer {'×'.join(map(str, shape))}: writing {len(nets)} random-weight checkpoints")
    checkpoints = {net: write_checkpoint(net, shape[:2], workdir / f"{net}.pt") for net in nets}
    log(f"infer: warm-up + {repeats} interleaved rounds of usema infer")
    _rounds(checkpoints, warmup, workdir / "out", 1)
    measured = _rounds(checkpoints, image, workdir / "out", repeats)
    return [_row(net, shape, measured["wall"][net], measured["summaries"][net]) for net in nets]
