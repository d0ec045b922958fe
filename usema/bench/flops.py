"""FLOP counting: torch's FlopCounterMode plus the CPU fused attention ops it does not count."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

def _attention_shapes(*shapes: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Fold any leading batch dims of (*batch, heads, L, d) shapes into one, as ``sdpa_flop_count`` expects."""
    return [(math.prod(s[:-3]), *s[-3:]) for s in shapes]


def _fused_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(*_attention_shapes(query, key, value))


def _fused_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(*_attention_shapes(grad_out, query, key, value))


def attention_flop_mapping() -> dict[Any, Callable[..., int]]:
    """``FlopCounterMode(custom_mapping=...)`` entries for the CPU fused attention ops torch counts as 0.

    Forward: 2·B·H·Lq·Lk·d for QK^T plus 2·B·H·Lq·Lk·d_v for AV (torch's SDPA formula, the same as the
    math path's two batched matmuls); backward: torch's SDPA backward formula. Softmax and masking are not
    counted, as on the math path.
    """
    aten = torch.ops.aten
    forward = [
        aten._scaled_dot_product_flash_attention_for_cpu,
        aten._scaled_dot_product_fused_attention_overrideable,
    ]
    backward = [
        aten._scaled_dot_product_flash_attention_for_cpu_backward,
        aten._scaled_dot_product_fused_attention_overrideable_backward,
    ]
    return {**{op: _fused_attention_flops for op in forward}, **{op: _fused_attention_backward_flops for op in backward}}


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of one no-grad forward of ``model`` on ``x``, fused attention included."""
    counter = FlopCounterMode(display=False, custom_mapping=attention_flop_mapping())
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops()
