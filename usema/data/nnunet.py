"""nnU-Net v2 raw datasets: ``DatasetXXX_Name/{imagesTr,labelsTr,imagesTs}/`` + ``dataset.json``.

Cases are ``CASE_0000<ending>`` (+ ``_0001``... for further channels) with labels ``labelsTr/CASE<ending>``;
a 2D RGB case is one 3-channel PNG. ``dataset.json`` may instead list files explicitly under ``"dataset"``
(paths relative to the dataset folder). Everything found wrong is reported as a one-line problem naming
the file: training raises the first one, ``usema datasets check`` lists them all.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from usema.io.labels import Geometry, geometry_spacing, read_case_image, read_label, same_grid
from usema.errors import UsemaError

REQUIRED_JSON_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


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


def _read_json(root: Path) -> dict:
    path = root / "dataset.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsemaError(f"{path}: missing (nnU-Net datasets need channel_names, labels, numTraining, file_ending)")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsemaError(f"{path}: expected valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise UsemaError(f"{path}: expected a JSON object")
    missing = [k for k in REQUIRED_JSON_KEYS if k not in meta]
    if missing:
        raise UsemaError(f"{path}: missing key(s) {', '.join(missing)}")
    return meta


def _parse_labels(meta: dict, where: str) -> dict[int, str]:
    labels = {}
    for name, value in meta["labels"].items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsemaError(f"{where}: labels.{name}: expected an integer class (region-based labels are unsupported)")
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
        match = _CHANNEL_RE.match(path.name[: -len(ending)])
        if match is None:
            problems.append(f"{path}: expected the nnU-Net name CASE_XXXX{ending} (channel index)")
            continue
        groups.setdefault(match["case"], {})[int(match["channel"])] = path
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
        if not label.is_file():
            ds.problems.append(f"{label}: missing label for training image {paths[0].name}")
            continue
        ds.train.append(NnunetCase(name, paths, label))
    if labels_dir.is_dir():
        for label in sorted(labels_dir.glob(f"*{ds.file_ending}")):
            if not label.name.startswith(".") and label.name[: -len(ds.file_ending)] not in images:
                ds.problems.append(f"{label}: label without a training image in imagesTr")
    for name, paths in sorted(_group_folder(ds.root / "imagesTs", ds.file_ending, ds.problems).items()):
        label = ds.root / "labelsTs" / f"{name}{ds.file_ending}"  # optional test labels (usema evaluate)
        ds.test.append(NnunetCase(name, paths, label if label.is_file() else None))


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
        missing = [p for p in [*images, label] if not p.is_file()]
        if missing:
            ds.problems.append(f"{missing[0]}: missing file listed for case {name} in dataset.json")
            continue
        ds.train.append(NnunetCase(name, images, label))


def scan_dataset(root: str | Path) -> NnunetDataset:
    """List a dataset folder's cases and the problems visible without decoding images.

    Raises UsemaError when the folder or dataset.json itself is unusable.
    """
    root = resolve_root(root)
    meta = _read_json(root)
    where = str(root / "dataset.json")
    num_training = meta["numTraining"]
    ending = meta["file_ending"]
    if not isinstance(ending, str) or not ending.startswith("."):
        raise UsemaError(f"{where}: file_ending: expected a suffix such as \".nii.gz\", got {ending!r}")
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
    """Sorted distinct values of an integer label map (bincount when non-negative: much faster than unique)."""
    if label.size and label.min() >= 0:
        return np.flatnonzero(np.bincount(label.reshape(-1))).tolist()
    return np.unique(label).tolist()


def load_case(ds: NnunetDataset, case: NnunetCase, labels: dict[int, str] | None = None) -> LoadedCase:
    """Decode and validate one case against the dataset: channel count, image/label grid and label values.

    ``labels`` (default ``ds.labels``) are the allowed classes. Raises UsemaError naming the offending file.
    """
    image, geometry = read_case_image(case.images)
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
