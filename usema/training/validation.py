"""Validation during training: sliding-window prediction on whole held-out cases, per-class Dice.

Dice follows the challenges (SPEC §5): background excluded, empty truth and empty prediction = 1, a false
positive on empty truth = 0 (MONAI ``DiceMetric(ignore_empty=False)``). Under DDP the cases are split by
rank and the per-class sums are all-reduced, so every rank returns the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric

from usema.inference.predictor import make_inferer, predict_logits
from usema.training.distributed import DistContext, all_reduce_sum


@dataclass
class ValidationResult:
    """Mean Dice per foreground class over all cases (``class_dice[k-1]`` is label k), and one example."""

    class_dice: list[float]
    num_cases: int
    example: dict[str, np.ndarray] | None = None  # {"image", "truth", "pred"} of the first case (rank 0)

    @property
    def mean_dice(self) -> float:
        return float(np.mean(self.class_dice))


def case_dice(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class Dice (num_classes - 1,) of label maps ``pred`` and ``truth`` (*spatial) int, background excluded."""
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False, num_classes=num_classes)
    return metric(pred[None, None], truth[None, None])[0]


@torch.no_grad()
def validate(
    network: torch.nn.Module,
    cases: Sequence[dict[str, Any]],
    num_classes: int,
    roi_size: Sequence[int],
    net_spatial_dims: int,
    slice_axis: int,
    ctx: DistContext,
    overlap: float,
    sw_batch_size: int,
    autocast_dtype: torch.dtype | None = None,
) -> ValidationResult:
    """Predict every case (``{"image": (C, *spatial) float32, "label": (*spatial) int}``) and average Dice.

    ``network`` must be the bare module (not the DDP wrapper): each rank predicts its own cases.
    """
    was_training = network.training
    network.eval()
    sums = torch.zeros(num_classes, dtype=torch.float64)  # per-class Dice sums, then the case count
    example = None
    for index in range(ctx.rank, len(cases), ctx.world_size):
        case = cases[index]
        image = torch.from_numpy(np.ascontiguousarray(case["image"], dtype=np.float32))[None].to(ctx.device)
        inferer = make_inferer(
            roi_size, image.ndim - 2, net_spatial_dims, slice_axis, overlap=overlap, sw_batch_size=sw_batch_size
        )
        with torch.autocast(ctx.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = predict_logits(network, image, inferer)
        pred = logits[0].argmax(0).cpu()
        truth = torch.from_numpy(np.asarray(case["label"]).astype(np.int64))
        sums[:-1] += case_dice(pred, truth, num_classes).double()
        sums[-1] += 1
        if example is None:
            example = {"image": case["image"], "truth": truth.numpy(), "pred": pred.numpy()}
    all_reduce_sum(sums, ctx)
    count = int(sums[-1].item())
    class_dice = (sums[:-1] / max(count, 1)).tolist()
    network.train(was_training)
    return ValidationResult(class_dice=class_dice, num_cases=count, example=example)
