"""``--precision``: the autocast dtype of the network forward, and the forward that applies it.

Only the network runs in reduced precision: its logits are cast to float32 as soon as it returns, so the
sliding-window blending, softmax, ensemble means, resampling and argmax are float32 whatever ``--precision`` says.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from usema.errors import UsemaError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bfloat16 kernels on this processor (AVX512-BF16 or AMX); elsewhere bf16 autocast
    would emulate them, slower than float32."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and torch.backends.mkldnn.is_available() and check())


def autocast_dtype(precision: str, device: torch.device, option: str = "--precision") -> torch.dtype | None:
    """The autocast dtype of ``--precision`` on ``device`` (None: float32, no autocast).

    ``auto`` is fp16 on CUDA (nnU-Net's inference AMP) and fp32 on the CPU. A precision the device cannot run is a
    UsemaError naming ``option`` (``--precision``, or ``train.precision`` for training).
    """
    if precision not in PRECISIONS:
        raise UsemaError(f"{option}: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = device.type == "cuda"
    if precision == "auto":
        return torch.float16 if cuda else None
    if precision == "fp16" and not cuda:
        raise UsemaError(f"{option} fp16 needs a CUDA device; use bf16 on CPU")
    if precision == "bf16" and not cuda and not cpu_supports_bf16():
        raise UsemaError(f"{option} bf16: expected a processor with bfloat16 support (AVX512-BF16 or AMX) on the "
                         "CPU, this one has none; use fp32")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UsemaError(f"{option} bf16: expected a GPU with bfloat16 support, {device} has none; use fp16")
    return _DTYPES[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """``fp32``, ``bf16`` or ``fp16``: what :func:`autocast_dtype` chose, for summaries."""
    return _NAMES[dtype]


class AutocastForward(nn.Module):
    """``network`` under ``torch.autocast(device_type, dtype)``, returning float32 logits.

    A module (not a closure) so that torch.compile traces the autocast region and the cast with the network; it
    adds no parameters, and the wrapped network's own state_dict is untouched.
    """

    def __init__(self, network: nn.Module, dtype: torch.dtype, device_type: str):
        super().__init__()
        self.network, self.dtype, self.device_type = network, dtype, device_type
        self.train(network.training)  # a fresh module starts in training mode; keep the network's

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            logits = self.network(image)
        return logits.float()


def autocast_forward(network: nn.Module, dtype: torch.dtype | None, device: torch.device) -> nn.Module:
    """``network`` itself for float32, else its :class:`AutocastForward`."""
    return network if dtype is None else AutocastForward(network, dtype, device.type)
