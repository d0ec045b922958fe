"""Benchmark protocols against independent re-implementations of the benchmark's evaluation scripts.

Each reference below is written from the published scripts' steps (SPEC §5) with plain numpy / scipy /
skimage: DeepMind's surface distances (neighbourhood codes by ``ndimage.correlate`` on DeepMind's padded
crop, exact EDT, area-weighted tolerance and percentile), the abdomen organ loop, the Endovis frame loop and
the cell F1 script with its tiling. The only shared piece is DeepMind's 3D surfel-area table, read from
MONAI (which ships it verbatim): it is data, not a usema helper.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from monai.metrics.utils import _get_neighbour_code_to_normals_table
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from skimage import measure, segmentation

from usema.cli import main
from usema.errors import UsemaError
from usema.evaluation.evaluate import evaluate_folders

DECIMALS = 5e-5  # "agreement to 4 decimals"

# --- reference: DeepMind surface distances -------------------------------------------------------------


def ref_table(spacing: tuple[float, ...]) -> np.ndarray:
    if len(spacing) == 2:
        first, second = spacing
        diag = 0.5 * math.hypot(first, second)
        table = np.zeros(16)
        for code in range(1, 15):
            bits = [(code >> b) & 1 for b in (3, 2, 1, 0)]  # (0,0) (0,1) (1,0) (1,1)
            count = sum(bits)
            if count in (1, 3):
                table[code] = diag
            elif bits[0] == bits[1]:  # one row inside: the contour runs along axis 1
                table[code] = second
            elif bits[0] == bits[2]:  # one column inside: along axis 0
                table[code] = first
            else:  # two opposite corners: two diagonal pieces
                table[code] = 2 * diag
        return table
    normals = _get_neighbour_code_to_normals_table().double().numpy()
    table = np.zeros(256)
    for code in range(256):
        for n in normals[code]:
            table[code] += np.linalg.norm(
                [n[0] * spacing[1] * spacing[2], n[1] * spacing[0] * spacing[2], n[2] * spacing[0] * spacing[1]]
            )
    return table


def ref_surface(gt: np.ndarray, seg: np.ndarray, spacing) -> tuple:
    ndim = gt.ndim
    kernel = np.array([[8, 4], [2, 1]]) if ndim == 2 else np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])
    full = 15 if ndim == 2 else 255
    table = ref_table(tuple(float(s) for s in spacing))
    union = gt | seg
    if not union.any():
        return (np.zeros(0),) * 4
    idx = np.argwhere(union)
    lo, hi = idx.min(0), idx.max(0)
    crops = []
    for mask in (gt, seg):
        crop = np.zeros(hi - lo + 2, np.uint8)
        crop[tuple(slice(0, -1) for _ in range(ndim))] = mask[tuple(slice(a, b + 1) for a, b in zip(lo, hi))]
        crops.append(ndimage.correlate(crop, kernel, mode="constant", cval=0))
    borders = [(c != 0) & (c != full) for c in crops]
    dist = [
        ndimage.distance_transform_edt(~b, sampling=spacing) if b.any() else np.full(b.shape, np.inf) for b in borders
    ]
    return dist[1][borders[0]], dist[0][borders[1]], table[crops[0][borders[0]]], table[crops[1][borders[1]]]


def ref_nsd(gt, seg, spacing, tol) -> float:
    d_gs, d_sg, a_g, a_s = ref_surface(gt, seg, spacing)
    total = a_g.sum() + a_s.sum()
    return (a_g[d_gs <= tol].sum() + a_s[d_sg <= tol].sum()) / total if total else math.nan


def ref_hd95(gt, seg, spacing) -> float:
    d_gs, d_sg, a_g, a_s = ref_surface(gt, seg, spacing)
    out = []
    for d, a in ((d_gs, a_g), (d_sg, a_s)):
        pairs = np.array(sorted(zip(d, a)))
        cum = np.cumsum(pairs[:, 1]) / pairs[:, 1].sum()
        out.append(pairs[min(int(np.searchsorted(cum, 0.95)), len(pairs) - 1), 0])
    return max(out)


def ref_dice(gt, seg) -> float:
    total = gt.sum() + seg.sum()
    return 2 * (gt & seg).sum() / total if total else math.nan


# --- reference: abdomen (FLARE22 / AMOS) -----------------------------------------------------------------

TOLERANCES = [5, 3, 3, 5, 2, 2, 2, 2, 2, 3, 5, 7, 3]  # organs 1..13 in FLARE22 order


def ref_abdomen_case(gt: np.ndarray, seg: np.ndarray, spacing) -> dict[int, tuple[float, float, float, bool]]:
    """organ -> (DSC, NSD, HD95 with the documented penalty, penalised)."""
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(gt.shape, spacing)))
    out = {}
    for i in range(1, 14):
        g_any, s_any = (gt == i).sum() > 0, (seg == i).sum() > 0
        if not g_any and not s_any:
            out[i] = (1.0, 1.0, math.nan, False)
        elif not g_any:
            out[i] = (0.0, 0.0, diagonal, True)
        else:
            if i in (5, 6, 10):
                z = np.where(gt == i)[2]
                g, s = gt[:, :, z.min() : z.max()] == i, seg[:, :, z.min() : z.max()] == i
            else:
                g, s = gt == i, seg == i
            penalised = g.any() != s.any()
            hd = ref_hd95(g, s, spacing) if g.any() and s.any() else (diagonal if penalised else math.nan)
            out[i] = (ref_dice(g, s), ref_nsd(g, s, spacing, TOLERANCES[i - 1]), hd, penalised)
    return out


def ref_dataset_mean(per_case: list[dict[int, float]]) -> float:
    """Per-case values rounded to 4 decimals, mean per organ over cases (NaN skipped), mean over organs."""
    organ_means = []
    for organ in per_case[0]:
        values = [round(c[organ], 4) for c in per_case if not math.isnan(c[organ])]
        if values:
            organ_means.append(np.mean(values))
    return float(np.mean(organ_means))


def blob(shape, center, radii) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def random_abdomen_case(rng: np.random.Generator, shape=(20, 20, 10)) -> tuple[np.ndarray, np.ndarray]:
    gt, seg = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    for organ in rng.choice(np.arange(1, 14), size=int(rng.integers(3, 8)), replace=False):
        center = [int(rng.integers(3, n - 3)) for n in shape]
        radii = [float(rng.uniform(1.0, 3.5)) for _ in shape]
        mode = rng.random()
        if mode > 0.15:  # present in the truth
            gt[blob(shape, center, radii)] = organ
        if mode < 0.85:  # present in the prediction (shifted / resized), else missed
            moved = [c + int(rng.integers(-2, 3)) for c in center]
            seg[blob(shape, moved, [r * rng.uniform(0.7, 1.3) for r in radii])] = organ
    # an aorta labelled on a sub-range of slices, predicted along the whole volume
    if rng.random() < 0.5:
        z0, z1 = sorted(rng.choice(np.arange(shape[2]), 2, replace=False))
        gt[8:11, 8:11, z0 : z1 + 1] = 5
        seg[8:11, 8:11, :] = 5
    return gt, seg


SPACINGS = [(0.7, 0.7, 2.5), (1.0, 1.0, 1.0), (0.8, 1.25, 3.0)]


def save_nifti(path: Path, array: np.ndarray, spacing) -> None:
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.diag([*spacing, 1.0])), str(path))


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    return pred, truth


@pytest.mark.parametrize("protocol", ["flare22", "amos"])
def test_abdomen_protocol_matches_the_reference_on_random_cases(tmp_path: Path, protocol: str):
    rng = np.random.default_rng(8)
    pred_dir, truth_dir = _folders(tmp_path)
    expected = {}
    for k in range(50):
        gt, seg = random_abdomen_case(rng)
        spacing = SPACINGS[k % len(SPACINGS)]
        save_nifti(truth_dir / f"c{k:02d}.nii.gz", gt, spacing)
        save_nifti(pred_dir / f"c{k:02d}.nii.gz", seg, spacing)
        zooms = nib.load(str(truth_dir / f"c{k:02d}.nii.gz")).header.get_zooms()  # float32, as the script reads
        expected[f"c{k:02d}"] = ref_abdomen_case(gt, seg, zooms)
    result = evaluate_folders(pred_dir, truth_dir, protocol=protocol)
    assert len(result.rows) == 50 * 13
    for row in result.rows:
        dsc, nsd, hd, _ = expected[row["case"]][row["class_id"]]
        for ours, ref in ((row["dsc"], dsc), (row["nsd"], nsd), (row["hd95"], hd)):
            assert (math.isnan(ours) and math.isnan(ref)) or abs(ours - ref) < DECIMALS, (row, dsc, nsd, hd)
    cases = list(expected.values())
    for key, pos in (("mean_dsc", 0), ("mean_nsd", 1)):
        ref = ref_dataset_mean([{o: v[pos] for o, v in c.items()} for c in cases])
        assert result.summary[key] == pytest.approx(ref, abs=DECIMALS)
    penalised = sum(v[3] for c in cases for v in c.values())
    assert result.summary["hd95_penalised"] == penalised > 0


def test_abdomen_protocol_refuses_a_dataset_in_another_label_order(tmp_path: Path, capsys):
    pred_dir, truth_dir = _folders(tmp_path)
    gt = np.zeros((8, 8, 4), np.uint8)
    save_nifti(truth_dir / "a.nii.gz", gt, (1, 1, 1))
    save_nifti(pred_dir / "a.nii.gz", gt, (1, 1, 1))
    amos_order = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
                  "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum"]  # fmt: skip
    labels = {"background": 0, **{name: i for i, name in enumerate(amos_order, 1)}}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    assert main(["evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir), "--protocol", "amos"]) == 2
    err = capsys.readouterr().err
    assert "dataset.json: label 1 is 'spleen', but the abdomen protocols score label 1 as 'liver'" in err


# --- reference: Endovis17 -------------------------------------------------------------------------------


def ref_endovis_frame(gt: np.ndarray, seg: np.ndarray) -> tuple[float, float] | None:
    labels = np.union1d(np.unique(gt), np.unique(seg))
    labels = labels[labels != 0]
    if not len(labels):
        return None  # the reference asserts; usema leaves such frames out and lists them
    dsc, nsd = [], []
    for i in labels:
        if (gt == i).sum() == 0:
            dsc.append(0.0)
            nsd.append(0.0)
        else:
            g, s = gt == i, seg == i
            dsc.append(ref_dice(g, s))
            nsd.append(ref_nsd(g[..., None], s[..., None], [1, 1, 1], 2))
    return float(np.mean(dsc)), float(np.mean(nsd))


def random_frame(rng: np.random.Generator, shape=(30, 40)) -> tuple[np.ndarray, np.ndarray]:
    gt, seg = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    for tool in rng.choice(np.arange(1, 8), size=int(rng.integers(0, 4)), replace=False):
        r0, c0 = int(rng.integers(0, shape[0] - 6)), int(rng.integers(0, shape[1] - 8))
        h, w = int(rng.integers(3, 12)), int(rng.integers(3, 16))
        mode = rng.random()
        if mode > 0.15:
            gt[r0 : r0 + h, c0 : c0 + w] = tool
        if mode < 0.85:
            dr, dc = int(rng.integers(-3, 4)), int(rng.integers(-3, 4))
            seg[max(r0 + dr, 0) : r0 + dr + h, max(c0 + dc, 0) : c0 + dc + w] = tool
    return gt, seg


def test_endovis_protocol_matches_the_reference_on_random_frames(tmp_path: Path):
    rng = np.random.default_rng(17)
    pred_dir, truth_dir = _folders(tmp_path)
    expected = {}
    for k in range(72):
        gt, seg = random_frame(rng)
        Image.fromarray(gt).save(truth_dir / f"f{k:02d}.png")
        Image.fromarray(seg).save(pred_dir / f"f{k:02d}.png")
        expected[f"f{k:02d}"] = ref_endovis_frame(gt, seg)
    result = evaluate_folders(pred_dir, truth_dir, protocol="endovis17")
    scored = {c: v for c, v in expected.items() if v is not None}
    assert 50 <= len(scored) < 72  # frames with several, one and no instruments
    assert result.summary["frames_without_classes"] == sorted(c for c, v in expected.items() if v is None)
    for case, (dsc, nsd) in scored.items():
        rows = [r for r in result.rows if r["case"] == case]
        assert np.mean([r["dsc"] for r in rows]) == pytest.approx(dsc, abs=DECIMALS)
        assert np.mean([r["nsd"] for r in rows]) == pytest.approx(nsd, abs=DECIMALS)
    assert result.summary["mean_dsc"] == pytest.approx(np.mean([round(v[0], 4) for v in scored.values()]), abs=1e-9)
    assert result.summary["mean_nsd"] == pytest.approx(np.mean([round(v[1], 4) for v in scored.values()]), abs=1e-9)


def test_endovis_counter_example_three_frames_at_half_dice(tmp_path: Path):
    # one instrument per frame at DSC 0.5: the reference averages the frames' present classes -> 0.50
    # (a per-class mean over frames that counts the 6 absent classes as 1 gave 0.93)
    pred_dir, truth_dir = _folders(tmp_path)
    for k in range(3):
        gt, seg = np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint8)
        gt[4:12, 4:8] = 1
        seg[4:12, 6:10] = 1  # half of the truth, same size: DSC 0.5
        Image.fromarray(gt).save(truth_dir / f"f{k}.png")
        Image.fromarray(seg).save(pred_dir / f"f{k}.png")
    result = evaluate_folders(pred_dir, truth_dir, protocol="endovis17", labels={i: f"t{i}" for i in range(1, 8)})
    assert result.summary["mean_dsc"] == pytest.approx(0.5)


def test_endovis_counter_example_nsd_of_shifted_blobs_is_the_one_slice_volume_nsd(tmp_path: Path):
    pred_dir, truth_dir = _folders(tmp_path)
    gt, seg = np.zeros((40, 40), np.uint8), np.zeros((40, 40), np.uint8)
    gt[blob((40, 40), (20, 17), (8, 8))] = 3
    seg[blob((40, 40), (20, 22), (8, 8))] = 3  # shifted by 5 px
    Image.fromarray(gt).save(truth_dir / "f.png")
    Image.fromarray(seg).save(pred_dir / "f.png")
    result = evaluate_folders(pred_dir, truth_dir, protocol="endovis17", labels={3: "tool"})
    reference = ref_nsd(gt[..., None] == 3, seg[..., None] == 3, [1, 1, 1], 2)
    contour_2d = ref_nsd(gt == 3, seg == 3, (1.0, 1.0), 2)  # what the 2D contour NSD gives instead
    assert result.summary["mean_nsd"] == pytest.approx(round(reference, 4), abs=1e-9)
    assert abs(reference - contour_2d) > 0.1


# --- reference: NeurIPS Cell ------------------------------------------------------------------------------


def ref_remove_boundary_cells(mask: np.ndarray) -> np.ndarray:
    w, h = mask.shape
    bd = np.ones((w, h))
    bd[2 : w - 2, 2 : h - 2] = 0
    for i in np.unique(mask * bd)[1:]:
        mask[mask == i] = 0
    return segmentation.relabel_sequential(mask)[0]


def ref_tp_fp_fn(gt: np.ndarray, seg: np.ndarray) -> tuple[int, int, int]:
    n_gt, n_seg = int(gt.max()), int(seg.max())
    if n_seg == 0:
        return 0, 0, 0
    overlap = np.zeros((n_gt + 1, n_seg + 1))
    np.add.at(overlap, (gt.ravel(), seg.ravel()), 1)
    iou = overlap / (overlap.sum(0, keepdims=True) + overlap.sum(1, keepdims=True) - overlap)
    iou = np.nan_to_num(iou)[1:, 1:]
    n_min = min(iou.shape)
    rows, cols = linear_sum_assignment(-(iou >= 0.5).astype(float) - iou / (2 * n_min))
    tp = int((iou[rows, cols] >= 0.5).sum())
    return tp, n_seg - tp, n_gt - tp


def ref_cell_f1(gt: np.ndarray, seg_classes: np.ndarray) -> tuple[int, int, int, float]:
    seg = measure.label(seg_classes == 1)
    if np.prod(gt.shape) < 25_000_000:
        gt = ref_remove_boundary_cells(gt.astype(np.int32))
        seg = ref_remove_boundary_cells(seg.astype(np.int32))
        n_true, n_pred = int(gt.max()), int(seg.max())
        tp = ref_tp_fp_fn(gt, seg)[0]
    else:
        H, W = gt.shape
        nh, nw = -(-H // 2000), -(-W // 2000)
        gt_pad = np.zeros((nh * 2000, nw * 2000), np.int32)
        seg_pad = np.zeros_like(gt_pad)
        gt_pad[:H, :W], seg_pad[:H, :W] = gt, seg
        tp = n_true = n_pred = 0
        for i in range(nh):
            for j in range(nw):
                tile = (slice(2000 * i, 2000 * (i + 1)), slice(2000 * j, 2000 * (j + 1)))
                g, s = ref_remove_boundary_cells(gt_pad[tile].copy()), ref_remove_boundary_cells(seg_pad[tile].copy())
                n_true, n_pred = n_true + int(g.max()), n_pred + int(s.max())
                tp += ref_tp_fp_fn(g, s)[0]
    if tp == 0:
        return 0, n_true, n_pred, 0.0
    precision, recall = tp / n_pred, tp / n_true
    return tp, n_true, n_pred, 2 * precision * recall / (precision + recall)


def three_class(instances: np.ndarray) -> np.ndarray:
    """The training target of the cell datasets: interior 1, the cells' one-pixel inner boundary 2."""
    boundary = segmentation.find_boundaries(instances, mode="inner") & (instances > 0)
    return np.where(boundary, 2, np.where(instances > 0, 1, 0)).astype(np.uint8)


def random_cells(rng: np.random.Generator, shape=(48, 48)) -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros(shape, np.int32)
    n = int(rng.integers(2, 12))
    for cell in range(1, n + 1):
        r = int(rng.integers(2, 5))
        center = (int(rng.integers(0, shape[0])), int(rng.integers(0, shape[1])))  # some on the border
        gt[blob(shape, center, (r, r)) & (gt == 0)] = cell * 7  # ids need not be consecutive
        if rng.random() < 0.3:  # a touching neighbour
            gt[blob(shape, (center[0], center[1] + 2 * r), (r, r)) & (gt == 0)] = cell * 7 + 1
    pred_inst = gt.copy()
    for cell in np.unique(gt)[1:]:
        mode = rng.random()
        if mode < 0.15:
            pred_inst[pred_inst == cell] = 0  # missed
        elif mode < 0.4:
            pred_inst = np.where(pred_inst == cell, 0, pred_inst)
            pred_inst[ndimage.binary_dilation(gt == cell) & (pred_inst == 0)] = cell  # grown
    seg = three_class(pred_inst)
    if rng.random() < 0.5:  # some interiors are predicted as solid blobs, merging touching cells
        seg[(pred_inst > 0) & (rng.random(shape) < 0.5)] = 1
    return gt, seg


def test_cell_protocol_matches_the_reference_on_random_images(tmp_path: Path):
    rng = np.random.default_rng(703)
    pred_dir, truth_dir = _folders(tmp_path)
    expected = {}
    for k in range(50):
        gt, seg = random_cells(rng)
        tifffile.imwrite(truth_dir / f"img{k:02d}_label.tiff", gt)
        Image.fromarray(seg).save(pred_dir / f"img{k:02d}.png")
        expected[f"img{k:02d}"] = ref_cell_f1(gt, seg)
    result = evaluate_folders(pred_dir, truth_dir, protocol="neurips_cell")
    assert len(result.rows) == 50
    for row in result.rows:
        tp, n_true, n_pred, f1 = expected[row["case"]]
        assert (row["instance_tp"], row["instance_true"], row["instance_pred"]) == (tp, n_true, n_pred)
        assert row["instance_f1"] == pytest.approx(f1, abs=1e-12)
    f1s = [round(v[3], 4) for v in expected.values()]
    assert 0 < result.summary["instance"]["mean_f1"] == pytest.approx(np.mean(f1s), abs=1e-12)
    assert result.summary["instance"]["median_f1"] == pytest.approx(np.median(f1s), abs=1e-12)


def test_cell_counter_example_perfect_three_class_map_of_small_cells(tmp_path: Path):
    # cells of radius 3: the interior class is too small to reach IoU 0.5 with the instance mask, so even a
    # prediction equal to the training target scores F1 0 in the reference (components of the truth's own
    # interior class, the old ground truth, gave 1.0)
    pred_dir, truth_dir = _folders(tmp_path)
    gt = np.zeros((40, 40), np.int32)
    for i, (r, c) in enumerate([(10, 10), (10, 25), (25, 12), (26, 28)], 1):
        gt[blob(gt.shape, (r, c), (3, 3))] = i
    tifffile.imwrite(truth_dir / "a_label.tiff", gt)
    Image.fromarray(three_class(gt)).save(pred_dir / "a.png")
    result = evaluate_folders(pred_dir, truth_dir, protocol="neurips_cell")
    assert ref_cell_f1(gt, three_class(gt))[3] == 0.0
    assert result.summary["instance"]["mean_f1"] == 0.0


@pytest.mark.slow
def test_cell_protocol_tiles_an_image_above_25_megapixels(tmp_path: Path):
    rng = np.random.default_rng(25)
    shape = (5000, 5000)  # exactly 25 M pixels: tiled, as in the reference (< 25 M is scored whole)
    gt = np.zeros(shape, np.int32)
    pred = np.zeros(shape, np.int32)
    centers = [(1998, 1000), (1000, 2001), (4990, 300), (3000, 3000), (2500, 4100)] + [
        (int(rng.integers(10, 4990)), int(rng.integers(10, 4990))) for _ in range(40)
    ]  # the first ones straddle a tile edge or the image border
    for i, (r, c) in enumerate(centers, 1):
        window = (slice(max(r - 8, 0), r + 8), slice(max(c - 8, 0), c + 8))
        local = blob((16, 16), (r - window[0].start, c - window[1].start), (5, 5))[
            : gt[window].shape[0], : gt[window].shape[1]
        ]
        gt[window][local] = i
        if i % 5:
            pred[window][local] = i
    seg = (pred > 0).astype(np.uint8)
    pred_dir, truth_dir = _folders(tmp_path)
    tifffile.imwrite(truth_dir / "big_label.tiff", gt)
    Image.fromarray(seg).save(pred_dir / "big.png")
    tp, n_true, n_pred, f1 = ref_cell_f1(gt, seg)
    row = evaluate_folders(pred_dir, truth_dir, protocol="neurips_cell").rows[0]
    assert (row["instance_tp"], row["instance_true"], row["instance_pred"]) == (tp, n_true, n_pred)
    assert row["instance_f1"] == pytest.approx(f1) and 0 < f1 < 1
    assert n_true <= len(centers) - 2  # the cells across a tile edge were removed, as the tiles' border cells


def test_cell_protocol_needs_instance_masks(tmp_path: Path, capsys):
    pred_dir, truth_dir = _folders(tmp_path)
    assert main(["evaluate", "--pred", str(pred_dir), "--truth", str(truth_dir), "--protocol", "neurips_cell"]) == 2
    assert "--truth-instances: the neurips_cell protocol scores against the dataset's instance masks" in (
        capsys.readouterr().err
    )


# --- HD95 penalty, label checks, hostile values ------------------------------------------------------------


def test_hd95_counter_example_a_missed_organ_is_penalised_not_dropped(tmp_path: Path):
    pred_dir, truth_dir = _folders(tmp_path)
    gt = np.zeros((20, 20, 8), np.uint8)
    gt[5:12, 5:12, 2:6] = 1
    hit = np.zeros_like(gt)
    hit[7:14, 5:12, 2:6] = 1  # shifted by 2 voxels along x
    for case, seg in (("hit", hit), ("miss", np.zeros_like(gt))):
        save_nifti(truth_dir / f"{case}.nii.gz", gt, (1.0, 1.0, 2.0))
        save_nifti(pred_dir / f"{case}.nii.gz", seg, (1.0, 1.0, 2.0))
    result = evaluate_folders(pred_dir, truth_dir, protocol="flare22")
    diagonal = math.sqrt(20**2 + 20**2 + 16**2)
    liver = result.summary["per_class"]["liver"]
    assert liver["hd95"] == pytest.approx((ref_hd95(gt == 1, hit == 1, (1.0, 1.0, 2.0)) + diagonal) / 2)
    assert liver["hd95_penalised"] == 1 and result.summary["hd95_penalised"] == 1


def _nnunet_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "Dataset001_X"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
        "numTraining": 0, "file_ending": ".nii.gz",
    }))  # fmt: skip
    return root


def test_train_refuses_a_recipe_whose_labels_disagree_with_dataset_json(tmp_path: Path, capsys):
    root = _nnunet_dataset(tmp_path)
    recipe = tmp_path / "r.yaml"
    labels = "{0: background, 1: spleen, 2: liver}"
    recipe.write_text(f"name: r\ndata: {{source: nnunet, root: {root}, labels: {labels}}}\n")
    assert main(["train", str(recipe), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"r.yaml: data.labels has 1='spleen' but {root / 'dataset.json'} has 1='liver'" in err
    assert not (tmp_path / "run").exists()


def test_a_huge_label_value_is_refused_without_allocating_per_value(tmp_path: Path):
    import tracemalloc

    pred_dir, truth_dir = _folders(tmp_path)
    gt = np.zeros((32, 32, 4), np.int32)
    gt[3, 3, 1] = 100_000_000
    for folder in (pred_dir, truth_dir):
        nib.save(nib.Nifti1Image(gt, np.eye(4)), str(folder / "a.nii.gz"))
    tracemalloc.start()
    with pytest.raises(UsemaError, match="label value 100000000 is not among the classes"):
        evaluate_folders(pred_dir, truth_dir, labels={1: "organ"})
    found = evaluate_folders(pred_dir, truth_dir)  # no class list: the value found is the class
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert found.rows[0]["class_id"] == 100_000_000 and found.rows[0]["dsc"] == 1.0
    assert peak < 50 * 2**20


def test_surface_distances_match_the_reference_in_2d_and_3d():
    from usema.evaluation import surface

    rng = np.random.default_rng(3)
    for trial in range(60):
        ndim = 2 + trial % 2
        shape = tuple(int(n) for n in rng.integers(4, 16, ndim))
        gt = ndimage.binary_dilation(rng.random(shape) < 0.06, iterations=int(rng.integers(0, 2)))
        seg = ndimage.binary_dilation(rng.random(shape) < 0.06, iterations=int(rng.integers(0, 2)))
        spacing = tuple(float(np.float32(s)) for s in rng.choice([0.7, 1.0, 1.3, 2.5], ndim))
        ours = surface.surface_distances(gt, seg, spacing)
        for tol in (1.0, 2.0, 3.0):
            ref = ref_nsd(gt, seg, spacing, tol)
            assert (math.isnan(ref) and math.isnan(surface.surface_dice(ours, tol))) or abs(
                surface.surface_dice(ours, tol) - ref
            ) < 1e-12
        if gt.any() and seg.any():
            assert surface.robust_hausdorff(ours) == ref_hd95(gt, seg, spacing)


def test_a_benchmark_protocol_recipe_refuses_generic_only_keys(tmp_path: Path):
    from usema.config import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ndata: {source: demo_brain}\n"
                      "evaluation: {protocol: flare22, nsd_tolerance_mm: {a: 1}}\n")  # fmt: skip
    with pytest.raises(UsemaError, match="evaluation.nsd_tolerance_mm: the flare22 protocol uses its own"):
        load_recipe(str(recipe))
