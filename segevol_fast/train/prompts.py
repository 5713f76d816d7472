"""Training prompts drawn from a ground-truth mask: box, points and the official six-way mix
(docs/official-pipeline.md §5.2, §6; GitHub `build_prompt_label`, `select_points`; HF `generate_box(bbox_shift)`).

Every random draw comes from the `torch.Generator` passed in (never the global RNG), so the same
generator state gives the same prompts. Sampling runs on the CPU (a mask elsewhere is copied
there); outputs are CPU tensors for the caller to move.

Frames: the mask is (D, H, W) in the frame the decoder sees (spatial_size, 32x256x256
officially). Boxes are (6,) float32 (d_min, h_min, w_min, d_max, h_max, w_max), maxima inclusive,
all -1 for "no box"; points are (P, 3) float32 voxel (d, h, w) with (P,) int64 labels 1 positive,
0 negative, -1 padding: exactly `SegVol.decode`'s `boxes` / `points` rows.

Official behaviours kept on purpose:
* the same box and points are used by all six mixes of one step (`build_prompt_label` draws once):
  `sample_prompts(mask, None, g)` draws them once and `restrict_to_mix` picks a mix's fields;
* the extra positives come from a permutation of all positives, so they may repeat the first one;
  fewer candidates than requested give fewer points (then more padding);
* a mask with no voxel > 0.9 gives a (-1, -1, -1) label -1 point in the first slot, no extra
  positives, and still the negatives (official `select_points`). Training normally skips such
  masks (official: empty categories are skipped); this only makes the call total.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import ArgumentTypeError, InvalidArgumentError, ShapeError
from ..geometry.prompt_frames import generate_box

POSITIVE_THRESHOLD = 0.9  # official select_points: value > 0.9 is a positive candidate
NEGATIVE_THRESHOLD = 0.1  # ... and value < 0.1 a negative one (area-resized masks are fractional)
MAX_EXTRA_POSITIVES = 10  # official build_prompt_label: randint(0, 10) extra positives
MAX_NEGATIVES = 10  # ... and randint(0, 10) negatives
POINTS_PAD_TO = 21  # fix_extra_point_num = 10 + 10, plus the first positive
HF_BOX_JITTER = 10  # HF build_prompt_label bbox_shift (GitHub: 0, the exact GT box)


@dataclass(frozen=True)
class PromptMix:
    """One of the official prompt combinations of a supervised step."""

    name: str
    text: bool
    box: bool
    points: bool


# official supervised_forward order (docs/official-pipeline.md §6)
PROMPT_MIXES: tuple[PromptMix, ...] = (
    PromptMix("points+text", text=True, box=False, points=True),
    PromptMix("box+text", text=True, box=True, points=False),
    PromptMix("text", text=True, box=False, points=False),
    PromptMix("box", text=False, box=True, points=False),
    PromptMix("points", text=False, box=False, points=True),
    PromptMix("box+points", text=False, box=True, points=True),
)
_BY_NAME = {m.name: m for m in PROMPT_MIXES}
ALL_FIELDS = PromptMix("all", text=True, box=True, points=True)  # what `sample_prompts(mask, None)` draws


# ------------------------------------------------------------------------------ argument checks
def _check_generator(generator) -> torch.Generator:
    if generator is None:
        raise InvalidArgumentError("pass a torch.Generator: training prompts never use the global RNG")
    if not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise InvalidArgumentError(f"prompt sampling runs on the CPU: pass a CPU generator, got {generator.device}")
    return generator


def _as_mask(mask) -> Tensor:
    """(D, H, W) bool / integer / float tensor -> float32 CPU tensor (values kept: may be fractional)."""
    if not isinstance(mask, Tensor):
        raise ArgumentTypeError(f"mask must be a torch.Tensor (D, H, W), got {type(mask).__name__}")
    if mask.dim() != 3:
        raise ShapeError(f"mask must be (D, H, W), got shape {tuple(mask.shape)}")
    return mask.detach().to("cpu", torch.float32)


def _uniform_ints(n: int, low: int, high: int, generator: torch.Generator) -> Tensor:
    """(n,) int64 uniform in [low, high], both inclusive (Python random.randint semantics)."""
    return torch.randint(low, high + 1, (n,), generator=generator)


# ------------------------------------------------------------------------------ boxes
def jitter_box(box: Tensor, jitter: int, generator: Optional[torch.Generator], clamp_to: Sequence[int]) -> Tensor:
    """Shift each corner coordinate by its own uniform integer in [-jitter, jitter] (HF
    `bbox_shift`; extensions study: +-1/5/10/50), then clamp into the volume.

    Args:
        box: (6,) or (N, 6) float (d0, h0, w0, d1, h1, w1), maxima inclusive; all -1 rows are empty
            boxes and come back unchanged (and draw nothing).
        jitter: maximum shift in voxels, >= 0; 0 returns a float32 copy and draws nothing.
        generator: the source of the shifts (required when jitter > 0).
        clamp_to: (D, H, W) of the frame: coordinates are clamped to 0..size-1.

    Returns:
        same shape, float32. Where a shift makes min > max on an axis the two are swapped, so the
        box stays ordered (HF keeps the disordered box; our decoder expects ordered corners).
        Shifts are drawn for the rows in order, 6 per non-empty row.
    """
    if isinstance(jitter, bool) or not isinstance(jitter, int):
        raise ArgumentTypeError(f"jitter must be an int number of voxels, got {jitter!r}")
    if jitter < 0:
        raise InvalidArgumentError(f"jitter must be >= 0 voxels, got {jitter}")
    if box.shape[-1] != 6 or box.dim() not in (1, 2):
        raise ShapeError(f"box must be (6,) or (N, 6), got {tuple(box.shape)}")
    if len(clamp_to) != 3:
        raise ShapeError(f"clamp_to must be (D, H, W), got {tuple(clamp_to)}")
    out = box.detach().to("cpu", torch.float32).clone()
    if jitter == 0:
        return out
    _check_generator(generator)
    rows = out.view(-1, 6)
    live = ~(rows == -1).all(dim=1)
    shifts = _uniform_ints(int(live.sum()) * 6, -jitter, jitter, generator).view(-1, 6)
    hi = torch.tensor([int(s) - 1 for s in clamp_to] * 2, dtype=torch.float32)
    moved = torch.minimum(torch.clamp(rows[live] + shifts, min=0), hi)
    lo_c, hi_c = moved[:, :3], moved[:, 3:]
    rows[live] = torch.cat([torch.minimum(lo_c, hi_c), torch.maximum(lo_c, hi_c)], dim=1)
    return out


def box_from_mask(
    mask: Tensor,
    jitter: int = 0,
    generator: Optional[torch.Generator] = None,
    clamp_to: Optional[Sequence[int]] = None,
) -> Tensor:
    """Bounding box of mask > 0 (official `generate_box`), optionally jittered by `jitter_box`.

    Args:
        mask: (D, H, W) bool / integer / float.
        jitter: maximum per-coordinate shift in voxels (0: the exact GT box, as GitHub trains).
        generator: required when jitter > 0.
        clamp_to: (D, H, W) to clamp into; default the mask's shape.

    Returns:
        (6,) float32 (d0, h0, w0, d1, h1, w1), maxima inclusive; all -1 for an empty mask (never
        jittered).
    """
    m = _as_mask(mask)
    box = generate_box(m)
    return jitter_box(box, jitter, generator, tuple(m.shape) if clamp_to is None else clamp_to)


# ------------------------------------------------------------------------------ points
class _Candidates:
    """Voxels allowed as points (a flat bool map); draws distinct ones uniformly at random.

    The official `randperm(n)[:k]` over all n candidates costs ~60 ms for the ~2M negatives of a
    32x256x256 mask. The same distribution (k distinct candidates, uniformly, in random order) comes
    from drawing voxel indices one by one and keeping those that are allowed and new; that is used
    while at least a quarter of the voxels are candidates (a few draws per point), else the
    candidate list + randperm as officially.
    """

    DENSE = 0.25  # candidate fraction from which rejection drawing is used
    ROUNDS = 32  # rejection batches before falling back (failure odds ~0.75**(32*64))

    def __init__(self, ok: Tensor):
        self.ok = ok  # (V,) bool
        self.count = int(torch.count_nonzero(ok))
        self._list: Optional[Tensor] = None

    def pick(self, k: int, generator: torch.Generator) -> Tensor:
        """Up to k distinct flat indices (min(k, count),) int64; k = 0 draws nothing (the
        official skips its randperm then)."""
        k = min(k, self.count)
        if k == 0:
            return torch.zeros(0, dtype=torch.int64)
        if self.count >= self.DENSE * len(self.ok):
            found = self._by_rejection(k, generator)
            if found is not None:
                return found
        if self._list is None:
            self._list = torch.nonzero(self.ok).squeeze(1)  # C order, like the official nonzero
        return self._list[torch.randperm(self.count, generator=generator)[:k]]

    def _by_rejection(self, k: int, generator: torch.Generator) -> Optional[Tensor]:
        chosen: dict[int, None] = {}  # insertion-ordered set
        for _ in range(self.ROUNDS):
            draws = torch.randint(len(self.ok), (4 * k + 64,), generator=generator)
            for idx in draws[self.ok[draws]].tolist():
                chosen.setdefault(idx, None)
                if len(chosen) == k:
                    return torch.tensor(list(chosen), dtype=torch.int64)
        return None


def _to_dhw(flat: Tensor, shape: Sequence[int]) -> Tensor:
    """Flat C-order indices (n,) -> (n, 3) int64 (d, h, w)."""
    return torch.stack(torch.unravel_index(flat, tuple(shape)), dim=1) if len(flat) else flat.new_zeros((0, 3))


def points_from_mask(
    mask: Tensor,
    generator: torch.Generator,
    max_extra_pos: int = MAX_EXTRA_POSITIVES,
    max_neg: int = MAX_NEGATIVES,
    pad_to: Optional[int] = POINTS_PAD_TO,
) -> tuple[Tensor, Tensor]:
    """Official training point prompt: 1 positive + randint(0, max_extra_pos) extra positives +
    randint(0, max_neg) negatives, padded with (-1, -1, -1) label -1 points.

    Draw order (all from `generator`): the two counts, the first positive, the extra positives,
    the negatives; each a uniform choice of distinct candidates (`_Candidates`: the official
    randint / randperm distribution, not its exact random stream).

    Args:
        mask: (D, H, W); positives are voxels > 0.9, negatives voxels < 0.1.
        generator: CPU torch.Generator.
        max_extra_pos, max_neg: inclusive upper bounds of the two counts (official 10, 10).
        pad_to: total number of points P (official 21); None pads only up to 1 + the drawn counts.

    Returns:
        coords (P, 3) float32 voxel (d, h, w), labels (P,) int64 (1 / 0 / -1). See the module
        docstring for masks without positives.
    """
    g = _check_generator(generator)
    if min(max_extra_pos, max_neg) < 0:
        raise InvalidArgumentError(f"max_extra_pos and max_neg must be >= 0, got {max_extra_pos}, {max_neg}")
    if pad_to is not None and pad_to < 1 + max_extra_pos + max_neg:
        raise InvalidArgumentError(f"pad_to={pad_to} cannot hold 1 + {max_extra_pos} + {max_neg} points")
    m = _as_mask(mask)
    n_extra = int(_uniform_ints(1, 0, max_extra_pos, g))
    n_neg = int(_uniform_ints(1, 0, max_neg, g))
    flat = m.reshape(-1)
    pos, neg = _Candidates(flat > POSITIVE_THRESHOLD), _Candidates(flat < NEGATIVE_THRESHOLD)
    if pos.count == 0:  # official: the -1 point first, no extra positives, negatives still drawn
        first, first_label = torch.full((1, 3), -1, dtype=torch.int64), -1
        extra = torch.zeros((0, 3), dtype=torch.int64)
    else:
        first, first_label = _to_dhw(pos.pick(1, g), m.shape), 1
        extra = _to_dhw(pos.pick(n_extra, g), m.shape)  # drawn apart from the first: may repeat it
    negatives = _to_dhw(neg.pick(n_neg, g), m.shape)
    coords = torch.cat([first, extra, negatives]).to(torch.float32)
    labels = torch.tensor([first_label] + [1] * len(extra) + [0] * len(negatives), dtype=torch.int64)
    total = (1 + n_extra + n_neg) if pad_to is None else pad_to
    missing = total - len(coords)
    coords = torch.cat([coords, torch.full((missing, 3), -1.0)])
    labels = torch.cat([labels, torch.full((missing,), -1, dtype=torch.int64)])
    return coords, labels


# ------------------------------------------------------------------------------ mixes
def _as_mix(mix: Union[PromptMix, str, None]) -> PromptMix:
    if mix is None:
        return ALL_FIELDS
    if isinstance(mix, PromptMix):
        return mix
    if isinstance(mix, str) and mix in _BY_NAME:
        return _BY_NAME[mix]
    raise InvalidArgumentError(f"unknown prompt mix {mix!r}; use one of {[m.name for m in PROMPT_MIXES]}")


def sample_prompts(
    mask: Tensor,
    mix: Union[PromptMix, str, None],
    generator: torch.Generator,
    jitter: int = 0,
    **point_options,
) -> dict:
    """Draw the prompts one mix needs from a mask.

    Args:
        mask: (D, H, W) ground truth of one sample and one category.
        mix: a `PromptMix`, its name ("box+text"...), or None for every field (the official step:
            draw once, then `restrict_to_mix` for each of `PROMPT_MIXES`).
        generator: CPU torch.Generator; the box is drawn before the points.
        jitter: box jitter in voxels (0 as GitHub; HF trains with `HF_BOX_JITTER` = 10).
        point_options: passed to `points_from_mask` (max_extra_pos, max_neg, pad_to).

    Returns:
        dict with "mix" (name), "text" (bool: the caller adds the category's text embedding) and,
        when the mix uses them, "boxes" (6,) float32, "point_coords" (P, 3) float32 and
        "point_labels" (P,) int64.
    """
    m = _as_mix(mix)
    _check_generator(generator)
    out: dict = {"mix": m.name, "text": m.text}
    if m.box:
        out["boxes"] = box_from_mask(mask, jitter, generator)
    if m.points:
        out["point_coords"], out["point_labels"] = points_from_mask(mask, generator, **point_options)
    return out


def restrict_to_mix(prompts: Mapping, mix: Union[PromptMix, str]) -> dict:
    """The fields of `mix` taken from a `sample_prompts(mask, None, g)` dict (no new draws)."""
    m = _as_mix(mix)
    out: dict = {"mix": m.name, "text": m.text}
    needed = (["boxes"] if m.box else []) + (["point_coords", "point_labels"] if m.points else [])
    for key in needed:
        if key not in prompts:
            raise InvalidArgumentError(f"mix {m.name!r} needs {key!r}, which these prompts lack")
        out[key] = prompts[key]
    return out


def collate_prompts(items: Sequence[Mapping]) -> dict:
    """Stack per-sample prompt dicts of one mix into `SegVol.decode` arguments.

    Returns:
        {"mix": name, "text": bool, "boxes": (N, 6) float32 or None,
         "points": (coords (N, P, 3) float32, labels (N, P) int64) or None}.
        Point counts must agree (use a fixed `pad_to`, as officially).
    """
    if not items:
        raise InvalidArgumentError("collate_prompts needs at least one prompt dict")
    mixes = {it["mix"] for it in items}
    if len(mixes) != 1:
        raise InvalidArgumentError(f"cannot batch different prompt mixes together: {sorted(mixes)}")
    first = items[0]
    boxes = torch.stack([it["boxes"] for it in items]) if "boxes" in first else None
    points = None
    if "point_coords" in first:
        counts = {len(it["point_labels"]) for it in items}
        if len(counts) != 1:
            raise ShapeError(f"point counts differ across the batch {sorted(counts)}: sample with a fixed pad_to")
        points = (torch.stack([it["point_coords"] for it in items]), torch.stack([it["point_labels"] for it in items]))
    return {"mix": first["mix"], "text": first["text"], "boxes": boxes, "points": points}
