"""Which adapter each batch row uses during a call: a route, set for the duration of a `with`.

Adapted layers see inputs whose first axis is the batch (windows or volumes for the encoder; the
decoder decodes one image's prompts at a time, so its route is that image's). A `Route` gives,
per batch row, either an adapter index into `names` (-1 = the base model, an identity expert) or
gate weights over `names` (a soft mixture). Rows sharing an adapter form the segments that
`ops.routed_lora_linear` takes, so a mixed batch is one routed call per layer, not a loop.

The route lives in a ContextVar, so it follows the call (threads and async tasks keep their own)
and never leaks past the `with`.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

from ..errors import AdapterError


@dataclass(frozen=True)
class Route:
    """names: the adapters a call may use, in the order `index`/`gates` refer to them.
    index: (B,) int64, adapter per batch row, -1 = base model; or
    gates: (B, len(names)) float, per-row weights of each adapter (rows need not sum to 1: the rest
    is the identity expert's share)."""

    names: tuple[str, ...]
    index: Optional[Tensor] = None
    gates: Optional[Tensor] = None

    def __post_init__(self):
        if (self.index is None) == (self.gates is None):
            raise AdapterError("a Route needs exactly one of index= (hard routing) or gates= (soft routing)")
        if not self.names:
            raise AdapterError("a Route needs at least one adapter name")
        if self.index is not None:
            if self.index.dim() != 1 or self.index.dtype.is_floating_point:
                raise AdapterError(
                    f"Route index must be a (B,) integer tensor, got {self.index.dtype} {tuple(self.index.shape)}"
                )
            if self.index.numel() and (int(self.index.min()) < -1 or int(self.index.max()) >= len(self.names)):
                raise AdapterError(f"Route index values must be in [-1, {len(self.names)}), got {self.index.tolist()}")
        elif self.gates.dim() != 2 or self.gates.shape[1] != len(self.names):
            raise AdapterError(f"Route gates must be (B, {len(self.names)}), got {tuple(self.gates.shape)}")

    def row(self, i: int) -> "Route":
        """Batch row i's choice alone, for a call that broadcasts it (one image's decode)."""
        if self.index is not None:
            return Route(self.names, index=self.index[i : i + 1])
        return Route(self.names, gates=self.gates[i : i + 1])

    @property
    def rows(self) -> int:
        return (self.index if self.index is not None else self.gates).shape[0]

    def key(self) -> tuple:
        """Hashable identity for caches (`model.seams`): names and the per-row choice. Soft gates
        change every training step and are never cached on: their key is the tensor's identity
        and version."""
        if self.index is not None:
            return self.names, "index", tuple(self.index.tolist())
        return self.names, "gates", id(self.gates), self.gates._version


_ROUTE: contextvars.ContextVar[Optional[Route]] = contextvars.ContextVar("segevol_fast_route", default=None)


def current_route() -> Optional[Route]:
    return _ROUTE.get()


@contextlib.contextmanager
def route(names, index=None, gates=None) -> Iterator[Route]:
    """Route batch rows to adapters for the calls inside the block (`names` may be a Route).

    with route(["mr", "pet"], index=[0, 1, -1]):   # row 0 -> "mr", 1 -> "pet", 2 -> base
        emb = model.encode_image(windows)           # (3, 1, D, H, W)
    """
    if isinstance(names, Route):
        r = names
    else:
        if index is not None and not isinstance(index, Tensor):
            index = torch.as_tensor(list(index), dtype=torch.int64)
        r = Route(tuple(names), index, gates)
    token = _ROUTE.set(r)
    try:
        yield r
    finally:
        _ROUTE.reset(token)


@contextlib.contextmanager
def no_route() -> Iterator[None]:
    """Run the block with no route (each layer's active adapter), e.g. inside a routed call."""
    token = _ROUTE.set(None)
    try:
        yield
    finally:
        _ROUTE.reset(token)
