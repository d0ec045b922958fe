"""Checkpoint files: atomic writes, safe loads (``weights_only=True``), validated contents, one-line errors.

Checkpoint dict (docs/ARCHITECTURE.md): ``{"model", "network", "recipe", "norm_stats", "labels",
"epoch", "iteration", "best_metric", "optimizer", "scheduler", "scaler", "rng", "metrics"}``, where
``epoch``/``iteration`` name the next training step to run (iteration within that epoch). ``network`` is a
:class:`usema.run.spec.NetworkSpec` as plain data and ``recipe`` a resolved recipe; both are validated with
the loaders training uses whenever a checkpoint or bundle is read, so a shared file cannot smuggle in values
of the wrong type or code for MONAI's config parser.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from usema.config import Recipe, recipe_from_dict
from usema.errors import UsemaError, os_reason
from usema.io.files import atomic_path
from usema.run.layout import BUNDLE_USEMA_ARGS, BUNDLE_WEIGHTS, is_bundle
from usema.run.spec import NetworkSpec, check_overrides, spec_from_dict, with_stored_widths


@dataclass
class StoredModel:
    """The validated parts of a checkpoint or bundle that rebuild and describe a trained network."""

    spec: NetworkSpec
    recipe: Recipe
    weights: Mapping[str, Any]
    norm_stats: dict[str, float] | None
    labels: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    source: Path = Path()


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
    """Load a checkpoint with ``weights_only=True``; anything that is not a valid usema checkpoint is a
    UsemaError naming the file and the key."""
    payload = read_torch_file(path, map_location)
    check_checkpoint(payload, Path(path))
    return payload


def check_checkpoint(payload: Any, source: Path) -> StoredModel:
    """Validate a checkpoint-shaped dict (``model``, ``network``, ``recipe``, ...) into a :class:`StoredModel`."""
    if not isinstance(payload, dict) or any(k not in payload for k in ("model", "network", "recipe")):
        raise UsemaError(
            f"{source}: not a usema checkpoint (expected a usema checkpoint dict with keys model, network, recipe)"
        )
    spec = with_stored_widths(spec_from_dict(payload["network"], f"{source}: network"), payload["model"])
    if not isinstance(payload["recipe"], dict):
        raise UsemaError(f"{source}: recipe: expected the resolved recipe as a mapping")
    recipe = recipe_from_dict(payload["recipe"], f"{source}: stored recipe")
    # the recipe's overrides travel with the run (usema.json, re-training): held to the spec's rules too
    check_overrides(recipe.model.name, recipe.model.overrides, f"{source}: recipe: model.overrides")
    labels = payload.get("labels") or recipe.data.labels or {}
    metrics = payload.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise UsemaError(f"{source}: metrics: expected a mapping")
    return StoredModel(
        spec=spec,
        recipe=recipe,
        weights=payload["model"],
        norm_stats=_norm_stats(payload.get("norm_stats"), source),
        labels=_labels(labels, source),
        metrics=metrics,
        source=source,
    )


def read_stored_model(path: Path) -> StoredModel:
    """The validated model at ``path``: a checkpoint file, or an exported bundle directory."""
    if not path.is_dir():
        return check_checkpoint(read_torch_file(path), path)
    args_path = path / BUNDLE_USEMA_ARGS
    if not is_bundle(path):
        raise UsemaError(f"{path}: expected a usema bundle with {BUNDLE_USEMA_ARGS} and {BUNDLE_WEIGHTS}")
    try:
        args = json.loads(args_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsemaError(f"{args_path}: expected JSON ({exc})") from exc
    except OSError as exc:
        raise UsemaError(f"{args_path}: cannot read ({os_reason(exc)})") from exc
    if not isinstance(args, dict):
        raise UsemaError(f"{args_path}: expected a JSON object with network, recipe, labels, norm_stats")
    weights = read_torch_file(path / BUNDLE_WEIGHTS)
    stored = check_checkpoint({**args, "model": weights}, args_path)
    stored.source = path
    return stored


def _labels(labels: Any, source: Path) -> dict[str, str]:
    """``{"0": "background", ...}``: integer class values (as text) to names."""
    if not isinstance(labels, Mapping):
        raise UsemaError(f"{source}: labels: expected a mapping of class value to name, got {type(labels).__name__}")
    out = {}
    for key, name in labels.items():
        text = str(key).strip()
        if isinstance(key, bool) or not text.isdigit() or not isinstance(name, str):
            raise UsemaError(
                f"{source}: labels: expected class values (integers) mapped to names, got {key!r}: {name!r}"
            )
        out[str(int(text))] = name
    return out


def _norm_stats(stats: Any, source: Path) -> dict[str, float] | None:
    """Dataset intensity statistics (CT windows): finite numbers by name, or None."""
    if stats is None:
        return None
    if not isinstance(stats, Mapping):
        raise UsemaError(f"{source}: norm_stats: expected a mapping of finite numbers, got {type(stats).__name__}")
    out = {}
    for key, value in stats.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UsemaError(f"{source}: norm_stats.{key}: expected a finite number, got {value!r}")
        out[str(key)] = float(value)
    return out
