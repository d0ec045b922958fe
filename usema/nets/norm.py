"""Instance normalisation for USEMA's conv blocks, with a channels-last CPU backward that PyTorch lacks.

USEMA computes instance norm as a group norm with one group per channel (``InstanceNorm`` below): PyTorch's
``nn.InstanceNorm`` runs as a batch norm over a reshaped copy of its input, 2-4x slower on CPU. Training 2D USEMA
channels-last on CPU saves 7% of the convolutions' time, but PyTorch's channels-last group-norm backward is 4x
slower than its channels-first one. On channels-last inputs the channels are the innermost axis, so the backward's
per-(sample, channel) sums and its broadcasts are column operations on the token matrix (B, N, C): that is how
``instance_norm_backward`` computes them (docs/benchmarks.md, "Training layout").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["InstanceNorm", "instance_norm_backward"]

_PARAMETER_DTYPES = (torch.float32, torch.float64)


def _is_channels_last(x: torch.Tensor) -> bool:
    if x.ndim == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)


def instance_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, dweight, dbias) of y = (x - mean) * rstd * weight + bias per (sample, channel).

    x, dy: channels-last (B, C, *S); mean, rstd: (B, C) as ``torch.native_group_norm`` returns them with one
    group per channel; weight: (C,). With x̂ = (x - mean) * rstd, N = prod(S), s1 = Σ dy, s2 = Σ dy·x̂ over S:
    dx = weight * rstd * (dy - s1 / N - x̂ * s2 / N), dweight = Σ_B s2, dbias = Σ_B s1.
    """
    batch, channels = x.shape[:2]
    n = x[0, 0].numel()
    xt = rearrange(x, "b c ... -> b (...) c")  # views: channels-last memory is the token matrix (B, N, C)
    dyt = rearrange(dy, "b c ... -> b (...) c")
    mean, rstd = mean.view(batch, 1, channels), rstd.view(batch, 1, channels)
    s1 = dyt.sum(1, keepdim=True)
    s2 = (torch.linalg.vecdot(dyt, xt, dim=1).unsqueeze(1) - mean * s1) * rstd
    # dx = a·dy + b·x + c, in two passes over the tensor and without materialising x̂
    a = weight.view(1, 1, channels) * rstd
    b = -a * s2 * rstd / n
    c = -a * s1 / n - b * mean
    dxt = torch.addcmul(c, dyt, a).addcmul_(xt, b)
    dx = rearrange(dxt, "b n c -> b c n").view(x.shape)  # channels-last again, no copy
    return dx, s2.sum(0).flatten(), s1.sum(0).flatten()


class _ChannelsLastInstanceNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        batch, channels = x.shape[:2]
        y, mean, rstd = torch.native_group_norm(x, weight, bias, batch, channels, x[0, 0].numel(), channels, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x, weight, mean, rstd = ctx.saved_tensors
        # autograd may hand the gradient in another layout (e.g. from a loss on the output); the sums need x's.
        # Under bfloat16/float16 autocast x and dy are low precision: the sums run in the weight's float32.
        layout = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        dy = dy.to(weight.dtype).contiguous(memory_format=layout)
        dx, dweight, dbias = instance_norm_backward(dy, x.to(weight.dtype), weight, mean.to(weight.dtype),
                                                    rstd.to(weight.dtype))
        return dx.to(x.dtype), dweight, dbias, None


class InstanceNorm(nn.GroupNorm):
    """Affine instance normalisation over (B, C, *S) -> same shape: ``nn.GroupNorm(C, C)``, the same function and
    parameter names (``weight``, ``bias``) as ``nn.InstanceNorm{2,3}d(affine=True)``.

    A channels-last CPU input that needs gradients takes the backward of ``instance_norm_backward`` (in the
    weight's float32 under bfloat16 autocast); everything else (inference, CUDA, channels-first training) is
    ``F.group_norm``.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(channels, channels, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._token_backward(x):
            return _ChannelsLastInstanceNorm.apply(x, self.weight, self.bias, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def _token_backward(self, x: torch.Tensor) -> bool:
        return (
            torch.is_grad_enabled()
            and (x.requires_grad or self.weight.requires_grad)
            and x.device.type == "cpu"
            and self.weight.dtype in _PARAMETER_DTYPES
            and x.is_floating_point()
            and _is_channels_last(x)
        )
