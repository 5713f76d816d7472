"""Encoder calls shared by the training step and validation: text embeddings that do not depend on
what was encoded before, and a mixture's route applied around a call."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import adapters


def encode_names(model: nn.Module, names: Sequence[str], modality: str) -> Tensor:
    """Text embeddings (N, hidden) of `names`, each name encoded on its own.

    `encode_text` runs the names missing from its cache as one padded batch, and a name's
    embedding then differs in the last bits with the batch it first came in (padding length,
    batched matmuls). One name per call makes every cached embedding independent of history, which
    bit-exact resume and history-independent evaluation need; the cache makes it cheap."""
    return torch.cat([model.encode_text([n], modality) for n in names])


def routed(route):
    """`adapters.route(route)` for the block, or nothing when there is no route (no mixture)."""
    return contextlib.nullcontext() if route is None else adapters.route(route)
