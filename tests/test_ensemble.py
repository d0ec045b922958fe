"""`usema infer RUN [RUN ...]`: the mean of the members' softmax probabilities, refused for mismatched members."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from usema.cli import main
from usema.errors import UsemaError
from usema.inference.model_loading import load_model
from usema.inference.pipeline import InferenceOptions, load_models, segment_case
from usema.io.images import read_image

from test_inference import make_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    """(1, 24, 20, 5) raw CT-like intensities: a 2D model segments it in blocks of slices."""
    return np.random.default_rng(3).normal(40.0, 60.0, (1, 24, 20, 5)).astype(np.float32)


def _segment(models, image: np.ndarray, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
    options = InferenceOptions(save_probabilities=True, tta=tta, progress=False)
    return segment_case(models, image.copy(), options, CPU)


@pytest.mark.parametrize("tta", [False, True])
def test_an_ensemble_of_two_copies_is_the_model(tmp_path: Path, volume: np.ndarray, tta: bool):
    one = load_model(make_checkpoint(tmp_path / "a.pt"))
    copy = load_model(make_checkpoint(tmp_path / "b.pt"))
    labels, probs = _segment(one, volume, tta)
    ens_labels, ens_probs = _segment([one, copy], volume, tta)
    np.testing.assert_array_equal(ens_probs, probs)
    np.testing.assert_array_equal(ens_labels, labels)


def test_an_ensemble_averages_the_members_probabilities(tmp_path: Path, volume: np.ndarray):
    members = [load_model(make_checkpoint(tmp_path / f"{s}.pt", seed=s)) for s in (1, 2, 3)]
    singles = [_segment(m, volume)[1] for m in members]
    labels, probs = _segment(members, volume)
    mean = np.mean(singles, axis=0)
    np.testing.assert_allclose(probs, mean, atol=1e-6)
    assert not np.array_equal(singles[0].argmax(0), singles[1].argmax(0))  # the members really differ
    decided = np.abs(np.sort(mean, axis=0)[-1] - np.sort(mean, axis=0)[-2]) > 1e-5  # no near-ties
    np.testing.assert_array_equal(labels[decided], mean.argmax(0)[decided])


def test_usema_infer_with_two_runs_writes_the_ensemble(tmp_path: Path, volume: np.ndarray):
    import nibabel as nib

    image_dir = tmp_path / "in"
    image_dir.mkdir()
    nib.save(nib.Nifti1Image(volume[0], np.eye(4)), str(image_dir / "vol_0000.nii.gz"))
    runs = [make_checkpoint(tmp_path / f"run{s}" / "checkpoints" / "last.pt", seed=s).parents[1] for s in (1, 2)]
    out = tmp_path / "out"
    argv = ["infer", *map(str, runs), "--input", str(image_dir), "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    written, _ = read_image([out / "vol.nii.gz"])
    members = [load_model(r) for r in runs]
    np.testing.assert_array_equal(written[0], _segment(members, volume)[0])


@pytest.mark.parametrize(("kwargs", "what"), [
    ({"out_channels": 4}, "classes"),
    ({"in_channels": 2}, "input channels"),
    ({"normalization": "zscore"}, "normalisation"),
])
def test_mismatched_members_are_refused_naming_both(tmp_path: Path, kwargs: dict, what: str):
    a = make_checkpoint(tmp_path / "a.pt")
    b = make_checkpoint(tmp_path / "b.pt", **kwargs)
    with pytest.raises(UsemaError, match=what) as info:
        load_models([a, b], CPU)
    assert str(a) in str(info.value) and str(b) in str(info.value)


def test_mismatched_ct_statistics_are_refused(tmp_path: Path):
    a = make_checkpoint(tmp_path / "a.pt")
    b = make_checkpoint(tmp_path / "b.pt")
    stored = torch.load(b, weights_only=True)
    stored["norm_stats"] = {**stored["norm_stats"], "mean": stored["norm_stats"]["mean"] + 1.0}
    torch.save(stored, b)
    with pytest.raises(UsemaError, match="normalisation"):
        load_models([a, b], CPU)


def test_the_cli_refusal_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.float32), np.eye(4)), str(tmp_path / "v_0000.nii.gz"))
    a, b = make_checkpoint(tmp_path / "a.pt"), make_checkpoint(tmp_path / "b.pt", out_channels=2)
    out = tmp_path / "out"
    assert main(["infer", str(a), str(b), "--input", str(tmp_path / "v_0000.nii.gz"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be ensembled" in err[0]
    assert not out.exists()


def test_an_ensemble_at_a_target_spacing_averages_there_and_returns_to_the_input_grid(tmp_path: Path):
    from test_infer_resampling import resampling_checkpoint

    image = np.random.default_rng(4).normal(40.0, 60.0, (1, 30, 26, 4)).astype(np.float32)
    spacing = (0.7, 0.9, 3.0)
    members = [load_model(resampling_checkpoint(tmp_path / f"{s}.pt", seed=s)) for s in (1, 2)]
    options = InferenceOptions(save_probabilities=True, progress=False)
    singles = [segment_case(m, image.copy(), options, CPU, spacing=spacing)[1] for m in members]
    labels, probs = segment_case(members, image.copy(), options, CPU, spacing=spacing)
    assert probs.shape == (3, 30, 26, 4) and labels.shape == (30, 26, 4)
    # probabilities are averaged at the target spacing, then resampled: linear, so the mean of the members'
    np.testing.assert_allclose(probs, np.mean(singles, axis=0), atol=1e-5)
    np.testing.assert_array_equal(labels, probs.argmax(0))


def test_members_at_different_target_spacings_are_refused(tmp_path: Path):
    from test_infer_resampling import resampling_checkpoint

    a = resampling_checkpoint(tmp_path / "a.pt")
    b = resampling_checkpoint(tmp_path / "b.pt", target=[1.5, 1.5, None])
    with pytest.raises(UsemaError, match="target_spacing"):
        load_models([a, b], CPU)
