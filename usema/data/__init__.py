"""Datasets (demo brain / nuclei, nnU-Net raw), normalisation and training patch pipelines.

``prepare_data(recipe, work_dir) -> PreparedData`` is the interface the trainer uses. It is loaded on first
use (PEP 562) because the patch pipeline imports MONAI's transforms, which would slow every CLI start-up.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["PreparedData", "prepare_data", "split_cases"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("usema.data.prepare"), name)
    raise AttributeError(f"module 'usema.data' has no attribute {name!r}")
