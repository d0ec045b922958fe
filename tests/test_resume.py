"""Exact resume: a training run SIGKILLed at deterministic points (``USEMA_FAULT``, see usema/faults.py) and
resumed with --resume ends with weights bit-identical (CPU) to the same run never interrupted; a kill inside a
checkpoint write leaves the previous last.pt loadable."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

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
TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def usema_env(fault: str | None = None) -> dict[str, str]:
    """The environment of a usema subprocess: one OpenMP thread (tiny work on a shared CPU), ``USEMA_FAULT``."""
    env = {k: v for k, v in os.environ.items() if k != "USEMA_FAULT"}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["USEMA_FAULT"] = fault
    return env


def train(run_dir: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """``usema train RUN --output run_dir`` in a subprocess, stopped at the fault point ``fault`` if given."""
    cmd = [sys.executable, "-m", "usema", "train", *RUN, "--output", str(run_dir), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=usema_env(fault), timeout=TIMEOUT_S, check=False)


def killed(run_dir: Path, fault: str, *extra: str) -> None:
    proc = train(run_dir, *extra, fault=fault)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {fault}: {proc.returncode} {proc.stderr[-2000:]}"


def checkpoint(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def metrics_without_timing(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The expectation: the same run, never interrupted."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = train(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_killed_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    last = checkpoints / "last.pt"

    # 0. after iteration 1, before any checkpoint: the run exists (recipe.yaml) but --resume starts it afresh
    killed(run_dir, "train.iteration@1")
    assert (run_dir / "recipe.yaml").is_file() and not last.exists()

    # 1. just after the first checkpoint (mid-epoch, iteration 2)
    killed(run_dir, "train.iteration@2", "--resume")
    assert (checkpoint(last)["epoch"], checkpoint(last)["iteration"]) == (0, 2)

    # 2. between checkpoints: steps 3-5 run, step 5 is lost with the process
    killed(run_dir, "train.iteration@3", "--resume")
    assert checkpoint(last)["step"] == 4

    # 3. inside the end-of-epoch write of last.pt (best.pt is written just before it): the new last.pt is
    #    complete in its temporary file, not yet renamed
    killed(run_dir, "checkpoint.flushed@2", "--resume")
    assert checkpoint(last)["step"] == 4  # the previous one, intact and loadable
    assert checkpoint(checkpoints / "best.pt")["step"] == 6
    leftovers = sorted(p.name for p in checkpoints.iterdir() if p.name not in ("best.pt", "last.pt"))
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.") and leftovers[0].endswith(".tmp.pt")

    # 4. to the end
    proc = train(run_dir, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = checkpoint(reference / "checkpoints" / "last.pt"), checkpoint(last)
    assert got["step"] == expected["step"] == 12
    assert expected["model"].keys() == got["model"].keys()
    differing = [k for k in expected["model"] if not torch.equal(expected["model"][k], got["model"][k])]
    assert differing == [], "resumed weights differ from the uninterrupted run"
    assert metrics_without_timing(run_dir) == metrics_without_timing(reference)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "last.pt"]  # the temporary file is gone


# ``usema train`` as usema <= 0.3.2 ran it: the 2D tiny preset with its former widths
FORMER_TINY_TRAIN = """
import dataclasses, sys
import usema.nets.usema as nets
from usema.run.spec import FORMER_PRESET_FEATURES
from usema.cli import main
nets.PRESETS[2]["tiny"] = dataclasses.replace(nets.PRESETS[2]["tiny"], features=FORMER_PRESET_FEATURES[(2, "tiny")])
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_of_the_former_tiny_preset_resumes_with_its_widths(tmp_path: Path) -> None:
    """A run started before the 2D tiny preset changed widths resumes after the upgrade: the network is rebuilt with
    the widths its checkpoint has, not refused as 'weights do not match'."""
    from usema.run.spec import FORMER_PRESET_FEATURES  # noqa: PLC0415

    former = FORMER_PRESET_FEATURES[(2, "tiny")]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-c", FORMER_TINY_TRAIN, "train", *RUN, "--output", str(run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=usema_env("train.iteration@2"),
                          timeout=TIMEOUT_S, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    stored = checkpoint(run_dir / "checkpoints" / "last.pt")
    assert "features" not in stored["network"]["overrides"]
    assert stored["model"]["encoder.5.0.conv1.weight"].shape[0] == former[-1]

    proc = train(run_dir, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = checkpoint(run_dir / "checkpoints" / "last.pt")
    assert final["step"] == 12
    assert final["network"]["overrides"]["features"] == list(former)
    assert final["model"]["encoder.5.0.conv1.weight"].shape[0] == former[-1]
