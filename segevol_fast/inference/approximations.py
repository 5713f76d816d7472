"""What fast mode may leave out of the zoom-in, each a switch: the settings and their checks.

Fast mode's zoom-in is the official one computed differently (`fast.py`) unless one of these is on:

* overlap:      the share of a window its grid neighbours cover, per axis (officially 0.5). Less
                overlap tiles an ROI with fewer windows: about (1 - 0.5) / (1 - overlap) fewer per
                axis longer than the window.
* token_subset: encode only the tokens of a window that hold image (plus `token_margin` tokens of
                padding a side), with the position embeddings of their true places. A window
                hanging over the crop on an axis shorter than the window is mostly zero padding;
                the padding left out still takes its share of attention through one summary
                token per cell of padding, whose output fills the cell back (`token_fill`
                "summary_fine"; other fills in `window_tokens.py`).
* skip_empty:   leave out the windows of an ROI whose region, grown by `skip_margin` crop voxels a
                side, holds no coarse foreground; their voxels keep the coarse result, as they do
                wherever the official zoom-in does not reach.

`Approximations.none()` is the official zoom-in. `Approximations()` are the defaults, set from the
agreement table in docs/benchmarks.md ("Fast mode's approximations"): an approximation is on by
default only where every measured case kept Dice >= 0.99 against exact mode on the small trained
model and >= 0.98 on random weights. None has passed yet, so the defaults are the official zoom-in
and each approximation is opt-in (with its measured agreement to go by). Exact mode ignores them:
it is the official algorithm step by step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

from ..errors import ArgumentTypeError, InvalidArgumentError
from .window_tokens import DEFAULT_FILL, DEFAULT_MARGIN, FILLS


@dataclass(frozen=True)
class Approximations:
    """Fast mode's zoom-in approximations (module docstring); checked when made."""

    overlap: float = 0.5
    token_subset: bool = False
    token_margin: int = DEFAULT_MARGIN
    token_fill: str = DEFAULT_FILL
    skip_empty: bool = False
    skip_margin: int = 0

    @classmethod
    def none(cls) -> "Approximations":
        """The official zoom-in: overlap 0.5, every token, every window of the ROI."""
        return cls(overlap=0.5, token_subset=False, skip_empty=False)

    def __post_init__(self) -> None:
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, (int, float)):
            raise ArgumentTypeError(f"overlap must be a number in [0, 1), got {self.overlap!r}")
        if not 0 <= self.overlap < 1:
            raise InvalidArgumentError(f"overlap must be in [0, 1), got {self.overlap}")
        for name in ("token_subset", "skip_empty"):
            if not isinstance(getattr(self, name), bool):
                raise ArgumentTypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("token_margin", "skip_margin"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgumentError(f"{name} must be a non-negative int, got {value!r}")
        if self.token_fill not in FILLS:
            raise InvalidArgumentError(f"token_fill must be one of {FILLS}, got {self.token_fill!r}")

    @property
    def is_official(self) -> bool:
        """True when nothing is left out: the zoom-in encodes what the official one does."""
        return self.overlap == 0.5 and not self.token_subset and not self.skip_empty

    def summary(self) -> dict:
        """JSON-ready settings."""
        return dataclasses.asdict(self)


ApproximationsLike = Union[Approximations, str, dict, None]


def as_approximations(value: ApproximationsLike) -> Approximations:
    """`segment(approximations=...)`: an `Approximations`; "default" or None (the defaults);
    "none" (the official zoom-in); or a dict of fields changed from the defaults, e.g.
    {"overlap": 0.25} or {"skip_empty": False}."""
    if value is None or value == "default":
        return Approximations()
    if value == "none":
        return Approximations.none()
    if isinstance(value, Approximations):
        return value
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(Approximations)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidArgumentError(f"unknown approximation setting(s) {unknown}; known: {sorted(known)}")
        return Approximations(**value)
    if isinstance(value, str):
        raise InvalidArgumentError(f"approximations must be 'default', 'none', a dict or Approximations, got {value!r}")
    raise ArgumentTypeError(
        f"approximations must be 'default', 'none', a dict or an Approximations, got {type(value).__name__}"
    )


@dataclass
class ZoomInCounts:
    """What one fast zoom-in encoded, against the official zoom-in on the same ROIs.

    windows_official: distinct windows of the official grid (overlap 0.5) meeting the ROIs.
    windows_planned:  distinct windows the run needed after its overlap and skipping.
    windows_skipped:  windows left out for holding no coarse foreground (summed over prompts).
    windows_encoded:  encoder calls' windows (cache hits of a session are not counted).
    tokens_official:  windows_official full windows' tokens; tokens_encoded: what was encoded.
    """

    windows_official: int = 0
    windows_planned: int = 0
    windows_skipped: int = 0
    windows_encoded: int = 0
    tokens_official: int = 0
    tokens_encoded: int = 0

    def add(self, other: "ZoomInCounts") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def summary(self) -> dict:
        return dataclasses.asdict(self)
