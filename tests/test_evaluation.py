"""Evaluation metrics on hand-computed cases and `usema evaluate` end to end on tiny folders."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from usema.cli import main
from usema.errors import UsemaError
from usema.evaluation import metrics
from usema.evaluation.evaluate import evaluate_folders, resolve_tolerances

SQRT_HALF = math.sqrt(0.5)


def square(shape: tuple[int, ...], start: int, stop: int, shift: int = 0) -> np.ndarray:
    """Boolean mask with the box [start, stop) on every axis, moved by ``shift`` voxels along axis 0."""
    mask = np.zeros(shape, dtype=bool)
    box = (slice(start + shift, stop + shift),) + (slice(start, stop),) * (len(shape) - 1)
    mask[box] = True
    return mask


# --- DSC and the challenge's empty rules ----------------------------------------------------------


def test_dice_of_known_overlap():
    truth = np.zeros(20, dtype=bool)
    pred = np.zeros(20, dtype=bool)
    truth[0:10] = True
    pred[4:14] = True  # 6 shared voxels: 2 * 6 / (10 + 10)
    assert metrics.dice_score(pred, truth) == pytest.approx(0.6)
    assert metrics.dice_score(truth, truth) == 1.0


@pytest.mark.parametrize(
    ("pred_on", "truth_on", "expected"),
    [(False, False, 1.0), (True, False, 0.0), (False, True, 0.0)],
    ids=["both-empty", "prediction-on-empty-truth", "empty-prediction"],
)
def test_empty_rules(pred_on: bool, truth_on: bool, expected: float):
    full = square((12, 12), 3, 8)
    empty = np.zeros_like(full)
    pred, truth = (full if pred_on else empty), (full if truth_on else empty)
    assert metrics.dice_score(pred, truth) == expected
    assert metrics.surface_dice(pred, truth, (1.0, 1.0), 2.0) == expected
    assert math.isnan(metrics.hausdorff95(pred, truth, (1.0, 1.0)))


# --- NSD: sub-voxel boundaries (marching squares / cubes), tolerance in mm ------------------------
# A 10-voxel square shifted by 2 voxels along axis 0. Its sub-voxel contour: 4 straight runs of 9 unit
# elements plus 4 corner diagonals of sqrt(0.5) (perimeter 36 + 4 sqrt(0.5)). Both contours lie on the
# same half-voxel grid, so below 1 voxel of tolerance only coinciding elements count: on each of the 2
# side runs, 8 straight elements and the trailing corner of each contour.


def test_nsd_2d_shifted_square_below_and_above_the_shift():
    truth, pred = square((20, 20), 5, 15), square((20, 20), 5, 15, shift=2)
    expected_below = 2 * (8 + SQRT_HALF) / (36 + 4 * SQRT_HALF)
    assert metrics.surface_dice(pred, truth, (1.0, 1.0), 0.5) == pytest.approx(expected_below, abs=1e-6)
    assert metrics.surface_dice(pred, truth, (1.0, 1.0), 1.9) < 1.0
    assert metrics.surface_dice(pred, truth, (1.0, 1.0), 2.0) == pytest.approx(1.0)


def test_nsd_3d_shifted_cube_below_and_above_the_shift():
    # marching-cubes surface of a 10-voxel cube: 6 faces of 9x9 unit squares, 12 edges of 9 strips of
    # area sqrt(0.5), 8 corner triangles of sqrt(3)/8. Coinciding after a 2-voxel shift: 8 of 9 rows on
    # the 4 side faces (288), the 4 side edges (8 strips each), the 4 trailing face edges (9 strips each)
    # and the 4 trailing corners.
    truth, pred = square((20, 20, 20), 5, 15), square((20, 20, 20), 5, 15, shift=2)
    corner = math.sqrt(3) / 8
    expected_below = (288 + 68 * SQRT_HALF + 4 * corner) / (486 + 108 * SQRT_HALF + 8 * corner)
    assert metrics.surface_dice(pred, truth, (1.0, 1.0, 1.0), 0.5) == pytest.approx(expected_below, abs=1e-5)
    assert metrics.surface_dice(pred, truth, (1.0, 1.0, 1.0), 2.0) == pytest.approx(1.0)


def test_nsd_follows_anisotropic_spacing_per_axis():
    truth, pred = square((20, 20), 5, 15), square((20, 20), 5, 15, shift=2)
    # 2 voxels along axis 0 at 1.5 mm = 3 mm: out of a 2 mm tolerance, within 3 mm
    assert metrics.surface_dice(pred, truth, (1.5, 1.0), 2.0) < 0.9
    assert metrics.surface_dice(pred, truth, (1.5, 1.0), 3.0) == pytest.approx(1.0)
    # coarse spacing on the other axis leaves the shift at 2 mm
    assert metrics.surface_dice(pred, truth, (1.0, 5.0), 2.0) == pytest.approx(1.0)
    # spacing (2, 1): runs along axis 0 weigh 2 mm per element, corner diagonals sqrt(5)/2
    diag = math.sqrt(5) / 2
    expected = 2 * (8 * 2 + diag) / (2 * 9 * 2 + 2 * 9 * 1 + 4 * diag)
    assert metrics.surface_dice(pred, truth, (2.0, 1.0), 0.5) == pytest.approx(expected, abs=1e-6)


def test_hd95_of_a_known_shift_in_mm():
    truth, pred = square((20, 20), 5, 15), square((20, 20), 5, 15, shift=2)
    assert metrics.hausdorff95(pred, truth, (1.0, 1.0)) == pytest.approx(2.0)
    assert metrics.hausdorff95(pred, truth, (1.5, 1.0)) == pytest.approx(3.0)
    assert metrics.hausdorff95(pred, truth, (1.0, 5.0)) == pytest.approx(2.0)
    assert metrics.hausdorff95(truth, truth, (1.0, 1.0)) == 0.0


def test_surface_metrics_unchanged_by_objects_on_the_image_border():
    # cropping to the union box must not move the surface of an object touching the border
    truth, pred = square((10, 10), 0, 6), square((10, 10), 0, 6, shift=1)
    padded_truth, padded_pred = np.pad(truth, 3), np.pad(pred, 3)
    for tol in (0.5, 1.0):
        assert metrics.surface_dice(pred, truth, (1.0, 1.0), tol) == pytest.approx(
            metrics.surface_dice(padded_pred, padded_truth, (1.0, 1.0), tol)
        )


# --- instance F1 (NeurIPS Cell rule) ---------------------------------------------------------------


def cells(shape: tuple[int, int], boxes: list[tuple[int, int, int, int]], label: int = 1) -> np.ndarray:
    """Semantic label map with ``label`` in each (row0, row1, col0, col1) box."""
    out = np.zeros(shape, dtype=np.uint8)
    for r0, r1, c0, c1 in boxes:
        out[r0:r1, c0:c1] = label
    return out


THREE_CELLS = [(4, 8, 4, 8), (4, 8, 12, 16), (12, 16, 4, 8)]


@pytest.mark.parametrize(
    ("pred_boxes", "tp", "fp", "fn"),
    [
        (THREE_CELLS, 3, 0, 0),  # perfect
        (THREE_CELLS[:2], 2, 0, 1),  # a missed cell
        (THREE_CELLS + [(12, 16, 12, 16)], 3, 1, 0),  # a spurious cell
        # the first two cells merged by a bridge: IoU 16/40 with each -> no match for either
        (THREE_CELLS + [(5, 7, 8, 12)], 1, 1, 2),
        # a cell cut in two: the half (IoU 8/16 = 0.5) still matches, the other piece is a false positive
        ([(4, 8, 4, 6), (4, 8, 7, 8), *THREE_CELLS[1:]], 3, 1, 0),
        # a cell cut into two quarters (IoU 4/16 each): no match, two false positives
        ([(4, 8, 4, 5), (4, 8, 6, 7), *THREE_CELLS[1:]], 2, 2, 1),
    ],
    ids=["perfect", "missed", "spurious", "merged", "split-at-half", "split-in-quarters"],
)
def test_instance_f1_layouts(pred_boxes, tp, fp, fn):
    truth = cells((20, 20), THREE_CELLS)
    scores = metrics.instance_f1(cells((20, 20), pred_boxes), truth)
    assert (scores.tp, scores.fp, scores.fn) == (tp, fp, fn)
    assert scores.f1 == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_instances_are_interior_components_with_diagonal_connectivity():
    # two squares touching at one corner are one cell (full connectivity, like skimage.measure.label)
    diagonal = cells((20, 20), [(4, 8, 4, 8), (8, 12, 8, 12)])
    assert metrics.label_instances(diagonal == 1).max() == 1
    # a boundary-class ring between interior regions separates them
    separated = cells((20, 20), [(4, 12, 4, 12)])
    separated[4:12, 8] = 2
    assert metrics.label_instances(separated == 1).max() == 2
    assert metrics.instance_f1(separated, separated, interior_label=1).tp == 2


def test_instance_f1_ignores_cells_at_the_image_border():
    truth = cells((20, 20), THREE_CELLS + [(16, 20, 16, 20)])  # the last cell touches the border
    scores = metrics.instance_f1(cells((20, 20), THREE_CELLS), truth)
    assert (scores.tp, scores.fp, scores.fn) == (3, 0, 0)
    assert metrics.instance_f1(cells((20, 20), THREE_CELLS), truth, exclude_border=False).fn == 1


def test_instance_f1_without_true_positive_is_zero():
    empty = np.zeros((20, 20), dtype=np.uint8)
    assert metrics.instance_f1(empty, cells((20, 20), THREE_CELLS)).f1 == 0.0
    assert metrics.instance_f1(empty, empty).f1 == 0.0  # the challenge scores F1 = 0 without any TP


# --- tolerances and the FLARE22 slice rule ----------------------------------------------------------


def test_generic_tolerances_are_explicit_never_guessed_from_names():
    # organ rules belong to the abdomen protocols (by label index); generic never guesses them from a name
    labels = {1: "Liver", 2: "kidney_right", 6: "tumor"}
    assert resolve_tolerances(labels, 1.0) == {1: 1.0, 2: 1.0, 6: 1.0}
    explicit = resolve_tolerances(labels, {"liver": 4.0, "default": 0.5})
    assert explicit == {1: 4.0, 2: 0.5, 6: 0.5}
    with pytest.raises(UsemaError, match="tumor"):
        resolve_tolerances(labels, {"tumor": -1.0})


def save_nifti(path: Path, array: np.ndarray, zooms: tuple[float, ...] = (1.0, 1.0, 1.0)) -> None:
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.diag([*zooms, 1.0])), str(path))


def test_flare22_scores_aorta_only_on_labelled_slices(tmp_path: Path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    truth = np.zeros((8, 8, 12), dtype=np.uint8)
    truth[2:5, 2:5, 2:8] = 5  # aorta is label 5 in FLARE22 order
    pred = np.zeros_like(truth)
    pred[2:5, 2:5, :] = 5  # the whole length of the vessel; FLARE22 only scores slices 2..6 (z_last excluded)
    save_nifti(tmp_path / "truth" / "c.nii.gz", truth)
    save_nifti(tmp_path / "pred" / "c.nii.gz", pred)
    flare = evaluate_folders(tmp_path / "pred", tmp_path / "truth", protocol="flare22")
    plain = evaluate_folders(tmp_path / "pred", tmp_path / "truth", {5: "aorta"})
    assert [r["dsc"] for r in flare.rows if r["class_id"] == 5] == [1.0]
    assert plain.rows[0]["dsc"] == pytest.approx(2 * 6 / (6 + 12))


# --- `usema evaluate` end to end ----------------------------------------------------------------------


@pytest.fixture()
def nifti_folders(tmp_path: Path) -> tuple[Path, Path]:
    """Two cases, spacing (2, 1, 1) mm; class 1 = liver: prediction cut by 2 slices along axis 0."""
    pred_dir, truth_dir = tmp_path / "pred", tmp_path / "truth"
    pred_dir.mkdir()
    truth_dir.mkdir()
    for case in ("case_a", "case_b"):
        truth = np.zeros((16, 16, 6), dtype=np.uint8)
        truth[2:12, 2:12, 1:5] = 1
        truth[13:15, 13:15, 2:4] = 2
        pred = truth.copy()
        pred[10:12] = 0  # liver: 8 of 10 rows predicted; spleen: exact
        save_nifti(truth_dir / f"{case}.nii.gz", truth, (2.0, 1.0, 1.0))
        save_nifti(pred_dir / f"{case}.nii.gz", pred, (2.0, 1.0, 1.0))
    return pred_dir, truth_dir


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cli_writes_csv_and_json(nifti_folders, tmp_path: Path, capsys):
    pred_dir, truth_dir = nifti_folders
    out = tmp_path / "results" / "eval.json"
    assert main(["evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir), "--labels", "1=liver", "2=spleen",
                 "--nsd-tolerance", "liver=5", "--output", str(out)]) == 0  # fmt: skip
    rows = read_csv(out.with_suffix(".csv"))
    assert [(r["case"], r["class_name"]) for r in rows] == [
        ("case_a", "liver"), ("case_a", "spleen"), ("case_b", "liver"), ("case_b", "spleen"),
    ]  # fmt: skip
    liver = rows[0]
    assert float(liver["dsc"]) == pytest.approx(2 * 8 / (10 + 8))
    assert float(liver["nsd_tolerance_mm"]) == 5.0  # the 4 mm cut is within it
    assert float(liver["nsd"]) == pytest.approx(1.0)
    assert float(liver["hd95"]) == pytest.approx(4.0)  # 2 voxels x 2 mm
    assert float(rows[1]["dsc"]) == 1.0 and float(rows[1]["hd95"]) == 0.0
    summary = json.loads(out.read_text())
    assert summary["cases"] == 2
    assert summary["per_class"]["liver"]["dsc"] == pytest.approx(16 / 18)
    assert summary["mean_dsc"] == pytest.approx((16 / 18 + 1.0) / 2)
    assert summary["mean_nsd"] == pytest.approx(1.0)
    table = capsys.readouterr().out
    assert "| liver | 0.8889 |" in table and "| **mean** |" in table


def test_cli_labels_from_dataset_json_and_recipe(nifti_folders, tmp_path: Path, capsys):
    pred_dir, truth_dir = nifti_folders
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}}))
    assert main(["evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir)]) == 0
    summary = json.loads((pred_dir / "evaluation.json").read_text())
    assert sorted(summary["per_class"]) == ["liver", "spleen"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: t\ndata: {{source: nnunet, root: {tmp_path}, labels: {{0: background, 1: organ, 2: other}}}}\n"
        "evaluation: {nsd_tolerance_mm: {organ: 1.0, other: 3.0}}\n"
    )
    out = tmp_path / "r.json"
    args = ["evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir), "--recipe", str(recipe),
            "--output", str(out)]  # fmt: skip
    assert main(args) == 2  # its names disagree with dataset.json: refused, naming both
    err = capsys.readouterr().err
    assert "data.labels has 1='organ'" in err and "dataset.json has 1='liver'" in err and not out.exists()
    (tmp_path / "dataset.json").unlink()
    assert main(args) == 0
    organ = json.loads(out.read_text())["per_class"]["organ"]
    assert organ["nsd_tolerance_mm"] == 1.0 and organ["nsd"] < 1.0  # a 4 mm cut is outside 1 mm


def test_cli_refuses_label_values_outside_the_classes(nifti_folders, capsys):
    pred_dir, truth_dir = nifti_folders
    assert main(["evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir), "--labels", "1=liver"]) == 2
    err = capsys.readouterr().err
    assert "case_a.nii.gz: label value 2 is not among the classes [1]" in err
    assert not (pred_dir / "evaluation.json").exists()


def test_cli_refuses_mismatched_shape_and_affine(nifti_folders, capsys):
    pred_dir, truth_dir = nifti_folders
    save_nifti(pred_dir / "case_b.nii.gz", np.zeros((16, 16, 5)), (2.0, 1.0, 1.0))
    assert main(["evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir)]) == 2
    assert "case_b: prediction shape (16, 16, 5)" in capsys.readouterr().err
    save_nifti(pred_dir / "case_b.nii.gz", np.zeros((16, 16, 6)), (1.0, 1.0, 1.0))
    assert main(["evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir)]) == 2
    assert "case_b: prediction spacing" in capsys.readouterr().err
    moved = np.diag([2.0, 1.0, 1.0, 1.0])
    moved[0, 3] = 10.0  # same grid, shifted origin
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 6), np.uint8), moved), str(pred_dir / "case_b.nii.gz"))
    assert main(["evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir)]) == 2
    assert "case_b: prediction affine" in capsys.readouterr().err
    assert not list(pred_dir.glob("evaluation.*"))


def test_cli_missing_prediction_is_refused_or_scored_empty(nifti_folders, capsys):
    pred_dir, truth_dir = nifti_folders
    (pred_dir / "case_b.nii.gz").unlink()
    args = ["evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir), "--labels", "1=liver", "2=spleen"]
    assert main(args) == 2
    assert "case_b" in capsys.readouterr().err
    assert main([*args, "--missing-as-empty"]) == 0
    rows = [r for r in read_csv(pred_dir / "evaluation.csv") if r["case"] == "case_b"]
    assert [(r["missing_prediction"], float(r["dsc"]), float(r["nsd"])) for r in rows] == [("1", 0.0, 0.0)] * 2
    assert json.loads((pred_dir / "evaluation.json").read_text())["missing_predictions"] == ["case_b"]


def test_cli_refuses_to_overwrite_results(nifti_folders, capsys):
    pred_dir, truth_dir = nifti_folders
    out = pred_dir / "evaluation.json"
    out.write_text("previous")
    args = ["evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir), "--labels", "1=liver", "2=spleen"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "previous" and not (pred_dir / "evaluation.csv").exists()
    assert main([*args, "--overwrite"]) == 0
    assert json.loads(out.read_text())["cases"] == 2


def test_cli_png_folder_with_instance_f1(tmp_path: Path):
    pred_dir, truth_dir = tmp_path / "pred", tmp_path / "truth"
    pred_dir.mkdir()
    truth_dir.mkdir()
    truth = cells((20, 20), THREE_CELLS)
    pred = cells((20, 20), THREE_CELLS[:2])
    Image.fromarray(truth).save(truth_dir / "img1.png")
    Image.fromarray(pred).save(pred_dir / "img1.png")
    assert main(["evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir), "--labels", "1=interior",
                 "2=boundary", "--instance-f1"]) == 0  # fmt: skip
    summary = json.loads((pred_dir / "evaluation.json").read_text())
    assert summary["instance"]["mean_f1"] == pytest.approx(0.8)  # TP 2, FN 1
    assert (summary["instance"]["tp"], summary["instance"]["fn"]) == (2, 1)
    assert summary["per_class"]["boundary"]["dsc"] == 1.0  # absent from both: counted as 1
    assert summary["per_class"]["interior"]["nsd_tolerance_mm"] == 2.0  # 2 pixels at spacing 1


def test_itk_spacing_follows_the_x_first_axis_order(nifti_folders, tmp_path: Path):
    # the same label maps as .nrrd (SimpleITK arrays are z, y, x): spacing 2 mm must stay on the cut axis
    import SimpleITK as sitk

    pred_dir, truth_dir = nifti_folders
    nrrd_truth = tmp_path / "truth_nrrd"
    nrrd_truth.mkdir()
    for case in ("case_a", "case_b"):
        array = np.asanyarray(nib.load(str(truth_dir / f"{case}.nii.gz")).dataobj)
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
        image.SetSpacing((2.0, 1.0, 1.0))
        sitk.WriteImage(image, str(nrrd_truth / f"{case}.nrrd"))
    result = evaluate_folders(pred_dir, nrrd_truth, {1: "liver", 2: "spleen"})
    liver = result.rows[0]
    assert liver["hd95"] == pytest.approx(4.0) and liver["dsc"] == pytest.approx(16 / 18)


def test_parallel_workers_give_the_same_rows_and_errors(nifti_folders):
    pred_dir, truth_dir = nifti_folders
    labels = {1: "liver", 2: "spleen"}
    serial = evaluate_folders(pred_dir, truth_dir, labels)
    parallel = evaluate_folders(pred_dir, truth_dir, labels, workers=2)
    assert parallel.rows == serial.rows
    save_nifti(pred_dir / "case_b.nii.gz", np.zeros((16, 16, 5)), (2.0, 1.0, 1.0))
    with pytest.raises(UsemaError, match="case_b: prediction shape"):
        evaluate_folders(pred_dir, truth_dir, labels, workers=2)


@pytest.mark.parametrize("damage", ["truncated", "not-an-image"])
def test_cli_names_an_unreadable_prediction(nifti_folders, damage: str, capsys):
    pred_dir, truth_dir = nifti_folders
    target = pred_dir / "case_b.nii.gz"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a NIfTI file")
    assert main(["evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{target}: expected a readable .nii.gz image" in err and "Traceback" not in err
    assert not list(pred_dir.glob("evaluation.*"))
