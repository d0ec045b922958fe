"""Cross-validation folds in nnU-Net's ``splits_final.json`` format, shared with nnU-Net runs of a dataset.

The file is a JSON list with one ``{"train": [case, ...], "val": [case, ...]}`` entry per fold. When the dataset
folder already holds one (written by nnU-Net or by an earlier usema run) it is used as it is; otherwise usema
writes one: the sorted case names shuffled with seed 12345 and cut into 5 folds of near-equal size (so every
case is validated exactly once). Splits are by case: all of a case's slices fall in one fold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from usema.errors import UsemaError
from usema.io.files import atomic_write_text, read_input_text

SPLITS_FILE = "splits_final.json"
NUM_FOLDS = 5
SPLIT_SEED = 12345
MAX_SPLITS_BYTES = 16 << 20


def make_folds(names: list[str], num_folds: int = NUM_FOLDS, seed: int = SPLIT_SEED) -> list[dict[str, list[str]]]:
    """``num_folds`` disjoint validation sets covering ``names``; each fold trains on the rest."""
    names = sorted(names)
    if len(names) < num_folds:
        raise UsemaError(f"train.fold: {num_folds}-fold cross-validation needs at least {num_folds} training cases, "
                         f"the dataset has {len(names)}")
    order = np.random.default_rng(seed).permutation(len(names))
    folds = []
    for part in np.array_split(order, num_folds):
        val = sorted(names[i] for i in part)
        folds.append({"train": [n for n in names if n not in set(val)], "val": val})
    return folds


def read_splits(path: Path, names: list[str]) -> list[dict[str, list[str]]]:
    """The folds in ``path``, checked: a list of {"train", "val"} lists of known, disjoint case names."""
    try:
        folds = json.loads(read_input_text(path, MAX_SPLITS_BYTES, what="splits file"))
    except ValueError as exc:
        raise UsemaError(f"{path}: expected JSON ({' '.join(str(exc).split())})") from None
    known = set(names)
    if not isinstance(folds, list) or not folds:
        raise UsemaError(f"{path}: expected a non-empty list of {{\"train\": [...], \"val\": [...]}} folds")
    for k, fold in enumerate(folds):
        if not isinstance(fold, dict) or set(fold) != {"train", "val"}:
            raise UsemaError(f"{path}: fold {k}: expected exactly the keys 'train' and 'val'")
        for key in ("train", "val"):
            cases = fold[key]
            if not isinstance(cases, list) or not all(isinstance(c, str) for c in cases):
                raise UsemaError(f"{path}: fold {k}.{key}: expected a list of case names")
            unknown = sorted(set(cases) - known)
            if unknown:
                raise UsemaError(f"{path}: fold {k}.{key}: cases {unknown[:5]} are not training cases of the dataset")
        if set(fold["train"]) & set(fold["val"]):
            raise UsemaError(f"{path}: fold {k}: a case is in both 'train' and 'val'")
        if not fold["train"]:
            raise UsemaError(f"{path}: fold {k}.train: expected at least one case")
    return [{"train": sorted(f["train"]), "val": sorted(f["val"])} for f in folds]


def load_or_create_splits(dataset_root: Path, names: list[str], fallback_dir: Path) -> tuple[list[dict], Path]:
    """(folds, file): the dataset's ``splits_final.json``, created there when missing (or, when the dataset
    folder is read-only, in ``fallback_dir``)."""
    for folder in (dataset_root, fallback_dir):
        path = folder / SPLITS_FILE
        if os.path.lexists(path):
            return read_splits(path, names), path
    folds = make_folds(names)
    text = json.dumps(folds, indent=1) + "\n"
    try:
        atomic_write_text(dataset_root / SPLITS_FILE, text)
        return folds, dataset_root / SPLITS_FILE
    except UsemaError:  # a read-only dataset (a mounted archive): keep the splits with the run
        atomic_write_text(fallback_dir / SPLITS_FILE, text)
        return folds, fallback_dir / SPLITS_FILE


def fold_cases(folds: list[dict], fold: int | str, source: Path) -> tuple[list[str], list[str]]:
    """(train, val) case names of ``fold`` (an index, or "all": train on every case, validate on them too)."""
    if fold == "all":
        every = sorted({c for f in folds for c in f["train"] + f["val"]})
        return every, every
    if not 0 <= int(fold) < len(folds):
        raise UsemaError(f"train.fold: expected 0..{len(folds) - 1} or 'all' ({source} has {len(folds)} folds), "
                         f"got {fold}")
    return folds[int(fold)]["train"], folds[int(fold)]["val"]
