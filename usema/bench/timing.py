"""Latency and training-step timing in interleaved rounds (so machine noise hits every network alike)."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from usema.run.device import training_memory_format


def _timed(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def interleaved_rounds(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each step over ``repeats`` rounds; round r calls every step once, in order.

    Interleaving makes every network see the same slow phases of a shared machine, so ratios stay fair.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(_timed(step))
    return times


def forward_step(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    model.eval()

    def step() -> object:
        with torch.no_grad():
            return model(x)

    return step


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format | None = None,
) -> Callable[[], object]:
    """One SGD step on cross-entropy; the network is built without deep supervision (plain logits). The network
    and ``x`` take ``memory_format``, by default the layout ``usema train`` gives them on the CPU (channels-last
    for 2D USEMA). With ``autocast_dtype`` the forward runs under CPU autocast (as ``train.precision: bf16``), the
    loss in float32."""
    layout = memory_format or training_memory_format(model, torch.device("cpu"))
    model.train().to(memory_format=layout)
    x = x.contiguous(memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> object:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model(x)
        loss = loss_fn(logits.float(), target)
        loss.backward()
        optimizer.step()
        return loss

    return step
