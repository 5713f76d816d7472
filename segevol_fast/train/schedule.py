"""Learning-rate schedule of the trainer: linear warm-up, then cosine decay, per optimizer step.

Official SegVol steps LinearWarmupCosineAnnealingLR once per *epoch* (docs/official-pipeline.md §6); fine-tuning
runs are counted in optimizer steps here, so the same shape is applied per step:

    f(s) = (s + 1) / W                                   for s < W  (W = warmup_steps)
    f(s) = r + (1 - r) * (1 + cos(pi * p)) / 2,  p = (s - W) / max(1, T - W)   for s >= W

with T = total steps and r = min_lr_ratio; the lr of optimizer step s (0-based) is base_lr * f(s).
Warm-up starts at base_lr / W rather than 0 so the first step is never wasted.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..errors import InvalidArgumentError


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    """The factor f(step) of the module docstring (a Python float in [min_lr_ratio, 1])."""
    if step < 0 or total_steps < 1 or warmup_steps < 0:
        raise InvalidArgumentError(
            f"need step >= 0, total_steps >= 1, warmup_steps >= 0; got {step}, {total_steps}, {warmup_steps}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise InvalidArgumentError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """A LambdaLR applying `lr_multiplier`; call `.step()` after each optimizer step.

    The multiplier is a plain closure, so `state_dict()` holds only the step counter: a resumed
    run takes its schedule from its own config, not from the checkpoint."""
    lr_multiplier(0, total_steps, warmup_steps, min_lr_ratio)  # validate once, eagerly

    def factor(step: int) -> float:
        return lr_multiplier(step, total_steps, warmup_steps, min_lr_ratio)

    return LambdaLR(optimizer, factor)
