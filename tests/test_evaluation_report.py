"""`usema evaluate --report`: the HTML page opens in a real headless browser with every image it references."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from usema.cli import main

CHROMIUM = "chromium"  # Debian package `chromium`


def _frames(tmp_path: Path) -> tuple[Path, Path, Path]:
    pred, truth, images = tmp_path / "pred", tmp_path / "truth", tmp_path / "images"
    for folder in (pred, truth, images):
        folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        gt, seg = np.zeros((40, 60), np.uint8), np.zeros((40, 60), np.uint8)
        gt[5:25, 10:30] = 1 + k % 3
        seg[5 + k : 25 + k, 10:30] = 1 + k % 3  # worse with k
        Image.fromarray(gt).save(truth / f"f{k}.png")
        Image.fromarray(seg).save(pred / f"f{k}.png")
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(images / f"f{k}.png")
    return pred, truth, images


def _browser(*args: str) -> str:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.slow
def test_report_opens_in_headless_chromium_with_all_images(tmp_path: Path):
    assert shutil.which(CHROMIUM), "the report test needs the Debian package chromium"
    pred, truth, images = _frames(tmp_path)
    report = tmp_path / "report"
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--protocol", "endovis17", "--report",
                 str(report), "--report-cases", "3", "--images", str(images)]) == 0  # fmt: skip
    page = (report / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources == ["scores.png", "worst_1.png", "worst_2.png", "worst_3.png"]
    assert all((report / s).is_file() for s in sources)
    assert "http" not in page  # self-contained: nothing fetched from the network
    assert "f5" in page.split("Worst cases")[1].split("</table>")[0]  # the most shifted frame is listed
    dom = _browser("--dump-dom", (report / "index.html").as_uri())
    assert 'data-images-loaded="4/4"' in dom  # the browser decoded every image
    shot = tmp_path / "shot.png"
    _browser(f"--screenshot={shot}", "--window-size=1200,1600", (report / "index.html").as_uri())
    with Image.open(shot) as image:
        assert image.size == (1200, 1600) and len(np.unique(np.asarray(image.convert("L")))) > 10


def test_report_of_a_volume_draws_the_slice_of_largest_disagreement(tmp_path: Path):
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    gt = np.zeros((24, 24, 10), np.uint8)
    gt[4:20, 4:20, 2:9] = 1
    seg = gt.copy()
    seg[:, :, 6] = 0  # slice 6 missed entirely
    for folder, array in ((truth, gt), (pred, seg)):
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(folder / "v.nii.gz"))
    report = tmp_path / "r"
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--labels", "1=organ", "--report",
                 str(report)]) == 0  # fmt: skip
    assert "v, axial slice 6" in (report / "index.html").read_text()
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--labels", "1=organ", "--report",
                 str(report), "--output", str(tmp_path / "e.json")]) == 2  # an existing report is refused
