"""The bad-input corpus (issue 5): every case runs the real CLI in-process and must be refused with exit
status 2, ONE stderr line ``usema: error: <file or key>: <what was expected>``, no traceback, no partial or
overwritten output, and any previous checkpoint intact. docs/reliability.md lists the corpus.

Inputs that look odd but are valid (an all-zero image, an empty label volume) must work instead.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from test_inference import ct_volume, make_checkpoint, save_nifti

from usema.cli import main
from usema.training.command import RUN_OUTPUTS

Files = dict[str, bytes]


# ------------------------------------------------------------------------------------------- helpers
def refused(argv: list[str], capsys: pytest.CaptureFixture, *fragments: str) -> str:
    """Run ``usema ARGV``; assert the one-line refusal contains every fragment; returns the line."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("usema: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def files(folder: Path) -> Files:
    """Every file under ``folder`` (hidden temporaries included) with its bytes; {} when it does not exist."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_run_left(run_dir: Path) -> bool:
    """True when a refused `usema train` left nothing that would block (or pose as) a run."""
    return not any((run_dir / name).exists() for name in RUN_OUTPUTS)


def infer_args(model: Path, source: Path, out: Path, *extra: str) -> list[str]:
    return ["infer", str(model), "--input", str(source), "--output", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random 2D USEMA (1 channel in, 3 classes, CT normalisation) in checkpoint format."""
    return make_checkpoint(tmp_path_factory.mktemp("model") / "checkpoints" / "last.pt")


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    return save_nifti(tmp_path / "in" / "good.nii.gz", ct_volume((32, 32, 2)), np.eye(4))


# ------------------------------------------------------------------ 1. images `usema infer` cannot use
def _truncated(path: Path) -> None:
    data = save_nifti(path, ct_volume((32, 32, 2)), np.eye(4)).read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_an_image(path: Path) -> None:
    path.write_text("PatientID,Age\n001,54\n")  # a CSV export saved under a NIfTI name


def _nifti(shape: tuple[int, ...]) -> Callable[[Path], None]:
    """Writer of an all-zero float NIfTI of ``shape`` (any number of axes)."""
    return lambda path: nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(path))


def _with_voxel(value: float) -> Callable[[Path], None]:
    """Writer of a CT-like volume with one voxel set to ``value``."""
    def write(path: Path) -> None:
        data = ct_volume((32, 32, 2)).astype(np.float32)
        data[3, 4, 1] = value
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))

    return write


BAD_IMAGES = {
    "truncated-nii-gz": (_truncated, "expected a readable .nii.gz image"),
    "text-file-named-nii-gz": (_not_an_image, "expected a readable .nii.gz image"),
    "4d-volume": (_nifti((8, 8, 3, 2)), "expected a 2D or 3D image, got spatial shape (8, 8, 3, 2)"),
    "1d-volume": (_nifti((10,)), "expected a 2D or 3D image, got spatial shape (10,)"),
    "zero-sized-dimension": (_nifti((8, 0, 3)), "expected a non-empty image"),
    "nan-intensity": (_with_voxel(np.nan), "expected finite intensities, found NaN or inf"),
    "inf-intensity": (_with_voxel(-np.inf), "expected finite intensities, found NaN or inf"),
}


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_infer_refuses_unusable_images(kind: str, ckpt: Path, tmp_path: Path, capsys) -> None:
    write, expected = BAD_IMAGES[kind]
    source = tmp_path / "in" / "case.nii.gz"
    source.parent.mkdir()
    write(source)
    refused(infer_args(ckpt, source, tmp_path / "out"), capsys, str(source), expected)
    assert files(tmp_path / "out") == {}


def test_infer_refuses_a_missing_input(ckpt: Path, tmp_path: Path, capsys) -> None:
    refused(infer_args(ckpt, tmp_path / "nope.nii.gz", tmp_path / "out"), capsys,
            str(tmp_path / "nope.nii.gz"), "no such file or directory")
    (tmp_path / "empty").mkdir()
    refused(infer_args(ckpt, tmp_path / "empty", tmp_path / "out"), capsys, str(tmp_path / "empty"),
            "expected image files")
    assert not (tmp_path / "out").exists()


def test_infer_refuses_a_missing_model(volume: Path, tmp_path: Path, capsys) -> None:
    refused(infer_args(tmp_path / "runs" / "nope", volume, tmp_path / "out"), capsys,
            str(tmp_path / "runs" / "nope"), "no such run directory, checkpoint or bundle")


def test_infer_refuses_the_wrong_number_of_channels(ckpt: Path, tmp_path: Path, capsys) -> None:
    for channel in (0, 1):  # a 2-channel nnU-Net case for a 1-channel model
        save_nifti(tmp_path / "in" / f"case_{channel:04d}.nii.gz", ct_volume((32, 32, 2)), np.eye(4))
    refused(infer_args(ckpt, tmp_path / "in", tmp_path / "out"), capsys, "case_0000.nii.gz",
            "expected 1 channel(s) for this model, got 2")
    assert files(tmp_path / "out") == {}


def test_infer_refuses_channels_on_different_grids(ckpt: Path, tmp_path: Path, capsys) -> None:
    save_nifti(tmp_path / "in" / "case_0000.nii.gz", ct_volume((32, 32, 2)), np.eye(4))
    save_nifti(tmp_path / "in" / "case_0001.nii.gz", ct_volume((32, 30, 2)), np.eye(4))
    two_channel = make_checkpoint(tmp_path / "two.pt", in_channels=2)
    refused(infer_args(two_channel, tmp_path / "in", tmp_path / "out"), capsys, "case_0001.nii.gz",
            "expected the spatial shape (32, 32, 2)")


# ------------------------------------------------------------------- 2. datasets `usema train` refuses
def write_recipe(path: Path, root: Path | None = None, **sections: dict) -> Path:
    """A tiny 2D nnU-Net recipe (``sections`` are merged in; a value None deletes that key)."""
    recipe = {
        "name": "tiny",
        "data": {"source": "nnunet", "root": str(root), "spatial_dims": 2, "slice_axis": 2,
                 "normalization": "ct", "patch_size": [64, 64], "num_workers": 0},
        "model": {"preset": "tiny"},
        "train": {"epochs": 1, "iterations_per_epoch": 1, "batch_size": 2},
    }
    for section, values in sections.items():
        if values is None:
            recipe.pop(section)
            continue
        for key, value in values.items():
            if value is None:
                recipe[section].pop(key)
            else:
                recipe.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def _label_shape(root: Path) -> Path:
    path = root / "labelsTr" / "case_001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((48, 40, 11), np.uint8), nib.load(str(path)).affine), str(path))
    return path


def _label_affine(root: Path) -> Path:
    path = root / "labelsTr" / "case_001.nii.gz"
    img = nib.load(str(path))
    shifted = img.affine.copy()
    shifted[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), str(path))
    return path


def _label_values(root: Path) -> Path:
    path = root / "labelsTr" / "case_001.nii.gz"
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 7  # dataset.json declares classes 0..3
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    return path


def _missing_label(root: Path) -> Path:
    path = root / "labelsTr" / "case_002.nii.gz"
    path.unlink()
    return path


def _edit_json(root: Path, **changes: object) -> Path:
    path = root / "dataset.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    path.write_text(json.dumps(meta))
    return path


def _nan_image(root: Path) -> Path:
    path = root / "imagesTr" / "case_003_0000.nii.gz"
    img = nib.load(str(path))
    data = img.get_fdata(dtype=np.float32)
    data[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    return path


BAD_DATASETS = {
    "label-shape-differs": (_label_shape, "expected the image's shape (48, 40, 12), got (48, 40, 11)"),
    "label-affine-differs": (_label_affine, "expected the same affine"),
    "label-values-outside-classes": (_label_values, "label values [7] are not among the classes [0, 1, 2, 3]"),
    "label-file-missing": (_missing_label, "missing label for training image case_002_0000.nii.gz"),
    "json-numTraining-disagrees": (lambda r: _edit_json(r, numTraining=9), "numTraining is 9 but the dataset holds 4"),
    "json-file_ending-disagrees": (
        lambda r: _edit_json(r, file_ending=".nrrd").parent / "imagesTr",
        "expected cases named CASE_0000.nrrd (dataset.json file_ending), found none",
    ),
    "json-lacks-labels": (lambda r: _edit_json(r, labels=None), "missing key(s) labels"),
    "json-lists-missing-file": (
        lambda r: _edit_json(r, dataset={"case_000": {"images": ["imagesTr/gone_0000.nii.gz"],
                                                      "label": "labelsTr/case_000.nii.gz"}}).parent
        / "imagesTr" / "gone_0000.nii.gz",
        "missing file listed for case case_000 in dataset.json",
    ),
    "nan-in-training-image": (_nan_image, "expected finite intensities"),
}


@pytest.mark.parametrize("kind", list(BAD_DATASETS))
def test_train_refuses_inconsistent_datasets(kind: str, ct_dataset: Path, tmp_path: Path, capsys) -> None:
    damage, expected = BAD_DATASETS[kind]
    root = shutil.copytree(ct_dataset, tmp_path / ct_dataset.name)
    culprit = damage(root)
    run_dir = tmp_path / "run"
    refused(["train", str(write_recipe(tmp_path / "r.yaml", root)), "--output", str(run_dir)], capsys,
            str(culprit), expected)
    assert no_run_left(run_dir)  # nothing blocks the rerun once the data are fixed


def test_train_refuses_a_missing_dataset_folder(tmp_path: Path, capsys) -> None:
    refused(["train", str(write_recipe(tmp_path / "r.yaml", tmp_path / "Dataset999_Gone"))], capsys,
            str(tmp_path / "Dataset999_Gone"), "no such dataset folder")


# ------------------------------------------------------------------------------ 3. recipes with mistakes
BAD_RECIPES = {
    "unknown-key": ({"data": {"flavour": "x"}}, "data.flavour: unknown key"),
    "misspelt-key": ({"train": {"epoch": 2}}, "train.epoch: unknown key; did you mean 'train.epochs'?"),
    "wrong-type": ({"train": {"epochs": "ten"}}, "train.epochs: expected integer, got 'ten'"),
    "missing-required-key": ({"data": {"source": None}}, "data.source: required key is missing"),
    "bad-choice": ({"model": {"preset": "huge"}}, "model.preset: expected one of 'tiny', 'small', 'base'"),
}


@pytest.mark.parametrize("kind", list(BAD_RECIPES))
def test_train_refuses_recipe_mistakes(kind: str, tmp_path: Path, capsys) -> None:
    sections, expected = BAD_RECIPES[kind]
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path, **sections)
    refused(["train", str(recipe), "--output", str(tmp_path / "run")], capsys, str(recipe), expected)
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_mistyped_set_override(tmp_path: Path, capsys) -> None:
    refused(["train", "demo_nuclei", "--set", "train.lr=fast", "--output", str(tmp_path / "run")], capsys,
            "--set train.lr=fast", "train.lr: expected number, got 'fast'")


def test_train_refuses_a_missing_recipe_file(tmp_path: Path, capsys) -> None:
    refused(["train", str(tmp_path / "recipe.yaml")], capsys, str(tmp_path / "recipe.yaml"), "no such recipe file")


def test_train_refuses_a_patch_too_small_for_the_network(ct_dataset: Path, tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", ct_dataset, data={"patch_size": [32, 32]})
    refused(["train", str(recipe), "--output", str(tmp_path / "run")], capsys,
            "data.patch_size: expected every side >= 64", "got [32, 32]")
    assert no_run_left(tmp_path / "run")


# --------------------------------------------------------------------------------------- 4. checkpoints
def _other_preset(ckpt: dict) -> None:
    ckpt["network"].update(preset="small", overrides={})


def _other_architecture(ckpt: dict) -> None:
    ckpt["network"].update(name="basicunet", overrides={})


@pytest.mark.parametrize(
    ("change", "expected"),
    [(_other_preset, "weights do not match the network usema (preset small)"),
     (_other_architecture, "weights do not match the network basicunet")],
    ids=["other-preset", "other-architecture"],
)
def test_infer_refuses_checkpoints_of_another_network(change, expected, ckpt, volume, tmp_path, capsys) -> None:
    foreign = torch.load(ckpt, weights_only=True)
    change(foreign)
    torch.save(foreign, tmp_path / "foreign.pt")
    refused(infer_args(tmp_path / "foreign.pt", volume, tmp_path / "out"), capsys, "foreign.pt", expected)
    assert files(tmp_path / "out") == {}


def _zip_of_text(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a model")


NOT_CHECKPOINTS = {
    "random-bytes": (lambda p, _: p.write_bytes(os.urandom(256)), "expected a usema checkpoint"),
    "foreign-zip": (lambda p, _: _zip_of_text(p), "expected a readable usema checkpoint"),
    "truncated": (lambda p, c: p.write_bytes(c.read_bytes()[:4096]), "expected a"),
    "plain-state-dict": (lambda p, _: torch.save({"w": torch.ones(2)}, p), "expected a usema checkpoint dict"),
}


@pytest.mark.parametrize("kind", list(NOT_CHECKPOINTS))
def test_infer_refuses_files_that_are_not_checkpoints(kind, ckpt, volume, tmp_path, capsys) -> None:
    write, expected = NOT_CHECKPOINTS[kind]
    path = tmp_path / "model.pt"
    write(path, ckpt)
    refused(infer_args(path, volume, tmp_path / "out"), capsys, str(path), expected)


def test_resume_from_a_corrupt_checkpoint_is_refused_and_keeps_it(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text("name: demo_nuclei\n")
    last.write_bytes(b"PK\x03\x04 half a checkpoint")
    refused(["train", "demo_nuclei", "--output", str(run_dir), "--resume"], capsys, str(last),
            "expected a usema checkpoint (a torch.save file)")
    assert last.read_bytes() == b"PK\x03\x04 half a checkpoint"  # evidence is kept for the user


# ---------------------------------------------------------------------------------- 5. output folders
def _existing_infer(ckpt: Path, volume: Path, out: Path) -> tuple[list[str], str]:
    assert main(infer_args(ckpt, volume, out)) == 0
    return infer_args(ckpt, volume, out), "good.nii.gz: already exists; refusing to overwrite the prediction (pass --overwrite to replace it)"


def _existing_evaluate(ckpt: Path, volume: Path, out: Path) -> tuple[list[str], str]:
    assert main(infer_args(ckpt, volume, out)) == 0
    argv = ["evaluate", "--pred", str(out), "--truth", str(out), "--labels", "1=a", "2=b", "--output", str(out / "e.json")]
    assert main(argv) == 0
    return argv, "e.json: already exists; refusing to overwrite the evaluation result (pass --overwrite to replace it)"


def _existing_bundle(ckpt: Path, volume: Path, out: Path) -> tuple[list[str], str]:
    (out / "configs").mkdir(parents=True)
    (out / "configs" / "metadata.json").write_text("{}")
    return ["export", str(ckpt), "--output", str(out)], "exists and is not empty; refusing to overwrite"


def _existing_run(ckpt: Path, volume: Path, out: Path) -> tuple[list[str], str]:
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, out / "checkpoints" / "last.pt")
    return ["train", "demo_nuclei", "--output", str(out)], "already holds a training run; pass --resume"


@pytest.mark.parametrize("make", [_existing_infer, _existing_evaluate, _existing_bundle, _existing_run],
                         ids=["infer", "evaluate", "export", "train"])
def test_existing_results_are_refused_and_kept(make, ckpt, volume, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv, expected = make(ckpt, volume, out)
    capsys.readouterr()
    before = files(out)
    refused(argv, capsys, str(out), expected)
    assert files(out) == before


def test_infer_overwrite_replaces_results(ckpt: Path, volume: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(infer_args(ckpt, volume, out)) == 0
    (out / "good.nii.gz").write_bytes(b"stale")
    assert main(infer_args(ckpt, volume, out, "--overwrite")) == 0
    assert nib.load(str(out / "good.nii.gz")).shape == (32, 32, 2)


def _commands(ckpt: Path, volume: Path, out: Path) -> dict[str, list[str]]:
    return {
        "infer": infer_args(ckpt, volume, out),
        "train": ["train", "demo_nuclei", "--output", str(out)],
        "evaluate": ["evaluate", "--pred", str(volume.parent), "--truth", str(volume.parent),
                     "--output", str(out / "e.json")],
        "export": ["export", str(ckpt), "--output", str(out / "bundle")],
    }


@pytest.mark.parametrize("command", ["infer", "train", "evaluate", "export"])
def test_output_below_a_regular_file_is_refused(command, ckpt, volume, tmp_path, capsys) -> None:
    blocker = tmp_path / "results.txt"  # root may write anywhere: a file in the path blocks even root
    blocker.write_text("not a folder")
    refused(_commands(ckpt, volume, blocker / "out")[command], capsys, str(blocker))
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("command", ["infer", "train", "evaluate", "export"])
def test_read_only_output_folder_is_refused(command, ckpt, volume, tmp_path, capsys) -> None:
    """An immutable folder (``chattr +i``) refuses every write, root's included, as a read-only mount would."""
    out = tmp_path / "locked"
    out.mkdir()
    subprocess.run(["chattr", "+i", str(out)], check=True)
    try:
        with pytest.raises(PermissionError):  # guards the test: the folder really is read-only for this user
            (out / "probe").touch()
        target = {"evaluate": out / "e.json", "export": out / "bundle"}.get(command, out)
        argv = _commands(ckpt, volume, out)[command]
        argv[argv.index("--output") + 1] = str(target)
        refused(argv, capsys, str(out), "not writable")
        assert list(out.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)


def test_disk_full_while_writing_a_result_keeps_the_previous_one(ckpt, volume, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(infer_args(ckpt, volume, out)) == 0
    before = files(out)

    def disk_full(img: object, path: str) -> None:
        Path(path).write_bytes(b"\x1f\x8b half")  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib, "save", disk_full)
    refused(infer_args(ckpt, volume, out, "--overwrite"), capsys, str(out / "good.nii.gz"), "No space left on device")
    assert files(out) == before  # same file, same bytes, no temporary left


def test_disk_full_while_exporting_keeps_the_previous_bundle(ckpt, tmp_path, capsys, monkeypatch):
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "models" / "model.pt").write_bytes(b"previous bundle")
    (bundle / "configs").mkdir()  # the marker files that make it recognisably a previous bundle
    for name in ("metadata.json", "usema.json"):
        (bundle / "configs" / name).write_text("{}")
    before = files(bundle)

    def disk_full(obj: object, f: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    refused(["export", str(ckpt), "--output", str(bundle), "--overwrite"], capsys, str(bundle), "No space left")
    assert files(bundle) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # the half-built bundle is gone


# -------------------------------------------------------------------- 6. odd but valid: these must work
@pytest.mark.filterwarnings("error::RuntimeWarning")  # a division by zero in normalisation would warn
@pytest.mark.parametrize("normalization", ["ct", "zscore"])
@pytest.mark.parametrize("value", [0, 300], ids=["all-zero", "constant"])
def test_constant_image_is_segmented(normalization, value, tmp_path, capsys) -> None:
    """A blank or constant image is a valid input: it must be segmented with finite probabilities."""
    model = make_checkpoint(tmp_path / f"{normalization}.pt", normalization=normalization)
    source = save_nifti(tmp_path / "in" / "flat.nii.gz", np.full((32, 32, 2), value, np.int16), np.eye(4))
    assert main(infer_args(model, source, tmp_path / "out", "--save-probabilities")) == 0
    labels = np.asarray(nib.load(str(tmp_path / "out" / "flat.nii.gz")).dataobj)
    probs = nib.load(str(tmp_path / "out" / "flat_prob.nii.gz")).get_fdata()
    assert labels.shape == (32, 32, 2) and set(np.unique(labels)) <= {0, 1, 2}
    assert np.isfinite(probs).all() and np.allclose(probs.sum(-1), 1.0, atol=1e-4)


def test_empty_label_volume_is_valid_for_evaluation(tmp_path: Path, capsys) -> None:
    """Challenge rules: empty truth + empty prediction = 1; a prediction on empty truth = 0."""
    empty = np.zeros((16, 16, 4), np.uint8)
    blob = empty.copy()
    blob[4:8, 4:8, 1:3] = 1
    for folder, case, data in [("truth", "a", empty), ("truth", "b", empty), ("pred", "a", empty), ("pred", "b", blob)]:
        save_nifti(tmp_path / folder / f"{case}.nii.gz", data, np.eye(4))
    out = tmp_path / "e.json"
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
                 "--labels", "1=lesion", "--output", str(out)]) == 0
    rows = {r.split(",")[0]: r for r in out.with_suffix(".csv").read_text().splitlines()[1:]}
    header = out.with_suffix(".csv").read_text().splitlines()[0].split(",")
    dsc = {case: float(row.split(",")[header.index("dsc")]) for case, row in rows.items()}
    assert dsc == {"a": 1.0, "b": 0.0}


# ------------------------------------------------------------------------------ 7. how errors are shown
def test_debug_shows_the_traceback(ckpt: Path, tmp_path: Path, capsys) -> None:
    assert main(["--debug", *infer_args(ckpt, tmp_path / "nope.nii.gz", tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("usema: error: ")


@pytest.mark.slow  # a fresh interpreter importing torch: ~10 s on a busy 2-core machine
def test_the_installed_command_prints_one_line(ckpt: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "usema", *infer_args(ckpt, tmp_path / "x.nii.gz", tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"usema: error: {tmp_path / 'x.nii.gz'}: no such file or directory"]
