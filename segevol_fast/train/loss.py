"""The official per-decoder-call training loss: BCEWithLogits (mean) + binary Dice (docs/official-pipeline.md §6).

Official (`utils/loss.py` `BCELoss` + `BinaryDiceLoss`, smooth 1):

    bce  = BCEWithLogits(logits, t), mean over every voxel of the batch
    p    = sigmoid(logits)
    dice = mean over samples n of 1 - 2 * sum(p_n * t_n) / (sum(p_n) + sum(t_n) + 1)
    loss = bce + dice

Targets of -1 ("ignore" in pseudo labels) are set to 0 in both terms, as officially. Targets may
be fractional (labels resized with 'area'); both terms accept soft targets.

One official quirk is *not* reproduced: the official train step calls `logits.squeeze()`, so with
a batch of 1 its Dice is taken per depth slice instead of per sample. Here the Dice is always per
sample, which is what the official code computes for its batch of 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ShapeError

DICE_SMOOTH = 1.0  # official BinaryDiceLoss(smooth=1); added to the denominator only


def _flatten_per_sample(x: Tensor, name: str) -> Tensor:
    """(N, 1, D, H, W) or (N, D, H, W) -> (N, D*H*W)."""
    if x.dim() == 5 and x.shape[1] != 1:
        raise ShapeError(f"{name} must have one channel, (N, 1, D, H, W); got {tuple(x.shape)}")
    if x.dim() not in (4, 5):
        raise ShapeError(f"{name} must be (N, 1, D, H, W) or (N, D, H, W); got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def bce_dice_loss(logits: Tensor, target: Tensor, return_parts: bool = False):
    """Official SegVol loss of one decoder call.

    Args:
        logits: (N, 1, D, H, W) or (N, D, H, W) float logits (any float dtype; bf16/fp16 from
            autocast are cast up).
        target: same number of samples and voxels as `logits`, either layout; bool, integer or
            float, values in [0, 1] or -1 (ignored: counted as 0, like the official code).
        return_parts: also return the two terms.

    Returns:
        total: 0-d tensor = bce + dice, float32 (float64 if `logits` is float64, for gradcheck);
        with `return_parts=True`, the tuple (total, bce, dice) of 0-d tensors.
    """
    lg = _flatten_per_sample(logits, "logits")
    tg = _flatten_per_sample(target, "target")
    if lg.shape != tg.shape:
        raise ShapeError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    # float32 at least, even under autocast: the sums over ~2M voxels lose too much in bf16
    dtype = torch.promote_types(lg.dtype, torch.float32) if lg.is_floating_point() else torch.float32
    with torch.autocast(device_type=lg.device.type, enabled=False):
        lg = lg.to(dtype)
        tg = tg.to(dtype)
        tg = torch.where(tg == -1, torch.zeros_like(tg), tg)
        bce = F.binary_cross_entropy_with_logits(lg, tg, reduction="mean")
        p = torch.sigmoid(lg)
        score = 2 * (p * tg).sum(dim=1) / (p.sum(dim=1) + tg.sum(dim=1) + DICE_SMOOTH)
        dice = (1 - score).mean()
        total = bce + dice
    return (total, bce, dice) if return_parts else total
