"""The scoring protocols' definitions: names, the FLARE22 organ table, label-order checks (SPEC §5).

How each protocol scores a case is ``usema.evaluation.scoring``; docs/evaluation.md states every rule.

- ``flare22`` / ``amos`` (abdomen CT / MR): organs by label *index* in FLARE22 order, tolerances and the
  slice rule from the table below, DSC and DeepMind NSD at the header spacing.
- ``endovis17``: per frame, the classes present in the truth or the prediction; NSD on the frame as a
  one-slice 3D volume of spacing (1, 1, 1) at tolerance 2.
- ``neurips_cell``: instance F1 against the dataset's instance masks (``usema.evaluation.cells``).
- ``generic``: every class of the label list, MONAI DSC / NSD / HD95 (``usema.evaluation.metrics``).

"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from usema.errors import UsemaError

PROTOCOLS = ("flare22", "amos", "endovis17", "neurips_cell", "generic")
ABDOMEN_PROTOCOLS = ("flare22", "amos")


@dataclass(frozen=True)
class Organ:
    """One FLARE22 organ: label index, name, NSD tolerance (mm), names a dataset.json may use for it."""

    index: int
    name: str
    tolerance_mm: float
    aliases: tuple[str, ...] = ()


# FLARE22 label order (SPEC §5); both abdomen benchmarks (701 CT, 702 MR) use it
FLARE22_ORGANS = (
    Organ(1, "liver", 5.0),
    Organ(2, "right kidney", 3.0, ("kidney right", "rk")),
    Organ(3, "spleen", 3.0),
    Organ(4, "pancreas", 5.0),
    Organ(5, "aorta", 2.0),
    Organ(6, "ivc", 2.0, ("inferior vena cava", "postcava")),
    Organ(7, "right adrenal gland", 2.0, ("right adrenal", "adrenal gland right", "rag")),
    Organ(8, "left adrenal gland", 2.0, ("left adrenal", "adrenal gland left", "lag")),
    Organ(9, "gallbladder", 2.0, ("gall bladder",)),
    Organ(10, "esophagus", 3.0, ("oesophagus",)),
    Organ(11, "stomach", 5.0),
    Organ(12, "duodenum", 7.0),
    Organ(13, "left kidney", 3.0, ("kidney left", "lk")),
)
# scored only on the reference's labelled axial slices z_first..z_last-1 (their annotated length is arbitrary)
SLICE_RULE_ORGANS = frozenset({5, 6, 10})
AXIAL_AXIS = 2  # nibabel voxel axis k
ENDOVIS_TOLERANCE = 2.0
ENDOVIS_SPACING = (1.0, 1.0, 1.0)  # a frame is scored as a one-slice 3D volume


def normalize_name(name: str) -> str:
    """Case, ``_`` and ``-`` ignored: ``Right_Kidney`` and ``right kidney`` are one name."""
    return re.sub(r"[\s_\-]+", " ", str(name).strip().lower())


def organ_named(organ: Organ, name: str) -> bool:
    """Whether a label name denotes ``organ`` (its name or one of its listed spellings)."""
    return normalize_name(name) in {organ.name, *organ.aliases}


def check_flare22_order(labels: Mapping[int, str], source: str) -> None:
    """Refuse a label list that is not FLARE22's organ order (the abdomen protocols score by index)."""
    for organ in FLARE22_ORGANS:
        name = labels.get(organ.index)
        if name is None or not organ_named(organ, name):
            raise UsemaError(
                f"{source}: label {organ.index} is {name!r}, but the abdomen protocols score label "
                f"{organ.index} as {organ.name!r} (FLARE22 order; see docs/evaluation.md)"
            )
    extra = sorted(set(labels) - {0} - {o.index for o in FLARE22_ORGANS})
    if extra:
        raise UsemaError(f"{source}: labels {extra} are outside the 13 FLARE22 organs the abdomen protocols score")


