"""Training learns: a short demo_nuclei run segments the held-out nuclei (columns 384-511, never trained on) far
better than the same network before training, and far better than any constant prediction could.

Everything runs through the command line (`usema datasets export-demo`, `usema train`, `usema infer`); the Dice
is computed here, independently of usema.evaluation.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

pytestmark = pytest.mark.slow

HELD_OUT = np.s_[:, 384:]  # demo_nuclei trains on columns 0-383 of the 512 x 512 image
# a short budget: 12 iterations of 4 patches of 64 x 64 (the recipe's default is 5 x 30 x 8 of 128 x 128)
SHORT = ["--set", "train.epochs=1", "--set", "train.iterations_per_epoch=12", "--set", "train.batch_size=4",
         "--set", "data.patch_size=[64,64]"]
# the same network (same seed, same initial weights) after one step with a learning rate of 0: untrained
UNTRAINED = ["--set", "train.epochs=1", "--set", "train.iterations_per_epoch=1", "--set", "train.batch_size=1",
             "--set", "data.patch_size=[64,64]", "--set", "train.lr=0", "--set", "train.weight_decay=0"]


def usema(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "USEMA_FAULT"}
    proc = subprocess.run([sys.executable, "-m", "usema", *args], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """2|P ∩ T| / (|P| + |T|) of two boolean masks (the truth is never empty here)."""
    return float(2 * np.logical_and(prediction, truth).sum() / (prediction.sum() + truth.sum()))


def held_out_dice(run: Path, demo: Path, out: Path) -> float:
    usema("infer", str(run), "--input", str(demo / "imagesTs"), "--output", str(out), "--no-progress")
    truth = tifffile.imread(demo / "labelsTs" / "nuclei.tif")[HELD_OUT] > 0
    return dice(tifffile.imread(out / "nuclei.tif")[HELD_OUT] > 0, truth)


def test_a_short_demo_nuclei_run_learns_to_segment_held_out_nuclei(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    usema("datasets", "export-demo", "nuclei", "--output", str(demo))
    truth = tifffile.imread(demo / "labelsTs" / "nuclei.tif")[HELD_OUT] > 0
    assert 0.05 < truth.mean() < 0.5  # guards the bounds below: nuclei are a minority of the held-out pixels
    # no constant map does better than "all foreground"; an untrained network's maps are near-constant
    best_constant = dice(np.ones_like(truth), truth)

    usema("train", "demo_nuclei", *UNTRAINED, "--output", str(tmp_path / "untrained"))
    untrained = held_out_dice(tmp_path / "untrained", demo, tmp_path / "pred_untrained")
    usema("train", "demo_nuclei", *SHORT, "--output", str(tmp_path / "trained"))
    trained = held_out_dice(tmp_path / "trained", demo, tmp_path / "pred_trained")

    assert trained >= 0.75, f"held-out Dice {trained:.3f} after training"
    assert trained >= untrained + 0.3, f"trained {trained:.3f} vs untrained {untrained:.3f}"
    assert trained >= best_constant + 0.3, f"trained {trained:.3f} vs all-foreground {best_constant:.3f}"
