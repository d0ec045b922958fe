"""Cross-validation folds: deterministic, disjoint, covering; nnU-Net's splits_final.json read and written."""

from __future__ import annotations

import json
import shutil

import pytest
from synthetic_data import make_volume_dataset

from usema.config import load_recipe
from usema.data import prepare_data
from usema.data.splits import SPLITS_FILE, make_folds, read_splits
from usema.errors import UsemaError

NAMES = [f"case_{i:03d}" for i in range(23)]


def test_folds_are_deterministic_disjoint_and_cover_every_case():
    folds = make_folds(list(reversed(NAMES)))
    assert folds == make_folds(NAMES)  # a pure function of the set of names
    vals = [set(f["val"]) for f in folds]
    assert len(folds) == 5 and sorted(len(v) for v in vals) == [4, 4, 5, 5, 5]
    assert set().union(*vals) == set(NAMES) and sum(map(len, vals)) == len(NAMES)  # each case validated once
    for fold in folds:
        assert set(fold["train"]) == set(NAMES) - set(fold["val"])
    assert make_folds(NAMES, seed=1) != folds


def test_too_few_cases_for_five_folds_is_refused():
    with pytest.raises(UsemaError, match="train.fold: 5-fold cross-validation needs at least 5 training cases"):
        make_folds(NAMES[:4])


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{}", "expected a non-empty list"),
        ('[{"train": ["case_000"]}]', "fold 0: expected exactly the keys 'train' and 'val'"),
        ('[{"train": ["case_000"], "val": "case_001"}]', "fold 0.val: expected a list of case names"),
        ('[{"train": ["case_000"], "val": ["nobody"]}]', r"fold 0.val: cases \['nobody'\] are not training cases"),
        ('[{"train": ["case_000"], "val": ["case_000"]}]', "fold 0: a case is in both 'train' and 'val'"),
        ("[{", "expected JSON"),
    ],
)
def test_malformed_splits_files_are_refused(tmp_path, content, expected):
    path = tmp_path / SPLITS_FILE
    path.write_text(content)
    with pytest.raises(UsemaError, match=expected):
        read_splits(path, NAMES)


@pytest.fixture(scope="module")
def six_case_dataset(tmp_path_factory):
    return make_volume_dataset(tmp_path_factory.mktemp("raw"), n_cases=6, name="Dataset799_Folds")


def recipe(root, fold):
    return load_recipe("flare22_small", [f"data.root={root}", f"train.fold={fold}", "data.labels=null",
                                         "model.preset=tiny", "data.patch_size=[64, 64]"])


def test_a_fold_trains_on_its_train_cases_and_validates_on_its_val_cases(six_case_dataset, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(six_case_dataset, root)
    data = prepare_data(recipe(root, 2), tmp_path / "run")
    written = json.loads((root / SPLITS_FILE).read_text())  # created beside dataset.json, nnU-Net's format
    assert [set(f) for f in written] == [{"train", "val"}] * 5
    assert [c["name"] for c in data.val_cases] == written[2]["val"]
    assert {c.name for c in data.train_dataset.cases} == set(written[2]["train"])


def test_an_existing_nnunet_splits_file_is_used_as_it_is(six_case_dataset, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(six_case_dataset, root)
    names = [f"case_{i:03d}" for i in range(6)]
    nnunet_splits = [{"train": names[2:], "val": names[:2]}, {"train": names[:2] + names[3:], "val": names[2:3]}]
    (root / SPLITS_FILE).write_text(json.dumps(nnunet_splits))
    data = prepare_data(recipe(root, 1), tmp_path / "run")
    assert [c["name"] for c in data.val_cases] == ["case_002"]
    with pytest.raises(UsemaError, match=r"train.fold: expected 0..1 or 'all'"):
        prepare_data(recipe(root, 4), tmp_path / "run")


def test_fold_all_trains_on_every_case(six_case_dataset, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(six_case_dataset, root)
    data = prepare_data(recipe(root, "all"), tmp_path / "run")
    assert len(data.train_dataset.cases) == 6 and len(data.val_cases) == 6


def test_a_read_only_dataset_keeps_its_splits_in_the_run(six_case_dataset, tmp_path, monkeypatch):
    from usema.data import splits

    root = tmp_path / "ds"
    shutil.copytree(six_case_dataset, root)
    real = splits.atomic_write_text

    def read_only_dataset(path, text):
        if path.parent == root:
            raise UsemaError(f"{path}: could not write the result (Read-only file system)")
        return real(path, text)

    monkeypatch.setattr(splits, "atomic_write_text", read_only_dataset)
    prepare_data(recipe(root, 0), tmp_path / "run")
    assert not (root / SPLITS_FILE).exists() and (tmp_path / "run" / SPLITS_FILE).is_file()


def test_folds_are_refused_for_the_demos():
    with pytest.raises(UsemaError, match="train.fold: expected null for the demo datasets"):
        load_recipe("demo_brain", ["train.fold=0"])


def test_every_fold_normalises_with_the_ct_statistics_of_all_training_cases(six_case_dataset, tmp_path):
    """As nnU-Net's fingerprint: one set of CT statistics for the whole dataset, so that the folds' ensemble
    sees one normalisation. Checked against the percentiles of every case's foreground, read here directly."""
    import nibabel as nib
    import numpy as np

    root = tmp_path / "ds"
    shutil.copytree(six_case_dataset, root)
    assert recipe(root, 0).data.normalization == "ct"
    stats = [prepare_data(recipe(root, k), tmp_path / f"run{k}").norm_stats for k in (0, 3)]
    assert stats[0] == stats[1]
    foreground = []
    for i in range(6):  # the volumes are far below the sampling budget: every foreground voxel is in the sample
        image = np.asarray(nib.load(root / "imagesTr" / f"case_{i:03d}_0000.nii.gz").dataobj, dtype=np.float64)
        label = np.asarray(nib.load(root / "labelsTr" / f"case_{i:03d}.nii.gz").dataobj)
        foreground.append(image[label > 0])
    values = np.concatenate(foreground)
    np.testing.assert_allclose([stats[0]["lower"], stats[0]["upper"], stats[0]["mean"], stats[0]["std"]],
                               [*np.percentile(values, [0.5, 99.5]), values.mean(), values.std()], rtol=1e-9)
