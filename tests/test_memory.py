"""Load (issue 5): `usema infer` over a directory of 50 volumes in one process keeps memory flat."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_inference import ct_volume, make_checkpoint, save_nifti

from usema.cli import main
from usema.inference import pipeline

CASES = 50
SHAPE = (64, 64, 8)
# After warm-up (allocator pools, lazily imported modules, first-call caches) the resident size only wanders by
# allocator noise (< 1 MiB measured). Keeping one case's 3-class float32 logits (0.4 MiB) per case from case 10
# to 50 would already add 16 MiB.
MAX_GROWTH_MB = 10.0


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident set size (``VmRSS``) or its peak (``VmHWM``) in MiB, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_memory_stays_flat_over_a_directory_of_cases(tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt = make_checkpoint(tmp_path / "model.pt")
    for i in range(CASES):
        save_nifti(tmp_path / "in" / f"case{i:02d}.nii.gz", ct_volume(SHAPE, seed=i), np.eye(4))
    after_case: list[float] = []
    real_infer_case = pipeline.infer_case

    def measured(*args, **kwargs) -> int:  # the real per-case pipeline, plus a reading after each case
        voxels = real_infer_case(*args, **kwargs)
        after_case.append(rss_mb())
        return voxels

    monkeypatch.setattr(pipeline, "infer_case", measured)
    argv = ["infer", str(ckpt), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-progress",
            "--overlap", "0", "--sw-batch-size", "8"]
    assert main(argv) == 0
    assert len(after_case) == CASES and len(list((tmp_path / "out").iterdir())) == CASES
    growth = after_case[-1] - after_case[9]
    with capsys.disabled():
        print(f"\nusema infer, {CASES} cases of {SHAPE}: RSS after case 10 {after_case[9]:.1f} MiB, after case "
              f"{CASES} {after_case[-1]:.1f} MiB (growth {growth:+.1f} MiB), peak {rss_mb('VmHWM'):.1f} MiB")
    assert growth < MAX_GROWTH_MB
