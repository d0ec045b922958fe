"""`usema cv`: post-processing chosen on validation predictions, the cv directory as an ensemble, and a killed
cross-validation that resumes without retraining finished folds."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from usema.cli import main
from usema.crossval.postprocessing import choose, class_dice
from usema.errors import UsemaError
from usema.inference.ensemble import CV_POSTPROCESSING, fold_dir
from usema.inference.postprocessing import Postprocessing, postprocess, read_decision, write_decision
from usema.io.images import read_image

from synthetic_data import TINY_USEMA, make_png_dataset
from test_inference import make_checkpoint
from test_resume import usema_env

SHAPE = (40, 40)


def _disc(centre: tuple[int, int], radius: float, value: int, out: np.ndarray) -> None:
    rows, cols = np.ogrid[: out.shape[0], : out.shape[1]]
    out[(rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2] = value


def _one_object_per_class(rng: np.random.Generator) -> np.ndarray:
    truth = np.zeros(SHAPE, np.uint8)
    _disc((10 + rng.integers(-2, 3), 12), 6, 1, truth)
    _disc((28 + rng.integers(-2, 3), 26), 5, 2, truth)
    return truth


def _islands(pred: np.ndarray, value: int, rng: np.random.Generator) -> np.ndarray:
    """``pred`` with three 2x2 spurious islands of ``value`` on background."""
    pred = pred.copy()
    for _ in range(3):
        while True:
            r, c = rng.integers(0, SHAPE[0] - 2, 2)
            if not pred[max(r - 1, 0):r + 3, max(c - 1, 0):c + 3].any():
                pred[r:r + 2, c:c + 2] = value
                break
    return pred


def _pairs(pairs: list[tuple[np.ndarray, np.ndarray]]):
    return lambda: iter(pairs)


def test_spurious_islands_choose_largest_component_for_all_foreground():
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(4):
        truth = _one_object_per_class(rng)
        pairs.append((_islands(_islands(truth, 1, rng), 2, rng), truth))
    decision = choose(_pairs(pairs), [1, 2])
    # the two classes are separate discs: the largest component of all foreground would delete class 2
    assert decision.all_foreground is False
    assert decision.per_class == [1, 2]
    assert decision.scores["mean_dice_after"] > decision.scores["mean_dice_before"]


def test_islands_of_one_object_choose_the_all_foreground_step():
    rng = np.random.default_rng(1)
    pairs = []
    for _ in range(4):
        truth = np.zeros(SHAPE, np.uint8)
        _disc((20, 20), 9, 1, truth)
        truth[20:, :] = np.where(truth[20:, :] == 1, 2, 0)  # one object, two classes touching
        pairs.append((_islands(truth, 1, rng), truth))
    decision = choose(_pairs(pairs), [1, 2])
    assert decision.all_foreground is True
    after = [class_dice(postprocess(p, decision, [1, 2]), t, [1, 2]) for p, t in pairs]
    before = [class_dice(p, t, [1, 2]) for p, t in pairs]
    assert np.nanmean(after) > np.nanmean(before)


def test_largest_component_is_not_chosen_where_it_would_remove_true_objects():
    rng = np.random.default_rng(2)
    pairs = []
    for _ in range(4):
        truth = np.zeros(SHAPE, np.uint8)
        for centre in ((8, 8), (8, 30), (30, 10), (30, 30)):  # many nuclei: class 1 has several components
            _disc(centre, 4 + rng.integers(0, 2), 1, truth)
        _disc((20, 20), 3, 2, truth)
        pred = ndimage.binary_dilation(truth == 1).astype(np.uint8)  # slightly too large, all objects found
        pred[truth == 2] = 2
        pairs.append((pred, truth))
    decision = choose(_pairs(pairs), [1, 2])
    assert decision.all_foreground is False and 1 not in decision.per_class
    assert decision.scores["mean_dice_after"] == pytest.approx(decision.scores["mean_dice_before"])


def test_a_decision_round_trips_and_a_malformed_one_is_refused(tmp_path: Path):
    path = tmp_path / CV_POSTPROCESSING
    write_decision(path, Postprocessing(True, [2], {"mean_dice_before": 0.5}))
    assert read_decision(path) == Postprocessing(True, [2], {"mean_dice_before": 0.5})
    path.write_text(json.dumps({"all_foreground": "yes", "per_class": []}))
    with pytest.raises(UsemaError, match="all_foreground"):
        read_decision(path)


def _fake_cv_dir(root: Path, decision: Postprocessing, foreground_shift: float = 0.0) -> Path:
    """Two random-weight folds; ``foreground_shift`` lowers the class-1 logit (a random net paints most of an
    image foreground in one piece: lowered, the foreground breaks into islands)."""
    cv = root / "cv"
    for k in range(2):
        path = make_checkpoint(fold_dir(cv, k) / "checkpoints" / "last.pt", out_channels=2, seed=k)
        ckpt = torch.load(path, weights_only=True)
        ckpt["model"]["heads.0.bias"][1] -= foreground_shift
        torch.save(ckpt, path)
    write_decision(cv / CV_POSTPROCESSING, decision)
    return cv


def test_infer_on_a_cv_directory_is_the_fold_ensemble_post_processed(tmp_path: Path):
    import nibabel as nib

    volume = np.random.default_rng(0).normal(40, 60, (24, 24, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "v_0000.nii.gz"))
    cv = _fake_cv_dir(tmp_path, Postprocessing(all_foreground=True), foreground_shift=1.5)
    folds = [str(fold_dir(cv, k)) for k in range(2)]
    common = ["--input", str(tmp_path / "v_0000.nii.gz"), "--no-progress"]
    assert main(["infer", str(cv), "--output", str(tmp_path / "cv_out"), *common]) == 0
    assert main(["infer", *folds, "--output", str(tmp_path / "raw_out"), *common]) == 0
    (ens,), _ = read_image([tmp_path / "cv_out" / "v.nii.gz"])
    (raw,), _ = read_image([tmp_path / "raw_out" / "v.nii.gz"])
    assert ndimage.label(raw > 0, np.ones((3, 3, 3)))[1] > 1  # the raw ensemble has islands to remove
    np.testing.assert_array_equal(ens, postprocess(raw.astype(np.uint8), Postprocessing(True), [1]))
    assert ndimage.label(ens > 0, np.ones((3, 3, 3)))[1] == 1


# --------------------------------------------------------------------------------------- usema cv end to end
def _cv_recipe(tmp_path: Path, root: Path) -> Path:
    recipe = {
        "name": "cv_test",
        "data": {"source": "nnunet", "root": str(root), "spatial_dims": 2, "normalization": "rgb",
                 "patch_size": [32, 32], "num_workers": 0, "labels": {0: "background", 1: "interior", 2: "boundary"}},
        "model": {"name": "usema", "preset": "tiny", "overrides": TINY_USEMA},
        "train": {"epochs": 1, "iterations_per_epoch": 2, "batch_size": 2, "seed": 0},
        "val": {"interval": 1, "overlap": 0.0, "sw_batch_size": 4},
        "evaluation": {"protocol": "generic"},
    }
    path = tmp_path / "cv.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def _cv(recipe: Path, out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "usema", "cv", str(recipe), "--output", str(out), "--device", "cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, env=usema_env(fault), timeout=600, check=False)


@pytest.mark.slow
def test_a_killed_cv_resumes_without_retraining_finished_folds(tmp_path: Path):
    root = make_png_dataset(tmp_path, n_cases=5, shape=(48, 40))
    recipe, out = _cv_recipe(tmp_path, root), tmp_path / "cv"
    # 2 iterations a fold: the 5th iteration is fold 2's first; the kill leaves folds 0, 1 finished
    proc = _cv(recipe, out, fault="train.iteration@5:kill")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    finished = {k: fold_dir(out, k) / "checkpoints" / "last.pt" for k in (0, 1)}
    stamps = {k: p.stat().st_mtime_ns for k, p in finished.items()}
    weights = {k: torch.load(p, weights_only=True)["model"] for k, p in finished.items()}
    assert not (out / CV_POSTPROCESSING).exists()

    proc = _cv(recipe, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for k, path in finished.items():  # finished folds were not retrained: same file, same weights
        assert path.stat().st_mtime_ns == stamps[k]
        resumed = torch.load(path, weights_only=True)["model"]
        assert all(torch.equal(resumed[n], weights[k][n]) for n in weights[k])
    for k in range(5):
        assert torch.load(fold_dir(out, k) / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    predictions = sorted(p.name for p in (out / "cv_predictions").iterdir())
    assert predictions == [f"cell_{i:03d}.png" for i in range(5)]  # every training case, once
    summary = json.loads((out / "cv_evaluation.json").read_text())
    assert summary["cases"] == 5 and set(summary["folds"]) == {str(k) for k in range(5)}
    assert (out / "cv_evaluation.csv").is_file()
    read_decision(out / CV_POSTPROCESSING)
    for name in predictions:  # each validation prediction is on its case's grid
        (pred,), _ = read_image([out / "cv_predictions" / name])
        assert pred.shape == np.asarray(Image.open(root / "labelsTr" / name)).shape
    # the cv directory is an ensemble for usema infer
    assert main(["infer", str(out), "--input", str(root / "imagesTs"), "--output", str(tmp_path / "ens"),
                 "--no-progress"]) == 0
    assert (tmp_path / "ens" / "cell_100.png").is_file()


def test_cv_refuses_a_demo_recipe_a_fixed_fold_and_an_impossible_precision(tmp_path: Path, png_dataset: Path,
                                                   capsys: pytest.CaptureFixture):
    assert main(["cv", "demo_nuclei", "--output", str(tmp_path / "cv")]) == 2
    assert "data.source: usema cv needs an nnunet dataset" in capsys.readouterr().err
    recipe = _cv_recipe(tmp_path, png_dataset)
    assert main(["cv", str(recipe), "--output", str(tmp_path / "cv"), "--set", "train.fold=1"]) == 2
    assert "train.fold: expected null" in capsys.readouterr().err
    assert not (tmp_path / "cv").exists()
    assert main(["cv", str(recipe), "--output", str(tmp_path / "cv"), "--set", "train.precision=fp16"]) == 2
    assert capsys.readouterr().err == "usema: error: train.precision fp16 needs a CUDA device; use bf16 on CPU\n"
    assert not (tmp_path / "cv").exists()
