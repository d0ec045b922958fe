"""Shared fixtures: tiny synthetic nnU-Net datasets (see ``synthetic_data.py``), built once per session.

Tests that modify a dataset must copy it first (``shutil.copytree``); the session fixtures are shared.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `from synthetic_data import ...` from any test file

from synthetic_data import make_png_dataset, make_volume_dataset  # noqa: E402


@pytest.fixture(scope="session")
def ct_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dataset701_AbdomenCT: 4 training + 1 test CT volumes (48, 40, 12), 3 organs, real affine."""
    return make_volume_dataset(tmp_path_factory.mktemp("raw"), modality="CT")


@pytest.fixture(scope="session")
def mr_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dataset702_AbdomenMR: like ``ct_dataset`` with MR intensities and 2 channels (_0000, _0001)."""
    return make_volume_dataset(tmp_path_factory.mktemp("raw"), modality="MR", channels=2)


@pytest.fixture(scope="session")
def png_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dataset703_NeurIPSCell: 4 training + 1 test RGB PNGs (64, 48), classes background/interior/boundary."""
    return make_png_dataset(tmp_path_factory.mktemp("raw"))
