"""Load a trained model for inference from a run directory, a checkpoint file or an exported bundle.

Everything is read with ``torch.load(weights_only=True)`` (or JSON): a shared checkpoint cannot run code.
The recipe is read as a plain dict (docs/ARCHITECTURE.md) so that inference does not depend on how
``usema.config`` parses recipes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from usema.errors import UsemaError
from usema.run.checkpoint import read_torch_file

CHECKPOINT_KEYS = ("model", "network", "recipe")
NETWORK_KEYS = ("name", "spatial_dims", "in_channels", "out_channels")
# files of an exported bundle (usema.bundle.export writes them)
BUNDLE_METADATA = Path("configs") / "metadata.json"
BUNDLE_WEIGHTS = Path("models") / "model.pt"
BUNDLE_USEMA_ARGS = Path("configs") / "usema.json"


@dataclass
class InferenceSettings:
    """The recipe fields inference needs: network dims, 2D-on-3D slicing axis, normalisation and windows."""

    spatial_dims: int
    slice_axis: int | None
    normalization: str
    roi_size: list[int]
    overlap: float = 0.5
    sw_batch_size: int = 4


@dataclass
class LoadedModel:
    """A network in eval mode plus what is needed to preprocess its inputs and name its outputs."""

    network: nn.Module
    network_args: dict[str, Any]
    recipe: dict[str, Any]
    settings: InferenceSettings
    norm_stats: dict[str, float] | None
    labels: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    source: Path = Path()

    @property
    def num_classes(self) -> int:
        return int(self.network_args["out_channels"])

    @property
    def in_channels(self) -> int:
        return int(self.network_args["in_channels"])


def _recipe_value(recipe: dict, dotted: str, source: Path, default: Any = ...) -> Any:
    """``recipe["a"]["b"]`` for ``dotted="a.b"``; a missing key without a default names the key and the file."""
    node: Any = recipe
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is ...:
                raise UsemaError(f"{source}: the stored recipe lacks the key {dotted}")
            return default
        node = node[part]
    return node


def settings_from_recipe(recipe: dict, source: Path = Path("recipe")) -> InferenceSettings:
    """Inference settings from a resolved recipe dict (``val.roi_size`` null means ``data.patch_size``)."""
    patch = _recipe_value(recipe, "data.patch_size", source)
    roi = _recipe_value(recipe, "val.roi_size", source, None) or patch
    slice_axis = _recipe_value(recipe, "data.slice_axis", source, None)
    return InferenceSettings(
        spatial_dims=int(_recipe_value(recipe, "data.spatial_dims", source)),
        slice_axis=None if slice_axis is None else int(slice_axis),
        normalization=str(_recipe_value(recipe, "data.normalization", source)),
        roi_size=[int(r) for r in roi],
        overlap=float(_recipe_value(recipe, "val.overlap", source, 0.5)),
        sw_batch_size=int(_recipe_value(recipe, "val.sw_batch_size", source, 4)),
    )


def resolve_model_path(model: str | Path) -> Path:
    """The checkpoint or bundle directory behind MODEL: a run dir uses checkpoints/best.pt, else last.pt."""
    model = Path(model)
    if model.is_file():
        return model
    if not model.is_dir():
        raise UsemaError(f"{model}: no such run directory, checkpoint or bundle")
    if (model / BUNDLE_METADATA).is_file():
        return model
    for name in ("best.pt", "last.pt"):
        if (model / "checkpoints" / name).is_file():
            return model / "checkpoints" / name
    raise UsemaError(f"{model}: expected a run directory with checkpoints/best.pt or last.pt, or a bundle")


def _read_bundle(bundle: Path) -> dict[str, Any]:
    """A checkpoint-shaped dict from an exported bundle's weights and its saved usema arguments."""
    args_path = bundle / BUNDLE_USEMA_ARGS
    if not args_path.is_file() or not (bundle / BUNDLE_WEIGHTS).is_file():
        raise UsemaError(f"{bundle}: expected a usema bundle with {BUNDLE_USEMA_ARGS} and {BUNDLE_WEIGHTS}")
    try:
        args = json.loads(args_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsemaError(f"{args_path}: expected JSON ({exc})") from exc
    weights = read_torch_file(bundle / BUNDLE_WEIGHTS)
    return {**args, "model": weights}


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict at ``path`` (a file, or a bundle directory), with its required keys checked."""
    ckpt = _read_bundle(path) if path.is_dir() else read_torch_file(path)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise UsemaError(f"{path}: expected a usema checkpoint dict with keys {', '.join(CHECKPOINT_KEYS)}")
    network = ckpt["network"]
    if not isinstance(network, dict) or any(k not in network for k in NETWORK_KEYS):
        raise UsemaError(f"{path}: checkpoint key 'network' must hold {', '.join(NETWORK_KEYS)}")
    return ckpt


def build_from_args(network_args: dict[str, Any], img_size: list[int] | None = None) -> nn.Module:
    """The network a checkpoint's ``network`` dict describes (``deep_supervision`` defaults to False).

    ``img_size`` is the training patch size, which only fixed-size networks (UNETR) use.
    """
    from usema.nets import build_network  # noqa: PLC0415 - keeps `usema infer --help` free of network imports

    return build_network(
        network_args["name"],
        int(network_args["spatial_dims"]),
        int(network_args["in_channels"]),
        int(network_args["out_channels"]),
        preset=network_args.get("preset") or "base",
        deep_supervision=bool(network_args.get("deep_supervision", False)),
        img_size=img_size,
        **(network_args.get("overrides") or {}),
    )


def build_with_weights(network_args: dict[str, Any], state: dict, img_size: list[int], path: Path) -> nn.Module:
    """Build the network and strictly load ``state``; sets ``network_args["deep_supervision"]`` to what fitted.

    Runs trained with deep supervision carry extra head weights, so both variants are tried, the recorded one
    first (in eval mode both return full-resolution logits only); weights fitting neither belong to another
    architecture or preset.
    """
    what = f"{network_args['name']} (preset {network_args.get('preset')})"
    recorded = bool(network_args.get("deep_supervision", False))
    for deep_supervision in (recorded, not recorded):
        args = {**network_args, "deep_supervision": deep_supervision}
        try:
            network = build_from_args(args, img_size)
        except (TypeError, ValueError, KeyError) as exc:
            raise UsemaError(f"{path}: cannot build the network {what}: {exc}") from exc
        try:
            network.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError, AttributeError):
            continue
        network_args["deep_supervision"] = deep_supervision
        return network
    raise UsemaError(f"{path}: weights do not match the network {what} the checkpoint describes")


def load_model(model: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load MODEL (run dir, checkpoint file or bundle dir) as a ready-to-run eval-mode network on ``device``."""
    path = resolve_model_path(model)
    ckpt = read_checkpoint(path)
    recipe = ckpt["recipe"] if isinstance(ckpt["recipe"], dict) else {}
    settings = settings_from_recipe(recipe, path)
    network_args = dict(ckpt["network"])
    patch = [int(p) for p in _recipe_value(recipe, "data.patch_size", path)]
    network = build_with_weights(network_args, ckpt["model"], patch, path)
    labels = ckpt.get("labels") or _recipe_value(recipe, "data.labels", path, None) or {}
    return LoadedModel(
        network=network.to(device).eval(),
        network_args=network_args,
        recipe=recipe,
        settings=settings,
        norm_stats=ckpt.get("norm_stats"),
        labels={str(k): str(v) for k, v in labels.items()},
        metrics=dict(ckpt.get("metrics") or {}),
        source=path,
    )
