"""SEMA: focused window attention plus the arithmetic mean of all values (SPEC §2), and the SEMA block (§3).

    SEMA(Q, K, V)_m = sum_{j in J(m)} softmax_j(q_m . k_j / sqrt(d)) v_j  +  (1/n) sum_{j=1..n} v_j

J(m) is the non-overlapping window (tiled from the origin) that holds token m. The cost is linear in the
number of tokens n: O(n * prod(window) * C).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from monai.networks.layers import DropPath
from torch import nn

__all__ = ["sema_attention", "global_value_mean", "SEMAAttention", "SEMABlock"]

_AXES = ("x", "y", "z")


def _as_tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    if len(value) != n:
        raise ValueError(f"window_size {tuple(value)} must have {n} entries for {n} spatial dims")
    return tuple(int(v) for v in value)


def global_value_mean(v: torch.Tensor) -> torch.Tensor:
    """Mean of ``v`` (B, heads, *spatial, d) over all spatial positions, as (B, 1, ..., 1, heads·d): it broadcasts
    over the channels-last tokens (B, *spatial, heads·d) that ``sema_attention`` returns."""
    mean = v.mean(dim=tuple(range(2, v.ndim - 1)))
    return rearrange(mean, "b h d -> b " + "1 " * (v.ndim - 3) + "(h d)")


def _window_pattern(nd: int) -> tuple[str, str, str]:
    """einops patterns of a padded map, its windows and its channels-last tokens, e.g. 2D:
    'b h (nx x) (ny y) d', '(b nx ny) h (x y) d', 'b (nx x) (ny y) (h d)'."""
    grid = " ".join(f"(n{a} {a})" for a in _AXES[:nd])
    counts = " ".join(f"n{a}" for a in _AXES[:nd])
    sizes = " ".join(_AXES[:nd])
    return f"b h {grid} d", f"(b {counts}) h ({sizes}) d", f"b {grid} (h d)"


def sema_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int | Sequence[int] = 7,
    global_mean: bool = True,
) -> torch.Tensor:
    """SEMA attention on ``q, k, v`` of shape (B, heads, *spatial, head_dim) with 2 or 3 spatial dims.

    Softmax attention (scale head_dim**-0.5) inside non-overlapping windows tiled from the origin, plus (when
    ``global_mean``) the mean of ``v`` over all real positions added to every position. Sides that are not a
    multiple of the window are zero-padded and the padded keys are masked out of the softmax; a window larger
    than the map shrinks to the map, so a map inside one window gets full attention + mean.
    Returns channels-last tokens (B, *spatial, heads·head_dim), heads merged: the SEMA block's layout, written
    straight from the windows in one copy.
    """
    spatial = tuple(q.shape[2:-1])
    nd = len(spatial)
    if nd not in (2, 3):
        raise ValueError(f"expected 2 or 3 spatial dims, got q of shape {tuple(q.shape)}")
    window = tuple(min(w, s) for w, s in zip(_as_tuple(window_size, nd), spatial))
    pad = [(-s) % w for s, w in zip(spatial, window)]
    flat = (0, 0) + tuple(x for p in reversed(pad) for x in (0, p))  # F.pad order: last dim first
    maps, in_windows, tokens = _window_pattern(nd)
    sizes = dict(zip(_AXES, window))

    def windows(t: torch.Tensor) -> torch.Tensor:
        return rearrange(F.pad(t, flat) if any(pad) else t, f"{maps} -> {in_windows}", **sizes)

    mask = None
    if any(pad):
        real = q.new_ones((1, 1, *spatial, 1), dtype=torch.bool)  # zero padding marks the padded keys False
        # (batch * windows, 1, 1, keys): the same key mask for every head and query
        mask = rearrange(windows(real), "w h l 1 -> w h 1 l").repeat(q.shape[0], 1, 1, 1)
    out = F.scaled_dot_product_attention(windows(q), windows(k), windows(v), attn_mask=mask)
    counts = {f"n{a}": (s + p) // w for a, s, p, w in zip(_AXES, spatial, pad, window)}
    out = rearrange(out, f"{in_windows} -> {tokens}", **sizes, **counts)
    if any(pad):
        out = out[(slice(None), *(slice(0, s) for s in spatial))]
    if global_mean:
        out = out + global_value_mean(v)
    return out


def _dwconv(spatial_dims: int, channels: int) -> nn.Module:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return conv(channels, channels, kernel_size=3, padding=1, groups=channels)


def _on_tokens(conv: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A convolution applied to channels-last tokens (B, *spatial, C): the moved-axis views are channels-last
    strided tensors, which oneDNN convolves natively and answers in the same layout, so no copy is made."""
    return conv(tokens.movedim(-1, 1)).movedim(1, -1)


class SEMAAttention(nn.Module):
    """Multi-head SEMA attention with a qkv projection and LePE, on channels-last tokens.

    Args:
        dim: channels C (a multiple of ``head_dim``).
        spatial_dims: 2 or 3.
        head_dim: channels per head d (32, as MLLA).
        window_size: window side(s) w; int or one per spatial dim.
        qkv_bias: bias on the qkv projection.
        lepe: add a depthwise 3x3(x3) conv of V to the output (locally-enhanced positional encoding).
        global_mean: add the mean of V (the SEMA global term); False is the window-only ablation.
        mean_gate: ablation: scale the mean term by a learnable scalar initialised to 0.

    Shapes: (B, *spatial, C) -> (B, *spatial, C).
    """

    def __init__(
        self,
        dim: int,
        spatial_dims: int = 2,
        head_dim: int = 32,
        window_size: int | Sequence[int] = 7,
        qkv_bias: bool = True,
        lepe: bool = True,
        global_mean: bool = True,
        mean_gate: bool = False,
    ) -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"dim {dim} must be a multiple of head_dim {head_dim}")
        self.num_heads = dim // head_dim
        self.window_size = window_size
        self.global_mean = global_mean
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = _dwconv(spatial_dims, dim) if lepe else None
        self.mean_gate = nn.Parameter(torch.zeros(1)) if (mean_gate and global_mean) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b ... (three h d) -> three b h ... d", three=3, h=self.num_heads)
        plain_mean = self.global_mean and self.mean_gate is None
        out = sema_attention(q, k, v, self.window_size, global_mean=plain_mean)
        if self.mean_gate is not None:
            out = out + self.mean_gate * global_value_mean(v)
        if self.lepe is not None:
            # V's rows are strided by 3C inside the qkv output: one dense copy (innermost axis kept) for the conv
            out = out + _on_tokens(self.lepe, rearrange(v, "b h ... d -> b ... (h d)").contiguous())
        return out


class SEMABlock(nn.Module):
    """Mamba-like SEMA block (SPEC §3): CPE, gated input branch with depthwise conv + SiLU, SEMA, output
    projection, second CPE, MLP (C -> mlp_ratio*C -> C, GELU); pre-LayerNorm residuals with DropPath.

    Shapes: (B, C, H, W) or (B, C, D, H, W) -> same shape.
    """

    def __init__(
        self,
        dim: int,
        spatial_dims: int = 2,
        head_dim: int = 32,
        window_size: int | Sequence[int] = 7,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        qkv_bias: bool = True,
        lepe: bool = True,
        global_mean: bool = True,
        mean_gate: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        hidden = int(round(dim * mlp_ratio))
        self.cpe1 = _dwconv(spatial_dims, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, dim)
        self.in_proj = nn.Linear(dim, dim)
        self.dwconv = _dwconv(spatial_dims, dim)
        self.attn = SEMAAttention(dim, spatial_dims, head_dim, window_size, qkv_bias, lepe, global_mean, mean_gate)
        self.out_proj = nn.Linear(dim, dim)
        self.cpe2 = _dwconv(spatial_dims, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one layout change in and one out: everything between works on channels-last tokens (B, *S, C); a
        # channels-last x (as inference runs USEMA on CPU) is already laid out as tokens and stays channels-last
        channels_last = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        layout = channels_last if x.is_contiguous(memory_format=channels_last) else torch.contiguous_format
        t = rearrange(x, "b c ... -> b ... c").contiguous()
        t = t + _on_tokens(self.cpe1, t)
        h = self.norm1(t)
        gate = F.silu(self.gate(h))
        h = F.silu(_on_tokens(self.dwconv, self.in_proj(h)))
        t = t + self.drop_path(self.out_proj(self.attn(h) * gate))
        t = t + _on_tokens(self.cpe2, t)
        t = t + self.drop_path(self.mlp(self.norm2(t)))
        return rearrange(t, "b ... c -> b c ...").contiguous(memory_format=layout)
