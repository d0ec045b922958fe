"""Inference throughput of the 2D networks through the real `usema infer` pipeline, on a synthetic NIfTI.

Each network gets a random-weight checkpoint in the run format (the cost does not depend on the weights) whose
recipe slices the volume along its last axis with one window per slice, and ``run_inference`` segments the
volume in interleaved rounds. Every run gets a fresh process, as a user's `usema infer` does: run one after
another in one process, each network inherited the heap the previous ones left, and the ratios moved with the
order (BasicUNet took 19.0 s after six other networks and 22-23 s in a process of its own, usema-tiny 11.4 s and
10.6 s). The child is forked from a server that has imported torch and MONAI, so the import (seconds, the same
for every network) stays out of the figure; the wall time covers loading the checkpoint, reading the NIfTI,
normalising, the sliding windows (the first ones pay oneDNN's kernel creation, as a user's do) and writing the
label map: what a user of `usema infer` waits for after start-up.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import nibabel as nib
import numpy as np
import torch

from usema.allocator import retain_freed_memory
from usema.bench.processes import fresh_processes, proc_status_mib
from usema.bench.settings import IN_CHANNELS, OUT_CHANNELS, parse_net
from usema.config import Recipe, recipe_from_dict, recipe_to_dict
from usema.inference.pipeline import InferenceOptions, run_inference
from usema.io.files import atomic_write
from usema.run.checkpoint import save_checkpoint
from usema.run.spec import build_network_from_spec, spec_for_recipe, spec_to_dict

SLICE_AXIS = 2
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


def infer_in_this_process(checkpoint: str, image: str, output: str, threads: int) -> dict[str, float | int]:
    """One `usema infer` run as the command line sets it up (allocator settings, ``threads`` torch threads), meant
    for a fresh child: wall seconds of the call, the seconds and voxels it reports, and the process's peak
    resident memory (MiB) and its pid."""
    retain_freed_memory()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    summary = run_inference(checkpoint, image, output, InferenceOptions(device="cpu", overwrite=True, progress=False))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "pipeline_s": summary.seconds, "voxels": summary.voxels,
            "peak_rss_mib": proc_status_mib("VmHWM")["VmHWM"], "pid": os.getpid()}  # fmt: skip


def _rounds(checkpoints: dict[str, Path], image: Path, output: Path, repeats: int, threads: int) -> dict[str, list]:
    """The runs of ``repeats`` interleaved rounds of every network's `usema infer`, each run in a fresh process."""
    runs: dict[str, list[dict[str, float | int]]] = {net: [] for net in checkpoints}
    with fresh_processes(["usema.bench.infer"]) as pool:
        for _ in range(repeats):
            for net, ckpt in checkpoints.items():
                runs[net].append(pool.apply(infer_in_this_process, (str(ckpt), str(image), str(output / net), threads)))
    return runs


def _row(net: str, shape: Sequence[int], runs: list[dict[str, float | int]]) -> dict[str, Any]:
    wall = [float(r["wall_s"]) for r in runs]
    wall_s = statistics.median(wall)
    return {
        "net": net,
        "shape": list(shape),
        "voxels": runs[0]["voxels"],
        "wall_s": wall_s,
        "wall_samples_s": wall,
        "pipeline_s": statistics.median(float(r["pipeline_s"]) for r in runs),
        "peak_rss_mib": statistics.median(float(r["peak_rss_mib"]) for r in runs),
        "pids": [r["pid"] for r in runs],
        "repeats": len(wall),
        "voxels_per_s": runs[0]["voxels"] / wall_s,
    }


def bench_inference(
    nets: Sequence[str], shape: Sequence[int], repeats: int, workdir: Path, log: Callable[[str], None],
    threads: int,
) -> list[dict[str, Any]]:
    """`usema infer` of every net on a synthetic volume of ``shape`` in ``workdir``, ``repeats`` interleaved rounds,
    each run in a fresh process with ``threads`` torch threads; one row per net."""
    image = write_volume(workdir / "volume.nii.gz", shape)
    log(f"infer {'×'.join(map(str, shape))}: writing {len(nets)} random-weight checkpoints")
    checkpoints = {net: write_checkpoint(net, shape[:2], workdir / f"{net}.pt") for net in nets}
    log(f"infer: {repeats} interleaved round(s) of usema infer, a fresh process per run")
    runs = _rounds(checkpoints, image, workdir / "out", repeats, threads)
    return [_row(net, shape, runs[net]) for net in nets]
