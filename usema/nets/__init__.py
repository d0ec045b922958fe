"""Networks: the SEMA formula, the SEMA block, USEMA, and a factory for USEMA and its MONAI peers (no I/O)."""

from usema.nets.factory import NETWORK_NAMES, build_network
from usema.nets.sema import SEMAAttention, SEMABlock, global_value_mean, sema_attention
from usema.nets.usema import PRESETS, SEMA_PLACEMENTS, USEMA, USEMAConfig

__all__ = [
    "NETWORK_NAMES",
    "PRESETS",
    "SEMA_PLACEMENTS",
    "SEMAAttention",
    "SEMABlock",
    "USEMA",
    "USEMAConfig",
    "build_network",
    "global_value_mean",
    "sema_attention",
]
