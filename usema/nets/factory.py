"""Build USEMA or a MONAI peer network by name, with one calling convention for training, inference and bench."""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks import nets as monai_nets
from torch import nn

from usema.nets.usema import USEMA

__all__ = ["NETWORK_NAMES", "build_network"]

NETWORK_NAMES = ("usema", "basicunet", "dynunet", "swinunetr", "unetr", "segresnet")


class DeepSupervisionList(nn.Module):
    """Turns DynUNet's stacked deep-supervision output (B, heads, K, *S) into a list, as USEMA returns."""

    def __init__(self, net: monai_nets.DynUNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.net(x)
        return list(torch.unbind(out, dim=1)) if self.training else out


def _dynunet(spatial_dims: int, in_channels: int, out_channels: int, deep_supervision: bool, **kw: object) -> nn.Module:
    """nnU-Net-like DynUNet: 6 levels of kernel 3, strides 1,2,2,2,2,2, widths 32..512 (2D) or 32..320 (3D)."""
    maximum = 512 if spatial_dims == 2 else 320
    args = dict(
        kernel_size=[3] * 6,
        strides=[1, 2, 2, 2, 2, 2],
        upsample_kernel_size=[2] * 5,
        filters=[min(32 * 2**i, maximum) for i in range(6)],
        deep_supervision=deep_supervision,
        deep_supr_num=3,
    )
    args.update(kw)
    net = monai_nets.DynUNet(spatial_dims, in_channels, out_channels, **args)
    return DeepSupervisionList(net) if deep_supervision else net


def build_network(
    name: str,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    preset: str = "base",
    deep_supervision: bool = False,
    img_size: Sequence[int] | None = None,
    **overrides: object,
) -> nn.Module:
    """Build a segmentation network.

    Args:
        name: one of ``NETWORK_NAMES``.
        spatial_dims, in_channels, out_channels: as in MONAI.
        preset: USEMA size preset (ignored by the MONAI peers).
        deep_supervision: in training mode return a list of logits, full resolution first (usema, dynunet).
        img_size: the patch size; required by UNETR (a ViT with fixed token count), ignored otherwise.
        **overrides: keyword arguments of the network's constructor.

    All networks map (B, in_channels, *S) to logits (B, out_channels, *S) in eval mode.
    """
    if name == "usema":
        return USEMA(spatial_dims, in_channels, out_channels, preset=preset, deep_supervision=deep_supervision, **overrides)
    if name == "dynunet":
        return _dynunet(spatial_dims, in_channels, out_channels, deep_supervision, **overrides)
    if name == "basicunet":
        return monai_nets.BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **overrides)
    if name == "swinunetr":
        args = dict(feature_size=48, window_size=7, spatial_dims=spatial_dims)
        return monai_nets.SwinUNETR(in_channels=in_channels, out_channels=out_channels, **{**args, **overrides})
    if name == "unetr":
        if img_size is None:
            raise ValueError("unetr needs img_size (the patch size)")
        return monai_nets.UNETR(in_channels, out_channels, img_size=tuple(img_size), spatial_dims=spatial_dims, **overrides)
    if name == "segresnet":
        return monai_nets.SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **overrides)
    raise ValueError(f"unknown network {name!r}; choose one of {NETWORK_NAMES}")
