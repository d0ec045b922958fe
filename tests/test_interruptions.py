"""Interruptions not covered elsewhere (issue 5). SIGKILL at four points of training + --resume is in
tests/test_resume.py; SIGKILL / Ctrl-C during `usema infer` is in tests/test_inference.py. Here: Ctrl-C during
training, and SIGKILL during `usema export`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from test_bundle import make_run
from test_resume import RUN, TIMEOUT_S

from usema.run.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny work on a shared CPU: threads would only wait
    return subprocess.Popen([sys.executable, "-m", "usema", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)


def _signal_when(proc: subprocess.Popen, condition: Callable[[], bool], sig: signal.Signals) -> str:
    """Send ``sig`` as soon as ``condition()`` holds; returns the process's stderr once it has ended."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert proc.poll() is None, f"ended before the signal point: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "signal point not reached in time"
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return err


def test_ctrl_c_during_training_leaves_a_resumable_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    proc = _start("train", *RUN, "--output", str(run_dir))
    err = _signal_when(proc, last.exists, signal.SIGINT)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "usema: interrupted" and "Traceback" not in err
    assert load_checkpoint(last)["step"] >= 2  # complete, loadable with weights_only=True
    assert not list(last.parent.glob(".*.tmp*"))  # the Ctrl-C'd write (if any) cleaned up after itself


def test_killed_export_keeps_the_previous_bundle(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "models" / "model.pt").write_bytes(b"previous bundle")
    proc = _start("export", str(run), "--output", str(bundle), "--overwrite")
    building = lambda: any(p.name.startswith(".bundle.tmp-") for p in tmp_path.iterdir())  # noqa: E731
    _signal_when(proc, building, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*")) == ["models", "models/model.pt"]
    assert (bundle / "models" / "model.pt").read_bytes() == b"previous bundle"
    # the next export replaces it completely
    assert subprocess.run([sys.executable, "-m", "usema", "export", str(run), "--output", str(bundle), "--overwrite"],
                          capture_output=True, timeout=TIMEOUT_S, check=False).returncode == 0
    assert torch.load(bundle / "models" / "model.pt", weights_only=True).keys()
