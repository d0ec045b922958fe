"""The benchmarked networks and their reproducible inputs."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from usema.bench.settings import IN_CHANNELS, NETWORK_STRIDE, OUT_CHANNELS, SIZE_DIVISOR, parse_net
from usema.errors import UsemaError
from usema.nets.usema import fits_training

def build_bench_network(name: str, spatial_dims: int, size: int) -> nn.Module:
    """The benchmarked network ``name`` (e.g. 'usema-base', 'dynunet') for (size,)*spatial_dims inputs, 1 -> 4 ch.

    The peers use ``usema.nets.build_network``'s configurations: DynUNet nnU-Net-like (kernels 3, strides
    1,2,2,2,2,2, widths 32..512 in 2D / 32..320 in 3D), SwinUNETR feature size 48 window 7, UNETR ViT-B/16.
    """
    from usema.nets import build_network  # the nets import MONAI's network zoo: only when building

    family, preset = parse_net(name)
    return build_network(
        family, spatial_dims, IN_CHANNELS, OUT_CHANNELS, preset=preset, img_size=(size,) * spatial_dims
    )


def check_sizes(nets: Sequence[str], sizes: Sequence[int], key: str = "--sizes") -> None:
    """Every side trainable by the networks (the training-size rule) and a multiple of each net's patch divisor,
    else a UsemaError on ``key``."""
    if not all(fits_training([s], NETWORK_STRIDE) for s in sizes):
        raise UsemaError(f"{key}: sides of at least {2 * NETWORK_STRIDE} expected, got {list(sizes)}")
    for net in nets:
        divisor = SIZE_DIVISOR.get(net, 1)
        bad = [s for s in sizes if s % divisor]
        if bad:
            raise UsemaError(f"{key}: {net} needs sides divisible by {divisor}, got {bad}")


def make_input(spatial_dims: int, size: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A reproducible random image (batch, 1, *(size,)*spatial_dims)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, IN_CHANNELS, *(size,) * spatial_dims), generator=generator)


def build_all(nets: Sequence[str], spatial_dims: int, size: int) -> dict[str, nn.Module]:
    models = {}
    for name in nets:
        torch.manual_seed(0)
        models[name] = build_bench_network(name, spatial_dims, size)
    return models
