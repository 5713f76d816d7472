"""Bottleneck adapters of the SAM-for-medicine family (Medical SAM Adapter): down-projection,
GELU, up-projection, beside each encoder block's attention and MLP.

Two layouts place the attention-side ("space") adapter. In a block with both places adapted:

    layout "stream" (the default)                   layout "msa" (Medical SAM Adapter's own)
    x = x + attn(norm1(x))                          a = attn(norm1(x))
    x = x + space(x)                                x = x + (a + space(a))
    h = norm2(x)                                    h = norm2(x)
    x = x + mlp(h) + scale * mlp_adapter(h)         x = x + mlp(h) + scale * mlp_adapter(h)

The space adapter (config place "after_attn") reads the residual stream after the attention's
residual add under "stream" (block seam `after_attn`), and the attention output before it under
"msa" (block seam `on_attn_out`), as MSA's space adapter with its own skip connection does. The
MLP adapter (place "beside_mlp") is the same in both. MSA's width is a quarter of the hidden size
(dim=192 for SegVol's 768); the default here is 64. MSA's 3-D depth branch is not offered:
SegVol's ViT already attends over 3-D patches (docs/adapters.md, "Where we differ from the papers").

The up-projection starts at zero (weight and bias), so a new adapter adds exact zeros: the model
is the base model bit for bit until the first step. Several named adapters may sit at one place
(`BottleneckSlot`), one active, or one per batch row under `routing.route(...)` (experts of a
mixture, `mixture.py`): each expert then runs on the whole batch and rows take their weight of it
(few experts, small MLPs: cheaper than gathering rows).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AdapterError
from .entry import AdapterEntry
from .manage import add
from .registry import AdapterKind, AdapterModule, register
from .routing import Route, current_route

KIND = "bottleneck"
PLACES = ("after_attn", "beside_mlp")
LAYOUTS = ("stream", "msa")
# the block seams a bottleneck may sit at: the attention-side place has one per layout
SEAMS = ("after_attn", "on_attn_out", "beside_mlp")


def _seam(place: str, layout: str) -> str:
    """The block seam of config place `place` under `layout`."""
    return "on_attn_out" if place == "after_attn" and layout == "msa" else place


@dataclass(frozen=True)
class BottleneckConfig:
    """dim: bottleneck width (MSA: a quarter of the hidden size, 192 for SegVol); scale: factor on
    the MLP-side adapter (MSA uses 0.5; the attention side has none); places: the attention-side
    ("after_attn") and/or MLP-side ("beside_mlp") adapter of each block; blocks: encoder block
    indices (None: all); layout: where the attention-side adapter reads, "stream" (the residual
    stream after the attention's residual add) or "msa" (the attention output before it, as
    Medical SAM Adapter). Files saved without a layout are "stream"."""

    dim: int = 64
    scale: float = 0.5
    places: tuple[str, ...] = PLACES
    blocks: Optional[tuple[int, ...]] = None
    layout: str = "stream"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise AdapterError(f"bottleneck layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not isinstance(self.dim, int) or self.dim < 1:
            raise AdapterError(f"bottleneck dim must be a positive int, got {self.dim!r}")
        bad = [p for p in self.places if p not in PLACES]
        if bad or not self.places:
            raise AdapterError(f"bottleneck places must be among {PLACES}, got {self.places}")
        object.__setattr__(self, "places", tuple(self.places))
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["places"] = list(self.places)
        d["blocks"] = None if self.blocks is None else list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BottleneckConfig":
        return cls(
            **{**d, "places": tuple(d["places"]), "blocks": None if d.get("blocks") is None else tuple(d["blocks"])}
        )


class Bottleneck(AdapterModule):
    """x (..., hidden) -> scale * up(gelu(down(x))); zero at initialisation."""

    def __init__(self, hidden: int, dim: int, scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)
        self.down = nn.Linear(hidden, dim)
        self.up = nn.Linear(dim, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.up(F.gelu(self.down(x)))


class BottleneckSlot(nn.Module):
    """Sits at one seam of one block and holds that place's named adapters."""

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleDict()
        self.active: Optional[str] = None

    def forward(self, x: Tensor) -> Tensor:
        r = current_route()
        if r is not None and any(n in self.experts for n in r.names):
            return self._routed(x, r)
        if self.active is None:
            return x.new_zeros(())  # the seam adds this: x + 0 is x
        return self.experts[self.active](x)

    def _routed(self, x: Tensor, r: Route) -> Tensor:
        """sum_e w[b, e] * expert_e(x[b]) with w one-hot (index; -1: no expert) or the gates."""
        B = x.shape[0]
        if r.rows not in (1, B):
            raise AdapterError(f"route covers {r.rows} batch rows but this adapter got input {tuple(x.shape)}")
        if r.index is not None:
            w = F.one_hot((r.index + 1).to(x.device), len(r.names) + 1)[:, 1:].to(x.dtype)  # -1 -> all zero
        else:
            w = r.gates.to(device=x.device, dtype=x.dtype)
        w = w.expand(B, -1) if r.rows == 1 else w
        out = x.new_zeros(())
        for e, name in enumerate(r.names):
            # a zero gate that requires grad still runs its expert: the router learns from it
            if name in self.experts and (w.requires_grad or bool((w[:, e] != 0).any())):
                out = out + w[:, e].view(B, *([1] * (x.dim() - 1))) * self.experts[name](x)
        return out

    def cache_key(self) -> tuple:
        r = current_route()
        return self.active, (r.key() if r is not None and any(n in self.experts for n in r.names) else None)


def _slot(block: nn.Module, seam: str) -> BottleneckSlot:
    current = getattr(block, seam)
    if current is None:
        current = BottleneckSlot()
        setattr(block, seam, current)
    elif not isinstance(current, BottleneckSlot):
        raise AdapterError(f"the {seam} seam of this block is taken by a {type(current).__name__}")
    return current


# ---------------------------------------------------------------------------- the kind
def add_bottleneck(
    model: nn.Module,
    name: str = "default",
    config: Optional[BottleneckConfig] = None,
    *,
    freeze_base: bool = True,
    activate: bool = True,
) -> list[str]:
    """Attach a bottleneck adapter (Medical SAM Adapter style) called `name` beside the attention
    and/or MLP of the chosen encoder blocks, in `config.layout`; returns the module paths."""
    entry = add(model, KIND, name, config or BottleneckConfig(), freeze_base=freeze_base, activate=activate)
    return list(entry.layers)


def bottleneck_slots(model: nn.Module):
    """(path, slot) of every bottleneck slot of `model`, in module order."""
    for path, m in model.named_modules():
        if isinstance(m, BottleneckSlot):
            yield path, m


def _attach(model: nn.Module, name: str, config: BottleneckConfig) -> AdapterEntry:
    """Add adapter `name` at config.places of the chosen encoder blocks."""
    blocks = model.image_encoder.blocks
    indices = range(len(blocks)) if config.blocks is None else config.blocks
    hidden = model.config.hidden_size
    paths = []
    for i in indices:
        if not 0 <= i < len(blocks):
            raise AdapterError(f"block index {i} out of range: the encoder has {len(blocks)} blocks")
        for place in config.places:
            seam = _seam(place, config.layout)
            slot = _slot(blocks[i], seam)
            if name in slot.experts:
                raise AdapterError(f"image_encoder.blocks.{i}.{seam} already has an adapter named {name!r}")
            ref = blocks[i].norm1.weight
            slot.experts[name] = Bottleneck(hidden, config.dim, 1.0 if place == "after_attn" else config.scale).to(
                device=ref.device, dtype=ref.dtype
            )
            paths.append(f"image_encoder.blocks.{i}.{seam}.experts.{name}")
    return AdapterEntry(name, KIND, config, paths)


def _detach(model: nn.Module, entry: AdapterEntry) -> None:
    """Remove the adapter everywhere; a slot left empty is taken off its seam."""
    for block in model.image_encoder.blocks:
        for seam in SEAMS:
            slot = getattr(block, seam)
            if isinstance(slot, BottleneckSlot) and entry.name in slot.experts:
                del slot.experts[entry.name]
                if slot.active == entry.name:
                    slot.active = None
                if not len(slot.experts):
                    setattr(block, seam, None)


def _modules(model: nn.Module, entry: AdapterEntry) -> list[tuple[str, nn.Module]]:
    return [(path, slot.experts[entry.name]) for path, slot in bottleneck_slots(model) if entry.name in slot.experts]


def _holders(model: nn.Module):
    return ((path, slot.experts, slot) for path, slot in bottleneck_slots(model))


register(
    AdapterKind(
        name=KIND,
        label="bottleneck adapter",
        config_type=BottleneckConfig,
        attach=_attach,
        detach=_detach,
        modules=_modules,
        holders=_holders,
    )
)
