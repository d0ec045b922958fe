"""nnU-Net's post-processing: keep the largest connected component, of all foreground and/or per class.

The decision (which steps to apply) is chosen by ``usema cv`` on the cross-validation predictions and stored
as JSON in the cv directory; ``usema infer`` applies it to the ensemble's label maps. MONAI's
``KeepLargestConnectedComponent`` does the work (full connectivity, as ``skimage.measure.label``'s default).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent

from usema.errors import UsemaError
from usema.io.files import atomic_write_text, read_input_text

MAX_DECISION_BYTES = 1 << 20


@dataclass
class Postprocessing:
    """Which steps to apply: LCC of all foreground as one object, then LCC of each class in ``per_class``.

    ``scores`` records the mean Dice that justified the choice (written for the reader, never read back).
    """

    all_foreground: bool = False
    per_class: list[int] = field(default_factory=list)
    scores: dict = field(default_factory=dict)

    @property
    def is_identity(self) -> bool:
        return not self.all_foreground and not self.per_class


def keep_largest_foreground(labels: np.ndarray, foreground: list[int]) -> np.ndarray:
    """Labels with every foreground voxel outside the largest component of the union of ``foreground`` set to 0."""
    if not foreground:
        return labels
    keep = KeepLargestConnectedComponent(applied_labels=foreground, is_onehot=False, independent=False)
    return _apply(keep, labels)


def keep_largest_of_class(labels: np.ndarray, value: int) -> np.ndarray:
    """Labels with the voxels of class ``value`` outside its largest component set to 0."""
    return _apply(KeepLargestConnectedComponent(applied_labels=[value], is_onehot=False), labels)


def _apply(keep: KeepLargestConnectedComponent, labels: np.ndarray) -> np.ndarray:
    # a copy: the transform zeroes the removed voxels in the tensor it is given, which would share ``labels``
    out = keep(torch.from_numpy(labels.copy())[None])
    return np.asarray(out[0]).astype(labels.dtype, copy=False)


def postprocess(labels: np.ndarray, decision: Postprocessing, foreground: list[int]) -> np.ndarray:
    """Apply ``decision`` to a label map whose foreground classes are ``foreground``."""
    if decision.all_foreground:
        labels = keep_largest_foreground(labels, foreground)
    for value in decision.per_class:
        labels = keep_largest_of_class(labels, value)
    return labels


def write_decision(path: Path, decision: Postprocessing) -> None:
    atomic_write_text(path, json.dumps(asdict(decision), indent=2) + "\n")


def read_decision(path: Path) -> Postprocessing:
    """The decision stored at ``path``, checked key by key."""
    try:
        raw = json.loads(read_input_text(path, MAX_DECISION_BYTES, what="post-processing file"))
    except ValueError as exc:
        raise UsemaError(f"{path}: expected JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("all_foreground"), bool):
        raise UsemaError(f"{path}: all_foreground: expected true or false")
    per_class = raw.get("per_class")
    if not isinstance(per_class, list) or not all(isinstance(v, int) and v > 0 for v in per_class):
        raise UsemaError(f"{path}: per_class: expected a list of foreground label values")
    return Postprocessing(raw["all_foreground"], per_class, raw.get("scores") or {})
