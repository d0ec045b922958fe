"""nnU-Net v2 raw datasets: ``DatasetXXX_Name/{imagesTr,labelsTr,imagesTs}/`` + ``dataset.json``.

Cases are ``CASE_0000<ending>`` (+ ``_0001``... for further channels) with labels ``labelsTr/CASE<ending>``;
a 2D RGB case is one 3-channel PNG. ``dataset.json`` may instead list files explicitly under ``"dataset"``
(paths relative to the dataset folder). Everything found wrong is reported as a one-line problem naming
the file: training raises the first one, ``usema datasets check`` lists them all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from usema.errors import UsemaError
from usema.io.arrays import blocks
from usema.io.files import read_input_text
from usema.io.images import SUFFIXES, image_suffix, read_image, split_channel
from usema.io.labels import Geometry, geometry_spacing, read_label, same_grid

REQUIRED_JSON_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
# a class value beyond this is a corrupt or hostile dataset.json (it would build a network with that many outputs)
MAX_CLASSES = 1000
# dataset.json lists cases, not data: a larger file is refused before it is read whole
MAX_JSON_BYTES = 64 << 20
# labels up to this value are counted with bincount (fast); larger ones are refused, found with unique
BINCOUNT_MAX = 1 << 16


@dataclass
class NnunetCase:
    """One case: image files in channel order and its label file (None for imagesTs cases)."""

    name: str
    images: list[Path]
    label: Path | None = None


@dataclass
class NnunetDataset:
    """What the folder and dataset.json declare, plus the structural problems found while listing it."""

    root: Path
    channel_names: dict[int, str]
    labels: dict[int, str]
    file_ending: str
    num_training: int | None
    train: list[NnunetCase] = field(default_factory=list)
    test: list[NnunetCase] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    listed: int = 0  # training cases found (with or without a usable label)


@dataclass
class LoadedCase:
    """A decoded case: image (C, *spatial) float32, label (*spatial) int64 or None, and the image grid."""

    name: str
    image: np.ndarray
    label: np.ndarray | None
    geometry: Geometry


def resolve_root(root: str | Path) -> Path:
    """A dataset folder: absolute, or relative to ``$nnUNet_raw`` when set, else to the current directory."""
    path = Path(root).expanduser()
    if not path.is_absolute() and os.environ.get("nnUNet_raw"):
        path = Path(os.environ["nnUNet_raw"]) / path
    if not path.is_dir():
        raise UsemaError(f"{path}: no such dataset folder (a relative path is looked up in $nnUNet_raw when set)")
    return path


def read_dataset_json(root: Path) -> dict:
    """``root/dataset.json`` as a dict with the required keys: a regular file of at most MAX_JSON_BYTES."""
    path = root / "dataset.json"
    if not os.path.lexists(path):
        raise UsemaError(f"{path}: missing (nnU-Net datasets need channel_names, labels, numTraining, file_ending)")
    try:
        meta = json.loads(read_input_text(path, MAX_JSON_BYTES, what="dataset.json"))
    except json.JSONDecodeError as exc:
        raise UsemaError(f"{path}: expected valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise UsemaError(f"{path}: expected a JSON object")
    missing = [k for k in REQUIRED_JSON_KEYS if k not in meta]
    if missing:
        raise UsemaError(f"{path}: missing key(s) {', '.join(missing)}")
    return meta


def _parse_labels(meta: dict, where: str) -> dict[int, str]:
    if not isinstance(meta["labels"], dict):
        raise UsemaError(f"{where}: labels: expected a mapping of class names to values {{\"background\": 0, ...}}, "
                         f"got a {type(meta['labels']).__name__}")
    labels = {}
    for name, value in meta["labels"].items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsemaError(f"{where}: labels.{name}: expected an integer class (region-based labels are unsupported)")
        if not 0 <= value < MAX_CLASSES:
            raise UsemaError(f"{where}: labels.{name}: expected a class value 0..{MAX_CLASSES - 1}, got {value}")
        labels[value] = str(name)
    if 0 not in labels:
        raise UsemaError(f"{where}: labels: expected a background class with value 0")
    return dict(sorted(labels.items()))


def _parse_channels(meta: dict, where: str) -> dict[int, str]:
    try:
        channels = {int(k): str(v) for k, v in meta["channel_names"].items()}
    except (AttributeError, ValueError):
        raise UsemaError(f"{where}: channel_names: expected a mapping {{\"0\": \"CT\", ...}}") from None
    if sorted(channels) != list(range(len(channels))) or not channels:
        raise UsemaError(f"{where}: channel_names: expected keys 0..N-1, got {sorted(channels)}")
    return channels


def _inside(root: Path, relative: str, where: str) -> Path:
    """``root/relative``, refusing absolute paths and ``..`` that leave the dataset folder."""
    joined = os.path.normpath(os.path.join(root, relative))
    if os.path.isabs(relative) or os.path.commonpath([joined, os.path.normpath(root)]) != os.path.normpath(root):
        raise UsemaError(f"{where}: {relative}: path escapes the dataset folder {root}")
    return Path(joined)


def _group_folder(folder: Path, ending: str, problems: list[str]) -> dict[str, list[Path]]:
    """Case name -> channel files of ``CASE_XXXX<ending>`` files in ``folder`` (gaps reported)."""
    groups: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.name.startswith(".") or not path.name.endswith(ending):
            continue
        case, channel = split_channel(path.name[: -len(ending)])
        if channel is None:
            problems.append(f"{path}: expected the nnU-Net name CASE_XXXX{ending} (channel index)")
            continue
        groups.setdefault(case, {})[channel] = path
    cases = {}
    for name, channels in groups.items():
        if sorted(channels) != list(range(len(channels))):
            problems.append(f"{folder}/{name}_*{ending}: channels {sorted(channels)} are not 0..N-1")
            continue
        cases[name] = [channels[c] for c in sorted(channels)]
    return cases


def _cases_from_folders(ds: NnunetDataset) -> None:
    images = _group_folder(ds.root / "imagesTr", ds.file_ending, ds.problems)
    ds.listed = len(images)
    labels_dir = ds.root / "labelsTr"
    for name, paths in sorted(images.items()):
        label = labels_dir / f"{name}{ds.file_ending}"
        if not os.path.lexists(label):  # present but not a regular file: refused (and reported) when read
            ds.problems.append(f"{label}: missing label for training image {paths[0].name}")
            continue
        ds.train.append(NnunetCase(name, paths, label))
    if labels_dir.is_dir():
        for label in sorted(labels_dir.glob(f"*{ds.file_ending}")):
            if not label.name.startswith(".") and label.name[: -len(ds.file_ending)] not in images:
                ds.problems.append(f"{label}: label without a training image in imagesTr")
    for name, paths in sorted(_group_folder(ds.root / "imagesTs", ds.file_ending, ds.problems).items()):
        label = ds.root / "labelsTs" / f"{name}{ds.file_ending}"  # optional test labels (usema evaluate)
        ds.test.append(NnunetCase(name, paths, label if os.path.lexists(label) else None))


def _cases_from_json(ds: NnunetDataset, listing: dict, where: str) -> None:
    """nnU-Net's explicit ``"dataset": {case: {"images": [...], "label": ...}}`` listing."""
    if not isinstance(listing, dict):
        raise UsemaError(f"{where}: dataset: expected a mapping of case names to files")
    ds.listed = len(listing)
    for name, entry in sorted(listing.items()):
        try:
            images = [_inside(ds.root, p, where) for p in entry["images"]]
            label = _inside(ds.root, entry["label"], where)
        except (KeyError, TypeError):
            ds.problems.append(f"{where}: dataset.{name}: expected {{\"images\": [...], \"label\": ...}}")
            continue
        except UsemaError as exc:
            ds.problems.append(str(exc))
            continue
        missing = [p for p in [*images, label] if not os.path.lexists(p)]
        if missing:
            ds.problems.append(f"{missing[0]}: missing file listed for case {name} in dataset.json")
            continue
        ds.train.append(NnunetCase(name, images, label))


def scan_dataset(root: str | Path) -> NnunetDataset:
    """List a dataset folder's cases and the problems visible without decoding images.

    Raises UsemaError when the folder or dataset.json itself is unusable.
    """
    root = resolve_root(root)
    meta = read_dataset_json(root)
    where = str(root / "dataset.json")
    num_training = meta["numTraining"]
    ending = meta["file_ending"]
    if not isinstance(ending, str) or image_suffix(f"x{ending}") != ending.lower():
        raise UsemaError(f"{where}: file_ending: expected one of {', '.join(SUFFIXES)}, got {ending!r}")
    ds = NnunetDataset(root, _parse_channels(meta, where), _parse_labels(meta, where), ending,
                       num_training if isinstance(num_training, int) else None)
    if "dataset" in meta:
        _cases_from_json(ds, meta["dataset"], where)
    else:
        _cases_from_folders(ds)
    if not ds.train and not ds.test:
        ds.problems.append(f"{root / 'imagesTr'}: expected cases named CASE_0000{ending} (dataset.json file_ending), "
                           "found none (nor in imagesTs)")
    if ds.num_training != ds.listed:
        ds.problems.append(f"{where}: numTraining is {num_training!r} but the dataset holds {ds.listed} training cases")
    return ds


def present_values(label: np.ndarray) -> list[int]:
    """Sorted distinct values of an integer label map.

    Small non-negative values are counted block by block with bincount (much faster than unique, and without a
    full-size int64 temporary); anything else falls back to unique.
    """
    if label.size == 0:
        return []
    low, high = int(label.min()), int(label.max())
    if low < 0 or high > BINCOUNT_MAX:
        return np.unique(label).tolist()
    seen = np.zeros(high + 1, bool)
    for block in blocks(label):
        seen |= np.bincount(block.reshape(-1), minlength=high + 1) > 0
    return np.flatnonzero(seen).tolist()


def load_case(ds: NnunetDataset, case: NnunetCase, labels: dict[int, str] | None = None) -> LoadedCase:
    """Decode and validate one case against the dataset: channel count, image/label grid and label values.

    ``labels`` (default ``ds.labels``) are the allowed classes. Raises UsemaError naming the offending file.
    """
    image, geometry = read_image(case.images)
    expected = len(ds.channel_names)
    if image.shape[0] != expected:
        raise UsemaError(f"{case.images[0]}: expected {expected} channel(s) (dataset.json channel_names), "
                         f"got {image.shape[0]}")
    if case.label is None:
        return LoadedCase(case.name, image, None, geometry)
    label, label_geometry = read_label(case.label)
    if tuple(label.shape) != tuple(image.shape[1:]):
        raise UsemaError(f"{case.label}: expected the image's shape {tuple(image.shape[1:])}, got {label.shape}")
    if not same_grid(geometry, label_geometry):
        raise UsemaError(f"{case.label}: expected the same affine (voxel-to-world) as {case.images[0].name}")
    allowed = labels if labels is not None else ds.labels
    top = max(allowed)
    if label.min() < 0 or label.max() > top:  # found without counting up to a huge value
        outside = np.unique(label[(label < 0) | (label > top)])
        raise UsemaError(f"{case.label}: label values {outside[:10].tolist()} are not among the classes "
                         f"{sorted(allowed)}")
    extra = sorted(set(present_values(label)) - set(allowed))
    if extra:
        raise UsemaError(f"{case.label}: label values {extra} are not among the classes {sorted(allowed)}")
    return LoadedCase(case.name, image, label, geometry)


@dataclass
class CaseSummary:
    """What ``usema datasets check`` reports per case."""

    name: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    channels: int
    label_values: list[int]


def check_dataset(root: str | Path, labels: dict[int, str] | None = None) -> tuple[NnunetDataset, list[CaseSummary]]:
    """Scan and decode every training case, appending each problem to ``ds.problems``; returns the summaries."""
    ds = scan_dataset(root)
    summaries = []
    for case in ds.train + ds.test:
        try:
            loaded = load_case(ds, case, labels)
        except UsemaError as exc:
            ds.problems.append(str(exc))
            continue
        values = present_values(loaded.label) if loaded.label is not None else []
        summaries.append(CaseSummary(case.name, tuple(loaded.image.shape[1:]), geometry_spacing(loaded.geometry),
                                     loaded.image.shape[0], values))
    return ds, summaries
