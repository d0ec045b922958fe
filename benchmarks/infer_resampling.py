"""Time and peak memory of `usema infer` with resampling on a large CT-like volume.

    python benchmarks/infer_resampling.py --shape 512 512 300 --workdir /tmp/usema_infer_bench

Writes a CT-like NIfTI (spacing 0.7 × 0.7 × 2.5 mm, oblique affine) and a checkpoint of the 2D USEMA `tiny`
preset (random weights: the cost does not depend on them) trained "at" 0.8 × 0.8 mm in-plane, then runs
`usema infer` in a fresh process and reports its wall time and peak resident memory (ru_maxrss of the child), next
to the same run without resampling. State the machine's load (`uptime`) with the numbers: they are wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from usema.nets import build_network


def volume(path: Path, shape: tuple[int, ...]) -> Path:
    rng = np.random.default_rng(0)
    data = (rng.normal(40, 80, shape)).astype(np.int16)
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    affine[:3, 3] = [-180.0, -180.0, -400.0]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def checkpoint(path: Path, target: list | None) -> Path:
    torch.manual_seed(0)
    net = build_network("usema", 2, 1, 14, preset="tiny", deep_supervision=True)
    recipe = {
        "name": "bench",
        "data": {"source": "nnunet", "root": "Dataset701_AbdomenCT", "spatial_dims": 2, "slice_axis": 2,
                 "normalization": "ct", "target_spacing": target, "patch_size": [256, 256]},
        "val": {"overlap": 0.5, "sw_batch_size": 4},
    }
    torch.save({"model": net.state_dict(), "recipe": recipe, "labels": {str(i): f"c{i}" for i in range(14)},
                "norm_stats": {"lower": -100.0, "upper": 300.0, "mean": 80.0, "std": 70.0},
                "network": {"name": "usema", "spatial_dims": 2, "in_channels": 1, "out_channels": 14,
                            "preset": "tiny", "overrides": {}}}, path)
    return path


def run(ckpt: Path, image: Path, out: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "usema", "infer", str(ckpt), "--input", str(image), "--output",
                           str(out), "--overwrite", "--no-progress"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 / 1024  # GiB, max over children so far
    return {"wall_s": round(wall, 1), "children_peak_rss_gib": round(peak, 2), "stdout": proc.stdout.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/usema_infer_bench"))
    args = parser.parse_args()
    image = volume(args.workdir / "in" / "ct_0000.nii.gz", tuple(args.shape))
    load = os.getloadavg()
    # with resampling first: ru_maxrss of children is a running maximum, so the larger run must come first
    resampled = run(checkpoint(args.workdir / "resampled.pt", [0.8, 0.8, None]), image, args.workdir / "out_r")
    native = run(checkpoint(args.workdir / "native.pt", None), image, args.workdir / "out_n")
    print(json.dumps({"shape": args.shape, "load_before": load, "with_resampling": resampled,
                      "without_resampling (peak is the max of both runs)": native}, indent=1))


if __name__ == "__main__":
    main()
