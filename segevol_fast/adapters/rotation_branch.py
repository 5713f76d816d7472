"""A rotation-robust side branch beside the patch embedding, added to each patch token.

    responses = patch_embed(window, stack of g·K for g in G)   one call, |G| * F output channels
    features  = max over g of responses                        (tokens, F), rotation-invariant
    tokens   += gate * Linear(LayerNorm(features))             gate (hidden,), zero at start

K is a learnable bank of F single-channel kernels of the patch's size. Lifting it to every
rotation g of a finite group G and max-pooling the responses over G (a group-equivariant
convolution with orientation pooling) gives per-patch features that a patch rotated by any g
leaves unchanged: rotating the patch permutes the responses among the rotated copies, and the
maximum does not see the order. The groups act on the voxel grid itself, so the invariance is
exact (up to float summation order), not an approximation of continuous rotations:

  * "c4": the four rotations by 90 degrees about the D axis (the scan's longitudinal axis for
    axial scans), in the H-W plane; needs H == W patch sides;
  * "box": every proper rotation mapping the patch box onto itself; 8 for a D x S x S patch with
    D != S (the four about D, and those composed with a half turn about H), 24 for a cube.

The branch adds to each token on its own (it never enters the token sequence) and its output
gate starts at zero, so a freshly attached branch leaves the model exactly the base model; the
projection starts non-zero so that the gate gets a gradient at the first step. It is nonlinear
(the max), so it cannot be merged into the base weights. Several named branches may sit at the
seam (`RotationBranchSlot`), one active, or one per batch row under `routing.route(...)`.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import AdapterError
from ..model.layers import LayerNorm32
from .entry import AdapterEntry
from .manage import add
from .registry import AdapterKind, AdapterModule, register
from .routing import Route, current_route

KIND = "rotation_branch"
GROUPS = ("c4", "box")
SEAM = "beside_patch_embed"


class GridRotation(NamedTuple):
    """A rotation of a (D, H, W) box that maps voxels onto voxels: permute the axes by `perm`,
    then reverse the axes in `flips` (both in the permuted order)."""

    perm: tuple[int, int, int]
    flips: tuple[int, ...]


def rotate(t: Tensor, rotation: GridRotation) -> Tensor:
    """`t` rotated by `rotation` over its last three axes (D, H, W)."""
    lead = t.dim() - 3
    out = t.permute(*range(lead), *(lead + p for p in rotation.perm))
    return out.flip([lead + f for f in rotation.flips]) if rotation.flips else out


def _is_proper(perm: Sequence[int], flips: Sequence[int]) -> bool:
    """Determinant +1: an axis permutation's sign times -1 per reversed axis (else a mirror)."""
    inversions = sum(perm[i] > perm[j] for i, j in itertools.combinations(range(3), 2))
    return (inversions + len(flips)) % 2 == 0


def rotation_group(group: str, patch_size: Sequence[int]) -> tuple[GridRotation, ...]:
    """The rotations of `group` for patches of `patch_size` (D, H, W), the identity first.
    AdapterError when the group is unknown or does not map this patch box onto itself."""
    if group not in GROUPS:
        raise AdapterError(f"rotation branch group must be one of {GROUPS}, got {group!r}")
    size = tuple(int(p) for p in patch_size)
    if group == "c4" and size[1] != size[2]:
        raise AdapterError(
            f"rotation branch group 'c4' turns patches by 90 degrees in the H-W plane, which needs square H x W "
            f"patch sides; this model's patch (D, H, W) is {size}: use group='box'"
        )
    found = []
    for perm in itertools.permutations(range(3)):
        if any(size[p] != size[i] for i, p in enumerate(perm)):
            continue  # would swap sides of different lengths: not a map of the box onto itself
        if group == "c4" and perm[0] != 0:
            continue
        for n in range(4):
            for flips in itertools.combinations(range(3), n):
                if _is_proper(perm, flips) and not (group == "c4" and 0 in flips):
                    found.append(GridRotation(perm, flips))
    return tuple(found)


@dataclass(frozen=True)
class RotationBranchConfig:
    """group: "c4" (the 4 turns about the D axis) or "box" (every rotation of the patch box: 8
    for D x S x S patches, 24 for cubes); features: F, the kernels in the bank, i.e. invariant
    features per token before the projection to the hidden size."""

    group: str = "c4"
    features: int = 32

    def __post_init__(self):
        if self.group not in GROUPS:
            raise AdapterError(f"rotation branch group must be one of {GROUPS}, got {self.group!r}")
        if isinstance(self.features, bool) or not isinstance(self.features, int) or self.features < 1:
            raise AdapterError(f"rotation branch features must be a positive int, got {self.features!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RotationBranchConfig":
        return cls(**d)


class RotationBranch(AdapterModule):
    """Window (B, 1, D, H, W) -> (B, N, hidden) to add to the patch tokens; zero at start.

    Parameters: kernels (F, pd, ph, pw), norm (F), proj (F -> hidden), gate (hidden):
    F * (pd*ph*pw + 2 + hidden) + 2 * hidden in all, whatever the group's order.
    """

    def __init__(self, patch_size: Sequence[int], hidden: int, config: RotationBranchConfig):
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.rotations = rotation_group(config.group, self.patch_size)
        F = config.features
        voxels = self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        # unit-variance responses for unit-variance voxels; the LayerNorm makes the scale moot
        self.kernels = nn.Parameter(torch.randn(F, *self.patch_size) / voxels**0.5)
        self.norm = LayerNorm32(F)
        self.proj = nn.Linear(F, hidden)  # default (non-zero) init: the gate learns from step 0
        self.gate = nn.Parameter(torch.zeros(hidden))

    def responses(self, x: Tensor, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        """(B, N, |G|, F): each patch of x*scale+shift against every rotated kernel, in one
        patch-embedding call over the stacked bank."""
        bank = torch.stack([rotate(self.kernels, r) for r in self.rotations])  # (|G|, F, pd, ph, pw)
        weight = bank.reshape(-1, self.kernels[0].numel()).to(x.dtype)  # (|G| * F, pd*ph*pw), C = 1
        out = ops.patch_embed(x, weight, None, None, self.patch_size, scale, shift)
        return out.unflatten(-1, (len(self.rotations), self.kernels.shape[0]))

    def invariant_features(self, x: Tensor, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        """(B, N, F): the responses max-pooled over the group, unchanged by rotating a patch."""
        return self.responses(x, scale, shift).amax(dim=2)

    def forward(self, x: Tensor, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        return self.gate * self.proj(self.norm(self.invariant_features(x, scale, shift)))


class RotationBranchSlot(nn.Module):
    """Sits at the image encoder's `beside_patch_embed` seam and holds the named branches."""

    def __init__(self):
        super().__init__()
        self.branches = nn.ModuleDict()
        self.active: Optional[str] = None

    def forward(self, x: Tensor, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        r = current_route()
        if r is not None and any(n in self.branches for n in r.names):
            return self._routed(x, scale, shift, r)
        if self.active is None:
            return x.new_zeros(())  # the seam adds this: tokens + 0 is tokens
        return self.branches[self.active](x, scale, shift).to(x.dtype)

    def _routed(self, x: Tensor, scale: float, shift: float, r: Route) -> Tensor:
        """Each batch row through its route's branch (index: only those rows run it; -1 or a name
        held elsewhere: nothing added), or the gate-weighted sum of the branches."""
        B = x.shape[0]
        if r.rows not in (1, B):
            raise AdapterError(f"route covers {r.rows} batch rows but the rotation branch got input {tuple(x.shape)}")
        out = x.new_zeros(())
        for e, name in enumerate(r.names):
            if name not in self.branches:
                continue
            branch = self.branches[name]
            if r.gates is not None:
                w = r.gates[:, e].to(device=x.device, dtype=x.dtype)
                out = out + w.view(-1, 1, 1) * branch(x, scale, shift).to(x.dtype)
                continue
            rows = (r.index.to(x.device).expand(B) == e).nonzero().squeeze(1)
            if rows.numel():
                part = branch(x[rows], scale, shift).to(x.dtype)
                out = out + part.new_zeros((B, *part.shape[1:])).index_copy(0, rows, part)
        return out

    def cache_key(self) -> tuple:
        r = current_route()
        return self.active, (r.key() if r is not None and any(n in self.branches for n in r.names) else None)


# ---------------------------------------------------------------------------- the kind
def add_rotation_branch(
    model: nn.Module,
    name: str = "default",
    config: Optional[RotationBranchConfig] = None,
    *,
    freeze_base: bool = True,
    activate: bool = True,
) -> list[str]:
    """Attach a rotation-robust patch branch called `name` beside the image encoder's patch
    embedding; returns its module path. AdapterError when `config.group` does not fit the
    model's patch size."""
    entry = add(model, KIND, name, config or RotationBranchConfig(), freeze_base=freeze_base, activate=activate)
    return list(entry.layers)


def _attach(model: nn.Module, name: str, config: RotationBranchConfig) -> AdapterEntry:
    encoder = model.image_encoder
    cfg = encoder.config
    if cfg.in_channels != 1:
        raise AdapterError(
            f"the rotation branch reads single-channel windows; this model has in_channels={cfg.in_channels}"
        )
    branch = RotationBranch(cfg.patch_size, cfg.hidden_size, config)  # checks the group first
    slot = getattr(encoder, SEAM)
    if slot is None:
        slot = RotationBranchSlot()
        setattr(encoder, SEAM, slot)
    elif not isinstance(slot, RotationBranchSlot):
        raise AdapterError(f"the image encoder's {SEAM} seam is taken by a {type(slot).__name__}")
    ref = encoder.norm.weight
    slot.branches[name] = branch.to(device=ref.device, dtype=ref.dtype)
    return AdapterEntry(name, KIND, config, [f"image_encoder.{SEAM}.branches.{name}"])


def _slot(model: nn.Module) -> Optional[RotationBranchSlot]:
    slot = getattr(model.image_encoder, SEAM, None)
    return slot if isinstance(slot, RotationBranchSlot) else None


def _detach(model: nn.Module, entry: AdapterEntry) -> None:
    slot = _slot(model)
    if slot is None or entry.name not in slot.branches:
        return
    del slot.branches[entry.name]
    if slot.active == entry.name:
        slot.active = None
    if not len(slot.branches):
        setattr(model.image_encoder, SEAM, None)


def _modules(model: nn.Module, entry: AdapterEntry) -> list[tuple[str, nn.Module]]:
    slot = _slot(model)
    if slot is None or entry.name not in slot.branches:
        return []
    return [(f"image_encoder.{SEAM}.branches.{entry.name}", slot.branches[entry.name])]


def _holders(model: nn.Module):
    slot = _slot(model)
    return iter(() if slot is None else ((f"image_encoder.{SEAM}", slot.branches, slot),))


register(
    AdapterKind(
        name=KIND,
        label="rotation-robust branch",
        config_type=RotationBranchConfig,
        attach=_attach,
        detach=_detach,
        modules=_modules,
        holders=_holders,
    )
)
