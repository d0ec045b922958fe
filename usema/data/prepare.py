"""``prepare_data``: from a recipe to the training patch dataset and the full validation cases.

This is the one interface the trainer uses. Validation cases are whole images/volumes (3D stays 3D; the
trainer runs 2D networks slice-wise along ``data.slice_axis``).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from usema.config import Recipe
from usema.data import demos, nnunet
from usema.data.pipeline import PatchDataset, TrainCase, make_case
from usema.data.preprocess import CT_SAMPLE_BUDGET, CT_STATS_KEYS, foreground_sample, normalize, stats_from_samples
from usema.data.resample import resample_image, resample_labels, target_shape
from usema.data.splits import fold_cases, load_or_create_splits
from usema.errors import UsemaError
from usema.io.files import atomic_write_text
from usema.io.labels import geometry_spacing

NORM_STATS_FILE = "norm_stats.json"


@dataclass
class PreparedData:
    """What training needs from the data side.

    train_dataset[i] -> {"image": float32 (C, *patch), "label": float32 (1, *patch) class indices}; a pure
    function of (recipe.train.seed, i). val_cases: {"name", "image": float32 (C, *spatial) normalised,
    "label": integer (*spatial)}. labels includes 0: "background". norm_stats: CT stats or None.
    """

    train_dataset: torch.utils.data.Dataset
    val_cases: list[dict]
    labels: dict[int, str]
    in_channels: int
    norm_stats: dict | None


def _small_int(label: np.ndarray) -> np.ndarray:
    return label.astype(np.uint8 if label.max(initial=0) < 256 else np.int16, copy=False)


def _labels(recipe: Recipe, default: dict[int, str], where: str) -> dict[int, str]:
    """The recipe's ``data.labels`` when given (they must cover the dataset's classes), else ``default``."""
    labels = recipe.data.labels
    if labels is None:
        return dict(sorted(default.items()))
    missing = sorted(set(default) - set(labels))
    if missing:
        raise UsemaError(f"data.labels: expected every class of {where} {sorted(default)}, missing {missing}")
    return dict(sorted(labels.items()))


def _cached_stats(work_dir: Path, fingerprint: dict) -> dict | None:
    path = work_dir / NORM_STATS_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if saved.get("fingerprint") != fingerprint or any(k not in saved for k in CT_STATS_KEYS):
        return None
    return {k: float(saved[k]) for k in CT_STATS_KEYS}


def _save_stats(work_dir: Path, stats: dict, fingerprint: dict) -> None:
    atomic_write_text(work_dir / NORM_STATS_FILE, json.dumps({**stats, "fingerprint": fingerprint}, indent=2))


def _dataset_length(recipe: Recipe) -> int:
    t = recipe.train
    return t.epochs * t.iterations_per_epoch * t.batch_size


def _patch_dataset(recipe: Recipe, cases: list[TrainCase]) -> PatchDataset:
    d = recipe.data
    return PatchDataset(cases, d.patch_size, d.spatial_dims, d.slice_axis, d.fg_oversample,
                        recipe.train.seed, _dataset_length(recipe), augment=d.augmentation)


def _demo_stats(recipe: Recipe, image: np.ndarray, label: np.ndarray, work_dir: Path, name: str) -> dict | None:
    """CT stats of a demo's training region (only if a recipe asks for ct normalisation on a demo)."""
    if recipe.data.normalization != "ct":
        return None
    fingerprint = {"source": recipe.data.source, "cases": [name]}
    stats = _cached_stats(work_dir, fingerprint)
    if stats is None:
        rng = np.random.default_rng(recipe.train.seed)
        stats = stats_from_samples([foreground_sample(image, label, CT_SAMPLE_BUDGET, rng, name)])
        _save_stats(work_dir, stats, fingerprint)
    return stats


def _prepare_brain(recipe: Recipe, work_dir: Path) -> PreparedData:
    """Axial training slabs and the held-out slab z in [95, 115) of the whole-volume-normalised template."""
    demo = demos.load_brain()
    axis = 1 + demos.BRAIN_SLICE_AXIS
    train_idx = np.concatenate([np.arange(a, b) for a, b in demos.brain_train_ranges()])
    raw = demo.t1[None]
    stats = _demo_stats(recipe, np.take(raw, train_idx, axis=axis), np.take(demo.label, train_idx, axis=axis - 1),
                        work_dir, "mni152")
    image = normalize(raw, recipe.data.normalization, stats, "mni152")
    cases = [
        make_case(f"mni152_z{a}-{b}", image[..., a:b], demo.label[..., a:b]) for a, b in demos.brain_train_ranges()
    ]
    lo, hi = demos.BRAIN_VAL_SLAB
    val = [{"name": f"mni152_z{lo}-{hi}", "image": image[..., lo:hi].copy(), "label": demo.label[..., lo:hi].copy()}]
    labels = _labels(recipe, demos.BRAIN_LABELS, "demo_brain")
    return PreparedData(_patch_dataset(recipe, cases), val, labels, 1, stats)


def _prepare_nuclei(recipe: Recipe, work_dir: Path) -> PreparedData:
    """Columns 0..383 for training, 384..511 held out, of the whole-image-normalised nuclei image."""
    raw, instances = demos.load_nuclei()
    label = demos.instance_to_semantic(instances, recipe.data.target)
    split = demos.NUCLEI_VAL_COLUMN
    stats = _demo_stats(recipe, raw[None, :, :split], label[:, :split], work_dir, "nuclei")
    image = normalize(raw[None], recipe.data.normalization, stats, "nuclei")
    cases = [make_case("nuclei_train", image[..., :split], label[:, :split])]
    val = [{"name": "nuclei_val", "image": image[..., split:].copy(), "label": label[:, split:].copy()}]
    labels = _labels(recipe, demos.NUCLEI_LABELS[recipe.data.target], "demo_nuclei")
    return PreparedData(_patch_dataset(recipe, cases), val, labels, 1, stats)


def split_cases(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic hold-out: shuffle the sorted names with ``seed``; returns (train, val), each sorted.

    At least one validation case when ``val_fraction > 0`` and there are two or more cases.
    """
    names = sorted(names)
    n_val = min(max(round(val_fraction * len(names)), 1 if val_fraction > 0 else 0), len(names) - 1)
    order = np.random.default_rng(seed).permutation(len(names))
    val = {names[i] for i in order[:max(n_val, 0)]}
    return [n for n in names if n not in val], [n for n in names if n in val]


class _NnunetLoader:
    """Decodes and normalises one case on demand (picklable, for DataLoader workers when caching is off)."""

    def __init__(self, ds: nnunet.NnunetDataset, case: nnunet.NnunetCase, labels: dict, scheme: str,
                 stats: dict | None, target_spacing: list[float | None] | None) -> None:
        self.ds, self.case, self.labels, self.scheme, self.stats = ds, case, labels, scheme, stats
        self.target_spacing = target_spacing

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        loaded = nnunet.load_case(self.ds, self.case, self.labels)
        image = normalize(loaded.image, self.scheme, self.stats, self.case.name)
        image, label = at_target_spacing(image, loaded.label, loaded, self.target_spacing)
        return image, _small_int(label)


def at_target_spacing(image: np.ndarray | None, label: np.ndarray, loaded: nnunet.LoadedCase,
                      target: list[float | None] | None) -> tuple[np.ndarray | None, np.ndarray]:
    """(image, label) on the grid of ``loaded`` resampled to ``data.target_spacing`` (unchanged when it is null;
    an image of None stays None).

    As in nnU-Net, images are normalised on their own grid first and resampled after (so are they at inference).
    """
    if target is None:
        return image, label
    spacing = geometry_spacing(loaded.geometry)
    if len(spacing) != len(target):
        raise UsemaError(f"{loaded.name}: data.target_spacing has {len(target)} entries but the image has "
                         f"{len(spacing)} axes; expected one spacing per image axis")
    shape = target_shape(label.shape, spacing, target)
    kept = [a for a, t in enumerate(target) if t is None]
    image = None if image is None else resample_image(image, spacing, target)
    return image, resample_labels(label, shape, kept)


def _split(recipe: Recipe, root: Path, names: list[str], work_dir: Path) -> tuple[list[str], list[str]]:
    """(train, val) cases: the recipe's cross-validation fold, else the seeded ``val_fraction`` hold-out."""
    if recipe.train.fold is None:
        return split_cases(names, recipe.data.val_fraction, recipe.train.seed)
    folds, path = load_or_create_splits(root, names, work_dir)
    return fold_cases(folds, recipe.train.fold, path)


def _case_rng(recipe: Recipe, name: str) -> np.random.Generator:
    """The generator of one case's CT intensity sample: a function of (seed, case), not of the order the cases
    are read in, so every fold draws the same sample from the same case."""
    return np.random.default_rng([recipe.train.seed, zlib.crc32(name.encode())])


def _check_dims(recipe: Recipe, loaded: nnunet.LoadedCase, path: Path) -> None:
    image_dims = loaded.image.ndim - 1
    if recipe.data.spatial_dims > image_dims:
        raise UsemaError(f"{path}: data.spatial_dims is {recipe.data.spatial_dims} but the image is {image_dims}D")


def _prepare_nnunet(recipe: Recipe, work_dir: Path) -> PreparedData:
    d = recipe.data
    ds = nnunet.scan_dataset(d.root)
    if ds.problems:
        more = len(ds.problems) - 1
        hint = f" ({more} more problems; run: usema datasets check {ds.root})" if more else ""
        raise UsemaError(ds.problems[0] + hint)
    if not ds.train:
        raise UsemaError(f"{ds.root / 'imagesTr'}: expected training cases CASE_0000{ds.file_ending}, found none")
    labels = _labels(recipe, ds.labels, str(ds.root / "dataset.json"))
    by_name = {c.name: c for c in ds.train}
    train_names, val_names = _split(recipe, ds.root, list(by_name), work_dir)
    # nnU-Net takes the CT statistics from the fingerprint of all training cases, so every fold normalises alike
    # (and the folds' ensemble is consistent); a val_fraction hold-out keeps its validation cases out of them
    stats_names = sorted(by_name) if recipe.train.fold is not None else train_names
    fingerprint = {"root": str(ds.root.resolve()), "cases": stats_names}
    stats = _cached_stats(work_dir, fingerprint) if d.normalization == "ct" else None
    need_stats = d.normalization == "ct" and stats is None
    budget = max(1, CT_SAMPLE_BUDGET // len(stats_names))
    raw_cases, raw_val, samples = [], [], {}
    for name, is_val in [(n, False) for n in train_names] + [(n, True) for n in val_names]:  # fold "all": both
        loaded = nnunet.load_case(ds, by_name[name], labels)
        _check_dims(recipe, loaded, by_name[name].images[0])
        if need_stats and name in stats_names and name not in samples:  # on the image's own grid, as nnU-Net
            samples[name] = foreground_sample(loaded.image, loaded.label, budget, _case_rng(recipe, name), name)
        if is_val:
            raw_val.append(loaded)
            continue
        if not d.cache:
            loaded.image = None
        raw_cases.append(loaded)
    if need_stats:
        stats = stats_from_samples([samples[n] for n in sorted(samples)])
        _save_stats(work_dir, stats, fingerprint)
    cases = []
    while raw_cases:  # pop so that each raw volume is freed once normalised
        loaded = raw_cases.pop(0)
        loader = _NnunetLoader(ds, by_name[loaded.name], labels, d.normalization, stats, d.target_spacing)
        image = normalize(loaded.image, d.normalization, stats, loaded.name) if loaded.image is not None else None
        image, label = at_target_spacing(image, loaded.label, loaded, d.target_spacing)  # uncached: the label only
        cases.append(make_case(loaded.name, image, label, cache=d.cache, loader=loader))
    val_cases = []
    while raw_val:
        loaded = raw_val.pop(0)
        image = normalize(loaded.image, d.normalization, stats, loaded.name)
        image, label = at_target_spacing(image, loaded.label, loaded, d.target_spacing)
        val_cases.append({"name": loaded.name, "image": image, "label": _small_int(label)})
    in_channels = len(ds.channel_names)
    return PreparedData(_patch_dataset(recipe, cases), val_cases, labels, in_channels, stats)


def prepare_data(recipe: Recipe, work_dir: str | Path) -> PreparedData:
    """Load, check and normalise the recipe's dataset; CT statistics are cached in ``work_dir/norm_stats.json``.

    Raises UsemaError naming the file for any dataset problem.
    """
    work_dir = Path(work_dir)
    prepare = {"demo_brain": _prepare_brain, "demo_nuclei": _prepare_nuclei, "nnunet": _prepare_nnunet}
    return prepare[recipe.data.source](recipe, work_dir)
