"""Load a trained model for inference from a run directory, a checkpoint file or an exported bundle.

Everything is read with ``torch.load(weights_only=True)`` (or JSON) and validated by the run format
(:mod:`usema.run.checkpoint`): the network spec field by field, the stored recipe with the typed loader
training uses. Inference settings are derived from that :class:`usema.config.Recipe`, in one place each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from usema.config import Recipe
from usema.errors import UsemaError
from usema.run.checkpoint import read_stored_model
from usema.run.device import inference_memory_format
from usema.run.layout import BEST, LAST, checkpoint_path, is_bundle
from usema.run.spec import NetworkSpec, build_network_from_spec, load_weights


@dataclass(frozen=True)
class InferenceSettings:
    """The recipe's inference settings: 2D-on-3D slicing axis, normalisation, sliding-window size and overlap."""

    slice_axis: int
    normalization: str
    roi_size: list[int]
    overlap: float
    sw_batch_size: int

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> InferenceSettings:
        """``roi_size`` is ``Recipe.roi_size``; everything else is the recipe's value as is."""
        return cls(
            slice_axis=recipe.data.slice_axis,
            normalization=recipe.data.normalization,
            roi_size=recipe.roi_size,
            overlap=recipe.val.overlap,
            sw_batch_size=recipe.val.sw_batch_size,
        )


@dataclass
class LoadedModel:
    """A network in eval mode plus what is needed to preprocess its inputs and name its outputs."""

    network: nn.Module
    spec: NetworkSpec
    recipe: Recipe
    settings: InferenceSettings
    norm_stats: dict[str, float] | None
    labels: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    source: Path = Path()
    # torch.compile'd forwards by (autocast dtype, device type): compiled once per model, not once per case
    compiled: dict[tuple[Any, str], nn.Module] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return self.spec.out_channels

    @property
    def in_channels(self) -> int:
        return self.spec.in_channels

    @property
    def spatial_dims(self) -> int:
        return self.spec.spatial_dims


def place_for_inference(network: nn.Module, device: torch.device) -> nn.Module:
    """``network`` moved to ``device`` in its inference layout there (a model loaded earlier may live on another
    device or in another layout); returns it."""
    return network.to(device, memory_format=inference_memory_format(network, device))


def resolve_model_path(model: str | Path) -> Path:
    """The checkpoint or bundle directory behind MODEL: a run dir uses checkpoints/best.pt, else last.pt."""
    model = Path(model)
    if model.is_file():
        return model
    if not model.is_dir():
        raise UsemaError(f"{model}: no such run directory, checkpoint or bundle")
    if is_bundle(model):
        return model
    for name in (BEST, LAST):
        if checkpoint_path(model, name).is_file():
            return checkpoint_path(model, name)
    raise UsemaError(f"{model}: expected a run directory with checkpoints/best.pt or last.pt, or a bundle")


def load_model(model: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load MODEL (run dir, checkpoint file or bundle dir) as a ready-to-run eval-mode network on ``device``."""
    path = resolve_model_path(model)
    stored = read_stored_model(path)
    network = build_network_from_spec(stored.spec, stored.recipe.data.patch_size, f"{path}: network")
    load_weights(network, stored.weights, stored.spec, str(path))
    return LoadedModel(
        network=network.to(device).eval(),
        spec=stored.spec,
        recipe=stored.recipe,
        settings=InferenceSettings.from_recipe(stored.recipe),
        norm_stats=stored.norm_stats,
        labels=stored.labels,
        metrics=stored.metrics,
        source=path,
    )
