"""`torchrun --nproc_per_node 2 -m usema train`: DistributedDataParallel on 2 CPU processes (gloo)."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


def test_two_cpu_processes_train_with_gloo_and_rank0_writes_once(tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "usema", "train", "demo_nuclei", "--output", str(run_dir), "--device", "cpu",
        "--set", "train.epochs=2", "--set", "train.iterations_per_epoch=2", "--set", "train.batch_size=2",
        "--set", "train.checkpoint_every=1", "--set", "data.patch_size=[64,64]", "--set", "data.num_workers=0",
        "--set", "model.preset=tiny", "--set", "val.roi_size=[128,128]", "--set", "val.overlap=0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # only rank 0 reports: one summary line per epoch, one tensorboard file, no stray checkpoint files
    assert proc.stdout.count("epoch 1/2") == 1 and proc.stdout.count("epoch 2/2") == 1
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]

    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["iteration"]) == (2, 0)
    assert len(ckpt["rng"]["ranks"]) == 2  # each rank's generators, for resuming the same world size
    assert not any(k.startswith("module.") for k in ckpt["model"])  # bare weights, loadable without DDP

    with open(run_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(0.0 <= float(r["mean_dice"]) <= 1.0 for r in rows)
