"""bce_dice_loss against a hand-written numpy evaluation of the official formula (docs/official-pipeline.md §6),
its gradient (gradcheck in float64), layouts, autocast and bad shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segevol_fast.errors import ShapeError
from segevol_fast.train.loss import bce_dice_loss


def numpy_reference(logits: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """(bce, dice) of the official loss in float64, written out voxel by voxel from the formula."""
    x = logits.astype(np.float64).reshape(len(logits), -1)
    t = target.astype(np.float64).reshape(len(target), -1)
    t = np.where(t == -1, 0.0, t)
    # BCE with logits: -(t log s(x) + (1 - t) log(1 - s(x))), in its overflow-free form
    bce = np.mean(np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x))))
    p = 1.0 / (1.0 + np.exp(-x))
    losses = [1 - 2 * np.sum(p[n] * t[n]) / (np.sum(p[n]) + np.sum(t[n]) + 1) for n in range(len(x))]
    return float(bce), float(np.mean(losses))


def random_case(n=3, shape=(4, 5, 6), soft=False, ignore=False):
    logits = torch.randn(n, 1, *shape) * 3
    target = torch.rand(n, 1, *shape) if soft else (torch.rand(n, 1, *shape) > 0.6).float()
    if ignore:
        target[torch.rand_like(target) < 0.2] = -1
    return logits, target


@pytest.mark.parametrize("soft,ignore", [(False, False), (True, False), (False, True)])
def test_matches_numpy_formula(soft, ignore):
    logits, target = random_case(soft=soft, ignore=ignore)
    total, bce, dice = bce_dice_loss(logits, target, return_parts=True)
    ref_bce, ref_dice = numpy_reference(logits.numpy(), target.numpy())
    assert bce.item() == pytest.approx(ref_bce, rel=1e-5)
    assert dice.item() == pytest.approx(ref_dice, rel=1e-5)
    assert total.item() == pytest.approx(ref_bce + ref_dice, rel=1e-5)
    assert total.dtype == torch.float32 and total.dim() == 0
    assert torch.equal(bce_dice_loss(logits, target), total)


def test_known_values_at_zero_logits():
    """logits 0 -> p = 0.5 everywhere: bce = log 2; with an empty target dice = 1 exactly, with a
    full one dice = 1 - 2 * 0.5V / (0.5V + V + 1)."""
    v = 2 * 3 * 4
    zeros = torch.zeros(2, 1, 2, 3, 4)
    _, bce, dice = bce_dice_loss(zeros, torch.zeros_like(zeros), return_parts=True)
    assert bce.item() == pytest.approx(math.log(2), rel=1e-6)
    assert dice.item() == pytest.approx(1.0, abs=1e-7)
    _, bce, dice = bce_dice_loss(zeros, torch.ones_like(zeros), return_parts=True)
    assert bce.item() == pytest.approx(math.log(2), rel=1e-6)
    assert dice.item() == pytest.approx(1 - v / (1.5 * v + 1), rel=1e-6)


def test_minus_one_targets_count_as_background():
    logits, target = random_case()
    ignored = target.clone()
    ignored[target == 0] = -1
    assert torch.allclose(bce_dice_loss(logits, ignored), bce_dice_loss(logits, target))


def test_dice_is_per_sample_then_averaged():
    """Two samples with very different foreground sizes: the mean of per-sample Dice differs from a
    Dice pooled over the batch, and the loss must be the former."""
    logits = torch.full((2, 1, 2, 4, 4), 4.0)
    target = torch.zeros_like(logits)
    target[0] = 1
    target[1, 0, 0, 0, 0] = 1
    _, _, dice = bce_dice_loss(logits, target, return_parts=True)
    assert dice.item() == pytest.approx(numpy_reference(logits.numpy(), target.numpy())[1], rel=1e-6)
    p = torch.sigmoid(logits)
    pooled = 1 - 2 * (p * target).sum() / (p.sum() + target.sum() + 1)
    assert abs(dice.item() - pooled.item()) > 0.05


def test_layouts_with_and_without_channel_agree():
    logits, target = random_case()
    ref = bce_dice_loss(logits, target)
    assert torch.equal(bce_dice_loss(logits[:, 0], target[:, 0]), ref)
    assert torch.equal(bce_dice_loss(logits, target[:, 0]), ref)
    assert torch.equal(bce_dice_loss(logits, target.bool()), bce_dice_loss(logits, target.float()))


def test_gradcheck_float64():
    logits = torch.randn(2, 1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    target = torch.rand(2, 1, 2, 3, 2, dtype=torch.float64)
    target[0, 0, 0, 0, 0] = -1
    assert torch.autograd.gradcheck(lambda x: bce_dice_loss(x, target), (logits,))
    assert bce_dice_loss(logits, target).dtype == torch.float64


def test_half_precision_inputs_are_computed_in_float32():
    logits, target = random_case(soft=True)
    low = logits.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bce_dice_loss(low, target)
    assert out.dtype == torch.float32
    ref_bce, ref_dice = numpy_reference(low.detach().float().numpy(), target.numpy())
    assert out.item() == pytest.approx(ref_bce + ref_dice, rel=1e-5)
    out.backward()
    assert low.grad is not None and torch.isfinite(low.grad.float()).all()


@pytest.mark.parametrize(
    "logits_shape,target_shape",
    [
        ((2, 1, 3, 4, 5), (2, 1, 3, 4, 6)),
        ((2, 2, 3, 4, 5), (2, 2, 3, 4, 5)),
        ((3, 4, 5), (3, 4, 5)),
        ((2, 1, 3, 4, 5), (1, 1, 3, 4, 5)),
    ],
)
def test_bad_shapes_raise(logits_shape, target_shape):
    with pytest.raises(ShapeError):
        bce_dice_loss(torch.zeros(logits_shape), torch.zeros(target_shape))
