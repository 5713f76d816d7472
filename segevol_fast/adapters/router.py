"""The learned router of a mixture of adapters: which expert (or the identity) each image takes.

What the router reads of an image (`scan_features`) is its mean patch token measured from a fixed
origin: minus the mean token of a blank (all-zero) image, divided by how far a uniform unit image
lies from that blank one (one number, the RMS over the hidden width). Both references come from
the base model's patch embedding alone, not from the data, so

  * training and inference, one image or a batch, see the same input for the same image;
  * nothing needs saving beside the router's parameters, restoring on resume or syncing across
    ranks: the base weights fix the references, and an adapter file is tied to them by hash.

Why not standardise with batch or running statistics (BatchNorm-style, as this router once did):
at one image per rank the statistics never update, at two every feature is +-1, and training
then sees other inputs than inference. Why not a per-image LayerNorm: it divides each image by its
own scale, so scans that differ mostly in brightness (a CT and an MRI after preprocessing) come
out nearly alike, and it keeps the large scan-independent part (position embedding and bias, cosine
~0.999 between a CT's and an MRI's mean token on a trained base) that hides the differences. The
blank image's token is exactly that scan-independent part: what is left is what the scan adds.

Training (top-1): the chosen expert runs alone (the forward is the inference forward), and the
router learns from the task loss through the straight-through gates `onehot + (p - p.detach())`,
which equal the one-hot choice in the forward and have the soft mixture's gradient: dL/dp_e is the
first-order effect on the loss of blending in a little of expert e, for every expert e, chosen or
not. The identity expert adds no delta, so its probability has no gradient of its own; it learns
through the softmax all the same: when blending in the experts would raise the loss, their
probabilities fall and the identity's rises (dL/dlogit_identity = -p_identity * sum_e p_e dL/dp_e),
and the other way round. So an image routed to the identity still teaches the router whether an
expert would have served it better, which a gate on the chosen expert alone (zero for the
identity) cannot.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import AdapterModule
from .routing import Route

_RETIRED = (
    "the file was saved by an earlier router that standardised its input with running batch statistics; "
    "this version reads scans on a fixed scale instead (see adapters/router.py), so the saved router "
    "weights would route differently. Train the mixture again with this version."
)


class Router(AdapterModule):
    """Router features (B, hidden) -> logits (B, K + 1), column 0 the identity expert.

    At step 0 the model is the base model whatever the router picks: experts start at zero."""

    # tensors of the earlier layout: a file holding them is refused with this reason (adapters.io)
    retired_tensors = dict.fromkeys(("running_mean", "running_var", "batches_seen"), _RETIRED)

    def __init__(self, hidden: int, experts: int):
        super().__init__()
        # a learned centre of the scans' features (it starts at the blank image): an offset the
        # Linear's bias could express too, but Adam moves each coordinate of it as fast as a weight,
        # so the router soon splits scans on both sides of their middle instead of waiting on the
        # bias (scans all lie on one side of the blank image: with the bias alone every scan long
        # goes to the same expert)
        self.centre = nn.Parameter(torch.zeros(hidden))
        self.proj = nn.Linear(hidden, experts + 1)
        self.aux_loss: Optional[Tensor] = None

    def forward(self, features: Tensor) -> Tensor:
        return self.proj((features - self.centre.float()).to(self.proj.weight.dtype))


def scan_features(images: Tensor, embed: nn.Module, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, hidden) float32: each image's mean patch token minus a blank image's, over the RMS
    distance of a uniform unit image's from the blank one (see the module docstring). The
    references are computed alone, so an image's features do not depend on its batch."""
    pooled = embed(images.to(dtype)).float().mean(dim=1)
    with torch.no_grad():
        refs = torch.zeros((2, *images.shape[1:]), device=images.device, dtype=dtype)
        refs[1] = 1
        blank, unit = embed(refs).float().mean(dim=1)
        scale = (unit - blank).pow(2).mean().sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    return (pooled - blank) / scale


def learned_route(
    router: Router, names: tuple[str, ...], routing: str, balance_weight: float, images: Tensor, embed: nn.Module
) -> Route:
    """The Route a learned router picks for images (B, 1, D, H, W), read through the base model's
    patch embedding `embed` (one cheap pass, so the choice is known before the first adapted
    block): "soft" gates every expert by its probability; "top1" sends each image to its most
    probable expert and leaves the load-balancing loss on `router.aux_loss`. With autograd on,
    top-1 gates are straight-through (module docstring), so the router learns whichever expert
    each image took, the identity included."""
    probs = torch.softmax(router(scan_features(images, embed, router.proj.weight.dtype)).float(), dim=-1)
    if routing == "soft":
        router.aux_loss = None
        return Route(names, gates=probs[:, 1:])
    choice = probs.argmax(dim=-1)
    K1 = probs.shape[1]
    f = F.one_hot(choice, K1).float().mean(dim=0)
    router.aux_loss = balance_weight * K1 * (f * probs.mean(dim=0)).sum()
    if not torch.is_grad_enabled():
        return Route(names, index=choice - 1)
    soft = probs[:, 1:]
    gates = F.one_hot(choice, K1)[:, 1:].to(probs.dtype) + (soft - soft.detach())  # = the one-hot choice
    return Route(names, gates=gates)
