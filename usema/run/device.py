"""The one reading of ``--device``: where a command's network runs."""

from __future__ import annotations

import torch

from usema.errors import UsemaError


def resolve_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda`` (this process's GPU under torchrun: ``local_rank``), ``cuda:N``, or None for CUDA
    when available, else the CPU. Asking for CUDA where there is none is a UsemaError."""
    if requested is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if requested == "cpu":
        return torch.device("cpu")
    index = requested.removeprefix("cuda:") if requested.startswith("cuda:") else None
    if requested != "cuda" and not (index and index.isdigit()):
        raise UsemaError(f"--device: expected cpu or cuda, got {requested!r}")
    if not torch.cuda.is_available():
        raise UsemaError(f"--device {requested}: no CUDA device is available (use --device cpu)")
    return torch.device("cuda", local_rank if index is None else int(index))


def inference_memory_format(network: torch.nn.Module, device: torch.device) -> torch.memory_format:
    """The weight layout ``network`` runs inference in on ``device``: its declared ``inference_memory_format``
    on CPU (USEMA: channels-last), else PyTorch's default. Only CPU timings back the choice; MONAI's networks
    declare none, and BasicUNet and DynUNet are 19-44% slower channels-last."""
    return _declared_on_cpu(getattr(network, "inference_memory_format", None), device)


def training_memory_format(network: torch.nn.Module, device: torch.device) -> torch.memory_format:
    """The layout ``network`` trains in on ``device``: its declared ``training_memory_format`` on CPU (2D USEMA:
    channels-last), else PyTorch's default. Weights and input batches both take it."""
    return _declared_on_cpu(getattr(network, "training_memory_format", None), device)


def _declared_on_cpu(declared: torch.memory_format | None, device: torch.device) -> torch.memory_format:
    return declared if declared is not None and device.type == "cpu" else torch.contiguous_format
