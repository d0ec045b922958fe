"""Interruptions at deterministic points (``USEMA_FAULT``, see usema/faults.py): Ctrl-C and SIGTERM during
training and inside a checkpoint write, a second signal while the command exits, SIGKILL and Ctrl-C between
two cases of inference and inside a result write, SIGKILL during an export's bundle swap; and the fault points
themselves. SIGKILL + --resume at several points of training is in tests/test_resume.py."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_bundle import make_run
from test_resume import RUN, TIMEOUT_S, train, usema_env

from usema import faults
from usema.bundle import swap
from usema.bundle.export import export_bundle
from usema.run.checkpoint import load_checkpoint

# exit codes of a command stopped by Ctrl-C (SIGINT) or SIGTERM: 130 = 128 + SIGINT, 143 = 128 + SIGTERM
INTERRUPTED = {"sigint": {130}, "term": {130, 143}}


def usema(*args: str, fault: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "usema", *args], capture_output=True, text=True,
                          env=usema_env(fault), timeout=TIMEOUT_S, check=False)


def files_and_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (TorchScript archives differ between exports: only named)."""
    return {p.relative_to(folder).as_posix(): b"" if p.suffix == ".ts" else p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- fault points
def test_a_fault_point_acts_at_its_nth_arrival_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USEMA_FAULT", "unit.nth@2:error, unit.nth@3:interrupt, unit.other@1:kill")
    faults.fault_point("unit.nth")  # 1st arrival: nothing planned
    with pytest.raises(OSError, match="No space left on device"):
        faults.fault_point("unit.nth")
    with pytest.raises(KeyboardInterrupt):
        faults.fault_point("unit.nth")
    faults.fault_point("unit.nth")  # 4th: nothing planned any more
    faults.fault_point("unit.unnamed")
    monkeypatch.delenv("USEMA_FAULT")
    faults.fault_point("unit.other")  # unset: even a point planned to kill does nothing


@pytest.mark.parametrize("spec", ["train.iteration@0", "train.iteration@x", "train.iteration:explode", "@2:kill"])
def test_a_malformed_fault_plan_is_refused_with_the_variable_name(spec: str, monkeypatch) -> None:
    monkeypatch.setenv("USEMA_FAULT", spec)
    with pytest.raises(ValueError, match=f"USEMA_FAULT: expected .*, got {spec!r}"):
        faults.fault_point("train.iteration")


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.slow
@pytest.mark.parametrize("action", ["sigint", "term"])
def test_signal_during_training_leaves_a_resumable_run(action: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = train(run_dir, fault=f"train.iteration@3:{action}")  # last.pt was written after iteration 2
    assert proc.returncode in INTERRUPTED[action], proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["usema: interrupted"]
    checkpoints = run_dir / "checkpoints"
    assert load_checkpoint(checkpoints / "last.pt")["step"] == 2  # complete, loadable with weights_only=True
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt"]


@pytest.mark.slow
def test_ctrl_c_inside_a_checkpoint_write_keeps_the_previous_one_and_no_temporary(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # the 2nd checkpoint write (last.pt after iteration 4): complete in its temporary file, not yet renamed
    proc = train(run_dir, fault="checkpoint.flushed@2:sigint")
    assert proc.returncode == 130, proc.stderr[-2000:]
    checkpoints = run_dir / "checkpoints"
    assert load_checkpoint(checkpoints / "last.pt")["step"] == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt"]  # the interrupted write removed its file


# A second signal while the interrupted command exits: sent from an atexit callback registered after main()
# returns, so that it arrives while the interpreter runs its exit callbacks (DataLoader workers, tensorboard).
SECOND_SIGNAL_AT_EXIT = """
import atexit, os, signal, sys
from usema.cli import main
code = main(sys.argv[1:])
atexit.register(os.kill, os.getpid(), signal.{signal})
raise SystemExit(code)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("first", "second"), [("sigint", "SIGINT"), ("term", "SIGTERM"), ("sigint", "SIGTERM")])
def test_a_second_signal_while_exiting_prints_no_traceback(first: str, second: str, tmp_path: Path) -> None:
    wrapper = SECOND_SIGNAL_AT_EXIT.format(signal=second)
    cmd = [sys.executable, "-c", wrapper, "train", *RUN, "--output", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=usema_env(f"train.iteration@1:{first}"),
                          timeout=TIMEOUT_S, check=False)
    assert proc.returncode in INTERRUPTED[first] | {128 + getattr(signal, second), -getattr(signal, second)}
    assert proc.stderr.strip().splitlines() == ["usema: interrupted"], proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model run directory, folder of 4 CT volumes c0..c3)."""
    root = tmp_path_factory.mktemp("infer")
    (root / "in").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        volume = rng.normal(40, 70, (40, 40, 6)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(root / "in" / f"c{i}.nii.gz"))
    return make_run(root / "run"), root / "in"


def _complete_label_maps(out: Path) -> list[str]:
    """Names of the visible files under ``out``, each checked to be a whole label map of its input's shape."""
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    for name in names:
        assert np.asarray(nib.load(str(out / name)).dataobj).shape == (40, 40, 6), name
    return names


@pytest.mark.slow
@pytest.mark.parametrize("action", ["kill", "sigint"])
def test_inference_stopped_between_cases_leaves_only_complete_label_maps(action, cases, tmp_path) -> None:
    model, inputs = cases
    out = tmp_path / "out"
    proc = usema("infer", str(model), "-i", str(inputs), "-o", str(out), "--no-progress",
                 fault=f"infer.case_done@2:{action}")
    assert proc.returncode == (-signal.SIGKILL if action == "kill" else 130), proc.stderr[-2000:]
    assert _complete_label_maps(out) == ["c0.nii.gz", "c1.nii.gz"]
    assert sorted(p.name for p in out.iterdir()) == ["c0.nii.gz", "c1.nii.gz"]  # no temporary file either


@pytest.mark.slow
def test_inference_killed_inside_a_result_write_leaves_no_partial_result(cases, tmp_path) -> None:
    model, inputs = cases
    out = tmp_path / "out"
    proc = usema("infer", str(model), "-i", str(inputs), "-o", str(out), "--no-progress",
                 fault="result.flushed@3:kill")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _complete_label_maps(out) == ["c0.nii.gz", "c1.nii.gz"]
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert len(hidden) == 1 and hidden[0].startswith(".c2.")  # the killed write, under a temporary name only


# ------------------------------------------------------------------------------------------------- export
@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "kept"), [("bundle.swap:kill", "old"), ("bundle.swapped:kill", "new"), ("bundle.swap:error", "old")]
)
def test_export_stopped_during_the_bundle_swap_leaves_one_complete_bundle(fault: str, kept: str, tmp_path) -> None:
    run = make_run(tmp_path / "run")
    bundle = export_bundle(run, tmp_path / "bundle")
    new = files_and_bytes(bundle)
    (bundle / "docs" / "README.md").write_text("the previous export\n")  # tells the old bundle from the new one
    old = files_and_bytes(bundle)
    proc = usema("export", str(run), "--output", str(bundle), "--overwrite", fault=fault)
    assert proc.returncode == (-signal.SIGKILL if fault.endswith(":kill") else 2), proc.stderr[-2000:]
    assert files_and_bytes(bundle) == {"old": old, "new": new}[kept]
    assert torch.load(bundle / "models" / "model.pt", weights_only=True).keys()
    if fault.endswith(":error"):  # a failed export says so in one line and cleans up after itself
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        assert proc.stderr.startswith(f"usema: error: {bundle}: could not write the bundle")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "run"]


@pytest.mark.slow
def test_without_an_atomic_exchange_the_old_bundle_is_still_replaced(tmp_path, monkeypatch) -> None:
    """Where renameat2(RENAME_EXCHANGE) is missing (macOS, some file systems) the bundle is moved aside instead."""
    run = make_run(tmp_path / "run")
    bundle = export_bundle(run, tmp_path / "bundle")
    new = files_and_bytes(bundle)
    (bundle / "docs" / "README.md").write_text("the previous export\n")
    monkeypatch.setattr(swap, "_exchange", lambda a, b: False)
    export_bundle(run, bundle, overwrite=True)
    assert files_and_bytes(bundle) == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "run"]
