"""Loss, optimiser and learning-rate schedule as nnU-Net configures them (SPEC §4)."""

from __future__ import annotations

from typing import Iterable

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss

from usema.errors import UsemaError

POLY_EXPONENT = 0.9
SGD_MOMENTUM = 0.99
# nnU-Net clips the global gradient norm at 12
GRAD_CLIP_NORM = 12.0


class NnUNetDeepSupervisionLoss(DeepSupervisionLoss):
    """Deep-supervision loss with weights 1/2^i (highest resolution first), lowest level 0, normalised to sum 1."""

    def get_weights(self, levels: int = 1) -> list[float]:
        weights = [0.5**i for i in range(max(1, levels))]
        if len(weights) > 1:
            weights[-1] = 0.0  # the coarsest head is too coarse to help (nnU-Net)
        total = sum(weights)
        return [w / total for w in weights]


def build_loss() -> NnUNetDeepSupervisionLoss:
    """Dice + CE on softmax logits; targets (B, 1, *spatial) of class indices.

    Accepts a single logits tensor (B, K, *spatial) or a list of them, highest resolution first; lower
    levels get nearest-neighbour downsampled targets. Dice is batch Dice over the foreground classes
    (nnU-Net); cross-entropy uses every class.
    """
    return NnUNetDeepSupervisionLoss(
        DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    )


def build_optimizer(
    params: Iterable[torch.nn.Parameter], name: str, lr: float = 0.01, weight_decay: float = 3.0e-5
) -> torch.optim.Optimizer:
    """``sgd`` = SGD, Nesterov momentum 0.99 (nnU-Net); ``adamw`` = AdamW with default betas."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, nesterov=True, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise UsemaError(f"train.optimizer: expected sgd or adamw, got {name!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str = "poly", total_steps: int = 1
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-iteration schedule over ``total_steps``: ``poly`` (exponent 0.9) or ``cosine`` (to 0)."""
    total_steps = max(1, total_steps)
    if name == "poly":
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_steps, power=POLY_EXPONENT)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    raise UsemaError(f"train.schedule: expected poly or cosine, got {name!r}")
