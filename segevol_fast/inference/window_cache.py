"""Window embeddings kept for reuse across zoom-in prompt groups (and, in a session, across calls)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from torch import Tensor


class WindowCache:
    """At most `capacity` window embeddings, least recently used evicted first (`hits` / `misses`
    count lookups). Keys are
    (window, adapter state of the image encoder): an embedding computed under one adapter or
    route is never returned under another (`model.seams`)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.data: OrderedDict[tuple, Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> Optional[Tensor]:
        if key in self.data:
            self.data.move_to_end(key)
            self.hits += 1
            return self.data[key]
        self.misses += 1
        return None

    def __len__(self) -> int:
        return len(self.data)

    def put(self, key: tuple, value: Tensor) -> None:
        if self.capacity <= 0:
            return
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.capacity:
            self.data.popitem(last=False)
