"""Checkpoint files: atomic writes, safe loads (``weights_only=True``) and one-line errors.

Checkpoint dict (docs/ARCHITECTURE.md): ``{"model", "network", "recipe", "norm_stats", "labels",
"epoch", "iteration", "best_metric", "optimizer", "scheduler", "scaler", "rng", "metrics"}``, where
``epoch``/``iteration`` name the next training step to run (iteration within that epoch).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from usema.errors import UsemaError, os_reason
from usema.io.files import atomic_path

LAST = "last.pt"
BEST = "best.pt"


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``payload`` to ``path`` atomically; a failed write (disk full, no permission) raises UsemaError.

    The previous file at ``path`` stays intact whenever the write fails or the process is killed.
    """
    path = Path(path)
    try:
        with atomic_path(path, "checkpoint") as tmp:
            torch.save(payload, tmp)
    except RuntimeError as exc:  # torch's stream errors; atomic_path reports OSError itself
        reason = os_reason(exc)
        raise UsemaError(f"{path}: could not write the checkpoint ({reason}); the previous one is kept") from exc
    return path


def read_torch_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of a file a user gave; every failure is a one-line UsemaError.

    Only tensors and plain data load: a file holding any other Python object (a pickle that could run code on
    loading) is refused without being unpickled further.
    """
    path = Path(path)
    if not path.is_file():
        raise UsemaError(f"{path}: checkpoint file not found")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; anything else is not a checkpoint
        raise UsemaError(f"{path}: expected a usema checkpoint (a torch.save file), got another kind of file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UsemaError(
            f"{path}: refused: it holds Python objects beyond tensors and plain data (weights_only=True load failed)"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - truncated or foreign archives all mean "not a checkpoint"
        raise UsemaError(f"{path}: expected a readable usema checkpoint ({os_reason(exc)})") from exc


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; anything that is not a usema checkpoint is a UsemaError."""
    payload = read_torch_file(path, map_location)
    if not isinstance(payload, dict) or not {"model", "network"} <= payload.keys():
        raise UsemaError(f"{path}: not a usema checkpoint (expected a dict with 'model' and 'network')")
    return payload
