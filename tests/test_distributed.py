"""`torchrun --nproc_per_node 2 -m usema train`: DistributedDataParallel on 2 CPU processes (gloo)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TRAIN = [
    "-m", "usema", "train", "demo_nuclei", "--device", "cpu",
    "--set", "train.epochs=2", "--set", "train.iterations_per_epoch=3", "--set", "train.batch_size=2",
    "--set", "train.checkpoint_every=1", "--set", "data.patch_size=[64,64]", "--set", "data.num_workers=0",
    "--set", "model.preset=tiny", "--set", "val.roi_size=[128,128]", "--set", "val.overlap=0",
]
TIMEOUT_S = 300


def _torchrun(run_dir: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """torchrun of TRAIN into ``run_dir``; with ``fault``, every rank stops itself there (``USEMA_FAULT``)."""
    env = {k: v for k, v in os.environ.items() if k != "USEMA_FAULT"}
    if fault:
        env["USEMA_FAULT"] = fault
    proc = subprocess.run([*TORCHRUN, *TRAIN, "--output", str(run_dir), *extra], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=env)
    if fault is None:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    return run_dir, _torchrun(run_dir).stdout


def test_two_cpu_processes_train_with_gloo_and_rank0_writes_once(uninterrupted):
    run_dir, stdout = uninterrupted
    # only rank 0 reports: one summary line per epoch, one tensorboard file, no stray checkpoint files
    assert stdout.count("epoch 1/2") == 1 and stdout.count("epoch 2/2") == 1
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


def test_killed_ddp_run_resumes_to_the_same_weights(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    # both ranks SIGKILL themselves after their 4th iteration (mid-epoch 2, just checkpointed)
    killed = _torchrun(run_dir, fault="train.iteration@4:kill")
    assert killed.returncode != 0 and "epoch 2/2" not in killed.stdout  # stopped mid-run, not at its end
    assert torch.load(last, weights_only=True)["step"] == 4

    _torchrun(run_dir, "--resume")
    expected = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)["model"]
    got = torch.load(last, weights_only=True)["model"]
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert _metrics_without_seconds(run_dir) == _metrics_without_seconds(reference)


def _metrics_without_seconds(run_dir: Path) -> list[list[str]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return [row[:-1] for row in csv.reader(fh)]
