"""`usema datasets export-demo nuclei --tiles N`: the training columns as N x N nnU-Net cases, the held-out
columns kept apart as the test case."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from usema.cli import main
from usema.data import demos
from usema.data.nnunet import scan_dataset


def test_tiles_cover_the_training_columns_once_and_the_held_out_columns_stay_out(tmp_path: Path):
    out = tmp_path / "tiles"
    assert main(["datasets", "export-demo", "nuclei", "--tiles", "4", "--output", str(out)]) == 0
    files = demos.nuclei_files()
    raw, instances = tifffile.imread(files["image"]), tifffile.imread(files["mask"])
    binary = demos.instance_to_semantic(instances, "binary")
    ds = scan_dataset(out)
    assert not ds.problems and len(ds.train) == 16 and [c.name for c in ds.test] == ["nuclei_test"]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 16
    image_rebuilt, label_rebuilt = np.zeros((512, 384), raw.dtype), np.zeros((512, 384), np.uint8)
    covered = np.zeros((512, 384), int)
    for i, (rows, cols) in enumerate(demos.nuclei_tiles(4)):
        tile = tifffile.imread(out / "imagesTr" / f"nuclei_{i:03d}_0000.tif")
        assert tile.shape == (128, 96)
        image_rebuilt[rows, cols] = tile
        label_rebuilt[rows, cols] = tifffile.imread(out / "labelsTr" / f"nuclei_{i:03d}.tif")
        covered[rows, cols] += 1
    assert (covered == 1).all()
    np.testing.assert_array_equal(image_rebuilt, raw[:, :384])
    np.testing.assert_array_equal(label_rebuilt, binary[:, :384])
    np.testing.assert_array_equal(tifffile.imread(out / "imagesTs" / "nuclei_test_0000.tif"), raw[:, 384:])
    np.testing.assert_array_equal(tifffile.imread(out / "labelsTs" / "nuclei_test.tif"), binary[:, 384:])


def test_tiles_are_refused_for_the_brain_and_existing_files_are_kept(tmp_path: Path, capsys):
    assert main(["datasets", "export-demo", "brain", "--tiles", "2", "--output", str(tmp_path / "b")]) == 2
    assert "--tiles" in capsys.readouterr().err and not (tmp_path / "b").exists()
    out = tmp_path / "tiles"
    assert main(["datasets", "export-demo", "nuclei", "--tiles", "2", "--output", str(out)]) == 0
    before = (out / "labelsTr" / "nuclei_000.tif").read_bytes()
    argv = ["datasets", "export-demo", "nuclei", "--tiles", "2", "--target", "instance_boundary", "--output", str(out)]
    assert main(argv) == 2
    assert (out / "labelsTr" / "nuclei_000.tif").read_bytes() == before


@pytest.mark.parametrize("tiles", [0, 33])
def test_an_impossible_tile_count_is_refused(tiles: int):
    from usema.errors import UsemaError

    with pytest.raises(UsemaError, match="--tiles"):
        demos.nuclei_tiles(tiles)


def test_brain_heldout_slices_are_the_slab_one_case_per_slice_in_place(tmp_path):
    """`usema compare` on demo_brain needs cases: each held-out slice is one, where it lies in the template."""
    import nibabel as nib
    import numpy as np

    from usema.data import demos

    out = tmp_path / "slab"
    assert main(["datasets", "export-demo", "brain", "--heldout-slices", "--output", str(out)]) == 0
    brain = demos.load_brain()
    start, stop = demos.BRAIN_VAL_SLAB
    images = sorted((out / "imagesTs").iterdir())
    assert [p.name for p in images] == [f"mni152_z{z:03d}_0000.nii.gz" for z in range(start, stop)]
    z = start + 3
    image = nib.load(out / "imagesTs" / f"mni152_z{z:03d}_0000.nii.gz")
    label = nib.load(out / "labelsTs" / f"mni152_z{z:03d}.nii.gz")
    np.testing.assert_array_equal(np.asarray(image.dataobj)[..., 0], brain.t1[..., z])
    np.testing.assert_array_equal(np.asarray(label.dataobj)[..., 0], brain.label[..., z])
    # voxel (i, j, 0) of the case is voxel (i, j, z) of the template in world coordinates
    np.testing.assert_allclose(image.affine @ [10, 20, 0, 1], brain.affine @ [10, 20, z, 1])
    assert main(["datasets", "export-demo", "nuclei", "--heldout-slices", "--output", str(tmp_path / "n")]) == 2
