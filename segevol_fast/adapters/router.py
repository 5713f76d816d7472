"""The learned router of a mixture of adapters: which expert (or the identity) each image takes.

It reads the mean of the image's patch tokens and gives logits over the K + 1 experts (column 0
the identity); `learned_route` turns them into a `Route` (top-1 or soft), see `mixture`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import AdapterModule
from .routing import Route


class Router(AdapterModule):
    """Mean patch token (B, hidden) -> logits (B, K + 1), column 0 the identity expert.

    The mean patch tokens of different scans are nearly parallel (cosine ~0.999 between a CT and
    an MRI on the study's base: the position embedding and bias dominate), so a Linear on them
    sees almost one input and sends every scan to the same expert. The features are therefore
    standardised first with running statistics (batch statistics while training on more than one
    image, BatchNorm-style; the running ones otherwise, so inference routes each scan alone and
    deterministically), which turns the small differences between scans into O(1) features.
    The model is still the base model at step 0 whatever the router picks: experts start at zero.
    """

    def __init__(self, hidden: int, experts: int, momentum: float = 0.1):
        super().__init__()
        self.proj = nn.Linear(hidden, experts + 1)
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(hidden))
        self.register_buffer("running_var", torch.ones(hidden))
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.int64))
        self.aux_loss: Optional[Tensor] = None

    def forward(self, pooled: Tensor) -> Tensor:
        x = pooled.float()
        if self.training and x.shape[0] > 1:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            with torch.no_grad():
                first = int(self.batches_seen) == 0  # start from the first batch, not from 0 / 1
                m = 1.0 if first else self.momentum
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach(), m)
                self.batches_seen += 1
        else:
            mean, var = self.running_mean, self.running_var
        return self.proj(((x - mean) / torch.sqrt(var + 1e-5)).to(self.proj.weight.dtype))


def learned_route(
    router: Router, names: tuple[str, ...], routing: str, balance_weight: float, images: Tensor, embed: nn.Module
) -> Route:
    """The Route a learned router picks for images (B, 1, D, H, W), read through the base model's
    patch embedding `embed` (one cheap pass, so the choice is known before the first adapted
    block): "soft" gates every expert by its probability; "top1" sends each image to its most
    probable expert and leaves the load-balancing loss on `router.aux_loss`."""
    tokens = embed(images.to(router.proj.weight.dtype))  # (B, N, hidden)
    probs = torch.softmax(router(tokens.mean(dim=1)).float(), dim=-1)  # (B, K + 1)
    if routing == "soft":
        router.aux_loss = None
        return Route(names, gates=probs[:, 1:])
    choice = probs.argmax(dim=-1)
    K1 = probs.shape[1]
    f = F.one_hot(choice, K1).float().mean(dim=0)
    router.aux_loss = balance_weight * K1 * (f * probs.mean(dim=0)).sum()
    if not torch.is_grad_enabled():
        return Route(names, index=choice - 1)
    chosen = probs.gather(1, choice[:, None])  # (B, 1)
    gates = F.one_hot(choice, K1)[:, 1:].to(probs.dtype) * (chosen / chosen.detach())
    return Route(names, gates=gates)
