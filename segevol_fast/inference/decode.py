"""Decoding many prompts against one image embedding: decoder inputs grouped by what they carry
(text / box / points) and decoded in batches, the batch halved on device out-of-memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..adapters.context import prompt_context
from ..model.network import SegVolNetwork
from .oom import Retries


@dataclass
class DecodeItem:
    """One decoder input: prompt index k, and its box (6,) / points ((P, 3), (P,)) in the window
    (or zoom-out) frame; the text comes from the prompt."""

    k: int
    box: Optional[Tensor]
    points: Optional[tuple[Tensor, Tensor]]

    def signature(self, has_text: bool) -> tuple:
        return has_text, self.box is not None, None if self.points is None else len(self.points[0])


def group_items(items: Sequence[DecodeItem], texts: dict[int, Tensor]) -> dict[tuple, list[DecodeItem]]:
    """Items by signature (what they carry), in order: each group can be stacked into one batch."""
    groups: dict[tuple, list[DecodeItem]] = {}
    for it in items:
        groups.setdefault(it.signature(it.k in texts), []).append(it)
    return groups


def batch_inputs(part: Sequence[DecodeItem], texts: dict[int, Tensor], dev) -> tuple:
    """(text (B, hidden) or None, boxes (B, 6) or None, points ((B, P, 3), (B, P)) or None) of
    items with one signature, on device dev."""
    text = torch.cat([texts[it.k] for it in part]) if part[0].k in texts else None
    boxes = torch.stack([it.box for it in part]).to(dev) if part[0].box is not None else None
    points = None
    if part[0].points is not None:
        points = (
            torch.stack([it.points[0] for it in part]).to(dev),
            torch.stack([it.points[1] for it in part]).to(dev),
        )
    return text, boxes, points


def plain_decode(model) -> bool:
    """Whether `model.decode` is `SegVolNetwork.decode` itself, which takes region= and
    reassociate= (a replaced decode, e.g. a subclass's or an instance attribute, need not)."""
    return getattr(type(model), "decode", None) is SegVolNetwork.decode and "decode" not in vars(model)


def decode_items(
    model,
    emb: Tensor,
    items: Sequence[DecodeItem],
    texts: dict[int, Tensor],
    chunk,
    tasks: Sequence,
    decode=None,
    reassociate: bool = False,
):
    """Decode items against emb (1, hidden, *grid), batching items with the same signature in
    chunks of `chunk` (an int, or a `Retries`: its plan's decode batch, halved on out-of-memory,
    the same items then decoded again). tasks[k]: prompt k's structure name (or None), declared to
    adapters per decode batch (`adapters.prompt_context`). decode: None for `model.decode`, or
    decode(part, text, boxes, points) -> (B, *spatial) float32 for another way to decode the
    batch `part` (`window_decode.py`). reassociate: `model.decode(reassociate=True)` (the same
    function, cheaper products: `model/cross_attention.py`) where the model's decode is the plain
    one. Yields (item, logits (*spatial) float32 on the model's device)."""
    retry = chunk if isinstance(chunk, Retries) else None
    extra = {"reassociate": True} if reassociate and plain_decode(model) else {}
    dev = emb.device
    for group in group_items(items, texts).values():
        s = 0
        while s < len(group):
            part = group[s : s + (retry.plan.decode_batch if retry is not None else chunk)]
            text, boxes, points = batch_inputs(part, texts, dev)

            def call(part=part, text=text, boxes=boxes, points=points):
                with prompt_context(tasks=[tasks[it.k] for it in part]):
                    if decode is not None:
                        return decode(part, text, boxes, points)
                    return model.decode(emb, text_embedding=text, boxes=boxes, points=points, **extra)[:, 0]

            logits = call() if retry is None else retry.attempt("decoder", call)
            if logits is None:
                continue  # the decode batch was halved: the same items again
            s += len(part)
            yield from zip(part, logits)
