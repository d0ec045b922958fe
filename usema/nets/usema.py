"""USEMA: a residual CNN UNet whose deeper stages carry SEMA blocks (SPEC §4, U-Mamba-style layout)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from usema.nets.norm import InstanceNorm
from usema.nets.sema import SEMABlock

__all__ = ["USEMA", "USEMAConfig", "PRESETS", "SEMA_PLACEMENTS", "fits_training"]

SEMA_PLACEMENTS = ("enc", "bot", "skip", "none")


@dataclass(frozen=True)
class USEMAConfig:
    """Architecture hyper-parameters; presets fill them, keyword overrides replace single fields."""

    features: tuple[int, ...]
    """Width of each stage (stage 0 at full resolution); stages 1.. downsample by 2."""
    encoder_blocks: tuple[int, ...]
    """Residual conv blocks per encoder stage."""
    stem: str = "plain"
    """Stage 0's block: "plain" (two Conv k3 -> IN -> LeakyReLU: every path from the input is instance-normalised,
    so the output does not depend on the input's intensity scale, as nnU-Net's networks) or "residual" (the
    encoder's block, as usema 0.1: its 1x1 shortcut passes the raw intensities on, which gained 0.009 validation
    Dice on demo_brain but lost a quarter to a third of the Dice on images z-scored on other statistics than in
    training; docs/benchmarks.md, "Accuracy of the layout choices")."""
    decoder_blocks: int = 1
    decoder_block: str = "residual"
    """Decoder stage block: "residual" (two convs plus the input, as the encoder's) or "conv" (one Conv k3 -> IN ->
    LeakyReLU, as the decoders of nnU-Net's residual-encoder presets): 23% fewer FLOPs, a 20% faster forward and a
    10% faster training step, for 0.01-0.03 less Dice on demo_brain (docs/benchmarks.md)."""
    upsample: str = "nearest"
    """Decoder upsampling: "nearest" (1x1 conv at low resolution, then nearest x2; 8x cheaper than a
    transposed conv at the same width) or "transpose" (2x2 transposed conv, as nnU-Net)."""
    sema_stages: str = "enc"
    """Where SEMA blocks go: enc (after the conv blocks of the last ``sema_num_stages`` encoder stages),
    bot (bottleneck only), skip (on the skip features of the deeper stages), none (CNN-only ablation)."""
    sema_num_stages: int = 3
    sema_depth: tuple[int, ...] = (1, 1, 1)
    """SEMA blocks per SEMA stage, shallow to deep, aligned with the deepest stages ("bot" uses the last)."""
    window_size: int | tuple[int | tuple[int, ...], ...] = 7
    """Window side: an int for every SEMA stage, or one entry per SEMA stage (shallow to deep; an entry may be a
    per-axis tuple). Per-stage tuples align with the deepest stages, so "bot" uses the last entry."""
    head_dim: int = 32
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    global_mean: bool = True
    mean_gate: bool = False
    deep_supervision: bool = True


def _widths(base: int, maximum: int, stages: int) -> tuple[int, ...]:
    return tuple(min(base * 2**i, maximum) for i in range(stages))


# 2D tiny caps its width at 128 (256 until usema 0.3.2): its two deepest stages, at 1/16 and 1/32 of the input side,
# then cost a quarter, and its forward 18% less time, with no lower demo Dice (docs/benchmarks.md, "Tiny's widths")
PRESETS: dict[int, dict[str, USEMAConfig]] = {
    2: {
        "tiny": USEMAConfig(features=_widths(16, 128, 6), encoder_blocks=(1,) * 6, sema_depth=(1, 1, 1)),
        "small": USEMAConfig(features=_widths(24, 384, 6), encoder_blocks=(1, 1, 2, 2, 2, 2), sema_depth=(1, 1, 1)),
        "base": USEMAConfig(features=_widths(32, 512, 6), encoder_blocks=(1,) * 6, sema_depth=(1, 1, 2)),
    },
    3: {
        "tiny": USEMAConfig(features=_widths(16, 256, 5), encoder_blocks=(1,) * 5, sema_depth=(1, 1, 1)),
        "small": USEMAConfig(features=_widths(24, 320, 6), encoder_blocks=(1,) * 6, sema_depth=(1, 1, 1)),
        "base": USEMAConfig(features=_widths(32, 320, 6), encoder_blocks=(1, 1, 2, 2, 2, 2), sema_depth=(1, 1, 2)),
    },
}


def _conv(spatial_dims: int) -> type[nn.Module]:
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def _norm(channels: int) -> nn.Module:
    """Affine instance normalisation (``usema.nets.norm.InstanceNorm``; docs/benchmarks.md, "Profile")."""
    return InstanceNorm(channels)


class ResidualConvBlock(nn.Module):
    """Conv k3 -> IN -> LeakyReLU -> Conv k3 -> IN, plus the input, then LeakyReLU(0.01).
    (B, C_in, *S) -> (B, C_out, *S / stride).

    A shape-changing shortcut is ResNet-D's: average pooling for the stride (every input voxel contributes,
    where a strided 1x1 conv reads one in 2^dims), then a 1x1 conv for the width.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        shortcut: list[nn.Module] = []
        if stride != 1:
            pool = nn.AvgPool2d if spatial_dims == 2 else nn.AvgPool3d
            shortcut.append(pool(stride, stride))
        if in_channels != out_channels:
            shortcut.append(conv(in_channels, out_channels, 1, bias=False))
        self.shortcut = nn.Sequential(*shortcut) if shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y.add_(self.shortcut(x)))


class PlainStem(nn.Module):
    """Conv k3 -> IN -> LeakyReLU -> Conv k3 -> IN -> LeakyReLU, no shortcut. (B, C_in, *S) -> (B, C_out, *S).

    Not two ``ConvNormAct``: these are the tensor names of usema 0.2's stem, so its checkpoints load."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = _norm(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm2(self.conv2(self.act(self.norm1(self.conv1(x))))))


class ConvNormAct(nn.Module):
    """Conv k3 -> IN -> LeakyReLU(0.01). (B, C_in, *S) -> (B, C_out, *S)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = _conv(spatial_dims)(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = _norm(out_channels)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


def _upsampler(spatial_dims: int, in_channels: int, out_channels: int, mode: str) -> nn.Module:
    """x2 upsampling from ``in_channels`` to ``out_channels``."""
    if mode == "transpose":
        up = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        return up(in_channels, out_channels, 2, stride=2)
    return nn.Sequential(_conv(spatial_dims)(in_channels, out_channels, 1), nn.Upsample(scale_factor=2, mode="nearest"))


class USEMA(nn.Module):
    """Hybrid CNN-SEMA UNet for 2D and 3D segmentation.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes (logits, background included).
        preset: "tiny" | "small" | "base" (see ``PRESETS`` and docs/models.md for params and GFLOPs).
        **overrides: any ``USEMAConfig`` field, e.g. ``sema_stages="bot"``, ``global_mean=False``,
            ``window_size=(8, 7, 7)`` (one per SEMA stage), ``deep_supervision=False``.

    Shapes: input (B, in_channels, *S) with any S; output (B, out_channels, *S). In training mode with
    deep supervision the output is a list of logits, full resolution first, then 1/2, 1/4, ... of the
    internally padded size (the input is zero-padded to a multiple of the total stride and cropped back).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        preset: str = "base",
        **overrides: object,
    ) -> None:
        super().__init__()
        if spatial_dims not in PRESETS:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if preset not in PRESETS[spatial_dims]:
            raise ValueError(f"preset must be one of {sorted(PRESETS[spatial_dims])}, got {preset!r}")
        known = {f.name for f in fields(USEMAConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown USEMA option(s) {unknown}; valid: {sorted(known)}")
        cfg = replace(PRESETS[spatial_dims][preset], **_tuples(overrides))
        _check(cfg)
        self.config = cfg
        self.spatial_dims = spatial_dims
        feats = cfg.features
        n = len(feats)
        self.stride = 2 ** (n - 1)
        sema_at = _sema_stage_indices(cfg, n)
        windows = cfg.window_size if isinstance(cfg.window_size, tuple) else (cfg.window_size,) * len(sema_at)
        sema_kw = dict(
            spatial_dims=spatial_dims, head_dim=cfg.head_dim, mlp_ratio=cfg.mlp_ratio, drop_path=cfg.drop_path,
            global_mean=cfg.global_mean, mean_gate=cfg.mean_gate,
        )

        def sema(stage: int) -> nn.Module:
            j = sema_at.index(stage) - len(sema_at)  # per-stage settings align with the deepest stages
            window = windows[j]
            return nn.Sequential(*(SEMABlock(feats[stage], window_size=window, **sema_kw) for _ in range(cfg.sema_depth[j])))

        self.encoder = nn.ModuleList()
        for i, (width, blocks) in enumerate(zip(feats, cfg.encoder_blocks)):
            if i == 0 and cfg.stem == "plain":
                first: nn.Module = PlainStem(spatial_dims, in_channels, width)
            else:
                first = ResidualConvBlock(spatial_dims, in_channels if i == 0 else feats[i - 1], width, 1 if i == 0 else 2)
            layers = [first]
            layers += [ResidualConvBlock(spatial_dims, width, width) for _ in range(blocks - 1)]
            if cfg.sema_stages in ("enc", "bot") and i in sema_at:
                layers.append(sema(i))
            self.encoder.append(nn.Sequential(*layers))
        self.skip_sema = nn.ModuleDict(
            {str(i): sema(i) for i in sema_at} if cfg.sema_stages == "skip" else {}
        )
        conv = _conv(spatial_dims)
        self.upsample = nn.ModuleList(_upsampler(spatial_dims, feats[i + 1], feats[i], cfg.upsample) for i in range(n - 1))
        # decoder stage: the upsampled features (already projected to the skip's width C) plus the skip, then
        # block(s) at width C. Adding instead of concatenating saves, at every resolution, the 2C-wide copy and the
        # 1x1 fusion conv, memory-bound passes that cost more than their FLOPs at full resolution (docs/benchmarks.md,
        # "Profile"); the block that follows mixes the two.
        block = ResidualConvBlock if cfg.decoder_block == "residual" else ConvNormAct
        self.decoder = nn.ModuleList(
            nn.Sequential(*(block(spatial_dims, feats[i], feats[i]) for _ in range(cfg.decoder_blocks)))
            for i in range(n - 1)
        )
        # one 1x1 head per decoder stage, built whether or not deep supervision is on (as nnU-Net's
        # dynamic-network-architectures does), so that every checkpoint loads into every mode; only the
        # full-resolution head runs outside deep-supervised training
        self.heads = nn.ModuleList(conv(feats[i], out_channels, 1) for i in range(n - 1))
        if not cfg.deep_supervision:
            # unused heads get no gradient; DistributedDataParallel requires one for every trainable parameter
            self.heads[1:].requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        size = x.shape[2:]
        pad = [(-s) % self.stride for s in size]
        if self.training and not fits_training(size, self.stride):
            raise ValueError(f"training patches need every side >= {2 * self.stride} for USEMA, got {tuple(size)}")
        if any(pad):
            x = F.pad(x, [p for d in reversed(pad) for p in (0, d)])
        skips = []
        for i, stage in enumerate(self.encoder):
            x = stage(x)
            skips.append(self.skip_sema[str(i)](x) if str(i) in self.skip_sema else x)
        x = skips.pop()
        deep = self.training and self.config.deep_supervision
        outputs: list[torch.Tensor] = []
        for i in reversed(range(len(self.decoder))):
            # each skip is released once used, not when the network returns: lower peak memory
            x = self.decoder[i](self.merge_skip(i, self.upsample[i](x), skips.pop()))
            if i == 0 or deep:
                outputs.append(self.heads[i](x))
        outputs.reverse()  # full resolution first
        if any(pad):  # crop every output to its share of the unpadded input
            outputs = [
                out[(slice(None), slice(None), *(slice(0, -(-s // 2**level)) for s in size))]
                for level, out in enumerate(outputs)
            ]
        return outputs if deep else outputs[0]

    @property
    def inference_memory_format(self) -> torch.memory_format:
        """The layout of the weights (and so of the activations) in which inference on CPU runs fastest.

        2D: channels-last, where oneDNN convolves without reordering and the SEMA blocks' token layout costs
        no copy (2 threads: usema-tiny 13-20% and usema-base 8-9% less forward time at 256² batch 4 and 1024²).
        3D keeps PyTorch's default: channels-last was 3-4% slower at 64³ and -7% to +1% at 128³
        (docs/benchmarks.md, "Inference layout")."""
        return torch.channels_last if self.spatial_dims == 2 else torch.contiguous_format

    @property
    def training_memory_format(self) -> torch.memory_format:
        """The layout in which training on CPU runs fastest: 2D channels-last, where ``InstanceNorm`` takes its
        token-matrix backward (PyTorch's channels-last group-norm backward is 4x slower than channels-first);
        usema-base's training step at 256², batch 2, then takes 4-8% less time (docs/benchmarks.md,
        "Training layout"). 3D keeps PyTorch's default, as for inference."""
        return self.inference_memory_format

    def merge_skip(self, stage: int, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Decoder stage ``stage``'s input from the upsampled features and the skip, both (B, C, *S)."""
        return up.add_(skip)


def fits_training(size: Sequence[int], stride: int) -> bool:
    """Whether a training input of ``size`` fits a UNet of total ``stride``: after padding to a multiple of
    the stride every side must be >= 2·stride, so that instance norm sees more than one voxel per channel at
    the bottleneck."""
    return min(s + (-s) % stride for s in size) >= 2 * stride


def _tuples(overrides: dict[str, object]) -> dict[str, object]:
    """YAML gives lists; the frozen config stores tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}


def _sema_stage_indices(cfg: USEMAConfig, n: int) -> list[int]:
    if cfg.sema_stages == "none":
        return []
    if cfg.sema_stages == "bot":
        return [n - 1]
    if cfg.sema_stages == "skip":  # the bottleneck has no skip connection
        return list(range(max(n - 1 - cfg.sema_num_stages, 0), n - 1))
    return list(range(max(n - cfg.sema_num_stages, 0), n))


def _check(cfg: USEMAConfig) -> None:
    if cfg.upsample not in ("nearest", "transpose"):
        raise ValueError(f"upsample must be 'nearest' or 'transpose', got {cfg.upsample!r}")
    if cfg.stem not in ("residual", "plain"):
        raise ValueError(f"stem must be 'residual' or 'plain', got {cfg.stem!r}")
    if cfg.decoder_block not in ("residual", "conv"):
        raise ValueError(f"decoder_block must be 'residual' or 'conv', got {cfg.decoder_block!r}")
    if cfg.sema_stages not in SEMA_PLACEMENTS:
        raise ValueError(f"sema_stages must be one of {SEMA_PLACEMENTS}, got {cfg.sema_stages!r}")
    if len(cfg.encoder_blocks) != len(cfg.features) or min(cfg.encoder_blocks) < 1:
        raise ValueError(f"encoder_blocks {cfg.encoder_blocks} needs one entry >= 1 per stage of {cfg.features}")
    if len(cfg.features) < 2:
        raise ValueError("USEMA needs at least 2 stages")
    stages = len(_sema_stage_indices(cfg, len(cfg.features)))
    if len(cfg.sema_depth) < stages:
        raise ValueError(f"sema_depth {cfg.sema_depth} needs one entry per SEMA stage ({stages})")
    if isinstance(cfg.window_size, tuple) and len(cfg.window_size) < stages:
        raise ValueError(f"window_size {cfg.window_size} needs one entry per SEMA stage ({stages})")

