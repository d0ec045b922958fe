"""Exact resume: a training run SIGKILLed at several points and resumed with --resume ends with weights
bit-identical (CPU) to an uninterrupted run; a kill during a checkpoint write never corrupts last.pt."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

# 2 epochs x 6 iterations, last.pt every 2 iterations; DropPath and a DataLoader worker make every RNG matter
RUN = [
    "demo_nuclei",
    "--set", "train.epochs=2", "--set", "train.iterations_per_epoch=6", "--set", "train.batch_size=2",
    "--set", "train.checkpoint_every=2", "--set", "data.patch_size=[64,64]", "--set", "data.num_workers=1",
    "--set", "model.preset=tiny", "--set", "model.overrides.drop_path=0.2",
    "--set", "val.roi_size=[128,128]", "--set", "val.overlap=0",
]
TIMEOUT_S = 240

pytestmark = pytest.mark.slow


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "usema", "train", *RUN, "--output", str(run_dir), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err


def _kill_when(proc: subprocess.Popen, condition: Callable[[], bool], poll_s: float = 0.002) -> None:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; fails if the run ends first."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"training ended before the kill point: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("kill point not reached in time")
        time.sleep(poll_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def _metrics_without_timing(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run, never interrupted."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    _finish(_start(run_dir))
    return run_dir


def test_killed_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(reference, tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"

    # 0. before the first checkpoint: the run exists (recipe.yaml) but --resume has to start it afresh
    _kill_when(_start(run_dir), lambda: (run_dir / "recipe.yaml").exists())
    assert not last.exists()

    # 1. just after the first checkpoint (mid-epoch, iteration 2)
    _kill_when(_start(run_dir, "--resume"), lambda: last.exists())
    first = torch.load(last, weights_only=True)
    assert (first["epoch"], first["iteration"]) == (0, 2)

    # 2. mid-epoch, between checkpoints: one checkpoint later, plus a little training
    proc = _start(run_dir, "--resume")
    before = _inode(last)
    _kill_when(proc, lambda: _inode(last) not in (before, None))
    resumed_to = torch.load(last, weights_only=True)["step"]
    assert resumed_to > first["step"]

    # 3. while a checkpoint is being written: the half-written temporary file exists
    proc = _start(run_dir, "--resume")
    _kill_when(proc, lambda: any(last.parent.glob(".last.*.tmp.pt")), poll_s=0.0005)
    assert torch.load(last, weights_only=True)["step"] >= resumed_to  # last.pt is intact, never partial

    # 4. to the end
    _finish(_start(run_dir, "--resume"))
    expected, got = _weights(reference), _weights(run_dir)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed weights differ from the uninterrupted run"
    assert _metrics_without_timing(run_dir) == _metrics_without_timing(reference)
    assert not list(last.parent.glob(".*.tmp.pt"))  # the killed write's temporary file was cleaned up

