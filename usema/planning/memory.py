"""Training memory of a network at a patch size and batch size, from a forward pass on the meta device.

Nothing is allocated: the network is built on ``torch.device("meta")`` and run once in training mode (deep
supervision on) on a meta tensor; every tensor autograd saves for the backward pass is counted. The estimate is

    saved activations + 4 × parameter bytes (weights, gradients, SGD momentum, one transient copy)
    + 2 × the largest single activation (the backward's working set)

in float32, which is conservative under mixed precision. docs/recipes.md compares it with measured peaks.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from usema.nets import build_network

FLOAT_BYTES = 4


def saved_activation_bytes(network: torch.nn.Module, shape: Sequence[int]) -> tuple[int, int]:
    """(total, largest) bytes of the tensors autograd saves in one training-mode forward of ``shape``."""
    sizes: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        network.train()(torch.empty(tuple(shape), device="meta", requires_grad=False))
    return sum(sizes), max(sizes, default=0)


def training_memory_bytes(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    patch_size: Sequence[int],
    batch_size: int,
    name: str = "usema",
    preset: str = "base",
    overrides: dict[str, Any] | None = None,
) -> int:
    """Estimated peak bytes of one training step (forward, backward, SGD update) of the described network."""
    with torch.device("meta"):
        network = build_network(name, spatial_dims, in_channels, out_channels, preset=preset, deep_supervision=True,
                                img_size=list(patch_size), **(overrides or {}))
    params = sum(p.numel() for p in network.parameters()) * FLOAT_BYTES
    saved, largest = saved_activation_bytes(network, (batch_size, in_channels, *patch_size))
    return int(saved + 4 * params + 2 * largest)
