"""`OrganLabels`: the organs segmented so far in a viewer, as one label map with names and undo.

A viewer shows one Labels layer, one id per organ. Each organ's own mask is kept, so the map can
always be redrawn: where organs overlap the most recently set one wins (as in a segmentation
result's label map, where the later prompt wins), and clearing or undoing one re-exposes the
organs beneath it. Ids are stable: an organ keeps its id through refinements and undos, and a new
organ takes the smallest id no organ holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import ArgumentTypeError, InvalidArgumentError, ResultError, ShapeError
from ..io.palette import organ_rgb
from ..io.volume import check_3d_shape

BACKGROUND = "background"  # the name of id 0 in `features()`


@dataclass(frozen=True)
class _Step:
    """What one `set` replaced: the organ's mask before it (None: the organ was new) and the
    drawing order before it."""

    name: str
    before: Optional[np.ndarray]
    order: tuple[str, ...]


def label_color(label_id: int) -> tuple[float, float, float, float]:
    """A fixed RGBA (0..1) for an organ id: organ id i has the colour of the i-th mask in a preview
    PNG (`io.palette.organ_rgb(i - 1)`). Id 0 is transparent."""
    if label_id == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (*(v / 255 for v in organ_rgb(label_id - 1)), 1.0)


class OrganLabels:
    """The organs of one scan: {name: mask}, each with a stable id, drawn into one label map.

    shape:      the scan's (X, Y, Z); every mask must have it.
    undo_depth: how many `set`s `undo` can take back (each keeps one mask in memory).
    """

    def __init__(self, shape, undo_depth: int = 32):
        check_3d_shape(shape, "the scan")
        if isinstance(undo_depth, bool) or not isinstance(undo_depth, int) or undo_depth < 0:
            raise InvalidArgumentError(f"undo_depth must be an int >= 0, got {undo_depth!r}")
        self.shape = tuple(int(s) for s in shape)
        self.undo_depth = undo_depth
        self._masks: dict[str, np.ndarray] = {}
        self._ids: dict[str, int] = {}
        self._order: list[str] = []  # drawing order: the most recently set last, on top
        self._history: list[_Step] = []

    def __contains__(self, name: object) -> bool:
        return name in self._masks

    def __len__(self) -> int:
        return len(self._masks)

    def _mask(self, mask) -> np.ndarray:
        arr = np.asarray(mask)
        if arr.dtype.kind not in "biu":
            raise ArgumentTypeError(f"a mask must be boolean (or 0/1 integers), got dtype {arr.dtype}")
        if arr.shape != self.shape:
            raise ShapeError(f"a mask must have the scan's shape {self.shape}, got {arr.shape}")
        out = arr != 0  # always a fresh array: later edits of the caller's mask do not reach it
        out.flags.writeable = False
        return out

    def _known(self, name: str) -> None:
        if name not in self._masks:
            raise ResultError(f"no organ named {name!r}; the organs are {list(self.names().values())}")

    def set(self, name: str, mask) -> int:
        """Add the organ `name` or replace its mask (a refinement); return its id. It is drawn on
        top of every other organ until another is set."""
        if not isinstance(name, str) or not name.strip():
            raise ArgumentTypeError(f"an organ name must be a non-empty string, got {name!r:.60}")
        new = self._mask(mask)
        self._history.append(_Step(name, self._masks.get(name), tuple(self._order)))
        del self._history[: max(0, len(self._history) - self.undo_depth)]
        if name not in self._ids:
            used = set(self._ids.values())
            self._ids[name] = next(i for i in range(1, len(used) + 2) if i not in used)
        else:
            self._order.remove(name)
        self._masks[name] = new
        self._order.append(name)
        return self._ids[name]

    def clear(self, name: str) -> None:
        """Remove an organ; the organs it covered show again. Its `set`s leave the undo history:
        `undo` never brings back a cleared organ."""
        self._known(name)
        del self._masks[name], self._ids[name]
        self._order.remove(name)
        self._history = [step for step in self._history if step.name != name]

    def undo(self) -> Optional[str]:
        """Take back the last `set`: the organ gets its mask from before it, or goes if that `set`
        added it; the drawing order is restored too. Returns the organ's name, None when there is
        nothing to undo."""
        if not self._history:
            return None
        step = self._history.pop()
        if step.before is None:
            del self._masks[step.name], self._ids[step.name]
        else:
            self._masks[step.name] = step.before
        # organs cleared since that step are gone from its order; none can be missing from it
        # (one set after the step would be undone first), but keep any such one rather than lose it
        order = [n for n in step.order if n in self._masks]
        self._order = order + [n for n in self._order if n in self._masks and n not in order]
        return step.name

    def names(self) -> dict[int, str]:
        """{id: name}, by id."""
        return {i: n for n, i in sorted(self._ids.items(), key=lambda item: item[1])}

    def label_map(self) -> np.ndarray:
        """(X, Y, Z) uint16, 0 = background, each organ's id where it is the most recently set one."""
        out = np.zeros(self.shape, dtype=np.uint16)
        for name in self._order:
            out[self._masks[name]] = self._ids[name]
        return out

    def features(self) -> dict[str, list]:
        """Columns for napari's `Labels(features=...)`: `index` (the id, 0 = background first) and
        `name`, one row per id in use."""
        names = self.names()
        return {"index": [0, *names], "name": [BACKGROUND, *names.values()]}

    def colors(self) -> dict[int, tuple[float, float, float, float]]:
        """{id: RGBA} for every id in use, 0 (transparent background) included; an id's colour never
        changes (see `label_color`)."""
        return {i: label_color(i) for i in [0, *self.names()]}

    def masks(self) -> dict[str, np.ndarray]:
        """{name: read-only bool mask (X, Y, Z)}, by id; each organ's whole mask, overlaps included."""
        return {n: self._masks[n] for n in self.names().values()}
