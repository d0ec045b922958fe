"""Class lists: parsed from flags and dataset.json, and a recipe's ``data.labels`` checked against its dataset.

``usema train`` and ``usema evaluate`` both refuse a recipe whose classes disagree with the dataset's own
``dataset.json`` (values, and names up to case, ``_``, ``-`` and spaces), so that a per-class rule can never
land on the wrong class without a word.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from usema.errors import UsemaError
from usema.evaluation.protocols import normalize_name


def parse_labels(items: list[str]) -> dict[int, str]:
    """``["1=liver", "2=spleen"]`` -> ``{1: "liver", 2: "spleen"}``."""
    labels = {}
    for item in items:
        value, sep, name = item.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise UsemaError(f"--labels: expected VALUE=NAME with an integer VALUE, got {item!r}")
        labels[int(value)] = name.strip()
    return labels


def labels_from_mapping(raw: Any, source: str) -> dict[int, str]:
    """Class names from ``{value: name}`` (nnU-Net v1) or ``{name: value}`` (nnU-Net v2)."""
    if not isinstance(raw, dict) or not raw:
        raise UsemaError(f"{source}: expected a mapping of label values and names")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):  # nnU-Net v2 {name: value}
        labels = {v: str(k) for k, v in raw.items()}
    elif all(str(k).strip().isdigit() for k in raw):  # {value: name}, keys possibly strings (JSON)
        labels = {int(k): str(v) for k, v in raw.items()}
    else:
        raise UsemaError(f"{source}: expected {{value: name}} or {{name: value}} with integer values (no regions)")
    if min(labels) < 0:
        raise UsemaError(f"{source}: expected label values >= 0, got {min(labels)}")
    return labels


def find_dataset_json(truth_dir: Path) -> Path | None:
    """nnU-Net layout: dataset.json in the reference folder or its parent (DatasetXXX/labelsTr)."""
    return next((p for p in (truth_dir / "dataset.json", truth_dir.parent / "dataset.json") if p.is_file()), None)


def labels_from_dataset_json(path: Path) -> dict[int, str]:
    """The ``labels`` entry of a dataset.json, as ``{value: name}`` (background included)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsemaError(f"{path}: expected a readable JSON file ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or "labels" not in data:
        raise UsemaError(f"{path}: expected a 'labels' entry")
    return labels_from_mapping(data["labels"], f"{path} labels")


def check_recipe_labels(recipe_labels: Mapping[int, str] | None, recipe: str, dataset_json: Path) -> None:
    """Refuse ``data.labels`` that differ from ``dataset_json``'s classes (no check without either)."""
    if recipe_labels is None or not dataset_json.is_file():
        return
    dataset = labels_from_dataset_json(dataset_json)
    for value in sorted(set(recipe_labels) | set(dataset)):
        ours, theirs = recipe_labels.get(value), dataset.get(value)
        if ours is None or theirs is None or normalize_name(ours) != normalize_name(theirs):
            raise UsemaError(
                f"{recipe}: data.labels has {value}={ours!r} but {dataset_json} has {value}={theirs!r}; "
                "expected the dataset's classes, names and order"
            )
