"""Checkpoint files: atomic writes, safe loads (``weights_only=True``) and one-line errors.

Checkpoint dict (docs/ARCHITECTURE.md): ``{"model", "network", "recipe", "norm_stats", "labels",
"epoch", "iteration", "best_metric", "optimizer", "scheduler", "scaler", "rng", "metrics"}``, where
``epoch``/``iteration`` name the next training step to run (iteration within that epoch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from usema.errors import UsemaError, atomic_path

LAST = "last.pt"
BEST = "best.pt"


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``payload`` to ``path`` atomically; a failed write (disk full, no permission) raises UsemaError.

    The previous file at ``path`` stays intact whenever the write fails or the process is killed.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())  # torch's stream errors span several lines
        raise UsemaError(f"{path}: could not write the checkpoint ({reason}); the previous one is kept") from exc
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; anything that is not a usema checkpoint is a UsemaError."""
    path = Path(path)
    if not path.is_file():
        raise UsemaError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt/untrusted files
        reason = " ".join(str(exc).split())[:200]
        raise UsemaError(f"{path}: not a readable usema checkpoint ({type(exc).__name__}: {reason})") from exc
    if not isinstance(payload, dict) or not {"model", "network"} <= payload.keys():
        raise UsemaError(f"{path}: not a usema checkpoint (expected a dict with 'model' and 'network')")
    return payload
