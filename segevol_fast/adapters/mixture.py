"""Mixture of adapters: K experts (LoRA or bottleneck) plus an identity expert, routed per image.

The identity expert is the base model itself: an image routed there gets exactly the base model
(CT can stay SegVol, bit for bit, while MRI gets an adapter). Three ways to route:

  * "tag": a fixed map from the image's modality (from `prompt_context`) to an expert name or
    "identity" (SegEVOLution's on/off switch is the map {"ct": "identity", "mri": <expert>});
  * "top1": a learned router (`router.py`: a Linear on the image's mean patch token, read on a
    fixed scale) picks one of the K + 1 experts. Training uses straight-through gates (the
    one-hot choice in the forward, so the chosen expert runs alone at full strength, and the soft
    mixture's gradient, so the router learns whichever expert was chosen, the identity included)
    and a Switch-style load-balancing loss `(K+1) * sum_e f_e * P_e` (f: fraction of images sent
    to e, P: mean router probability of e), left on the router as `aux_loss` for the trainer to add;
  * "soft": every expert weighted by the router's softmax (the identity's share adds nothing).

Routing is decided once per image batch by `route_for(model, name, images)` and applied to every
call under it (`with route: encode ... decode`): the encoder's adapted layers route per window row,
the decoder per image (`Route.row(i)`), so the experts run in one `routed_lora_linear` call per
layer, never a Python loop over experts. The router reads the patch embedding (one cheap extra
pass of `patch_embed`, plus two reference images), so the choice is known before the first
adapted block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import AdapterError
from .bottleneck import BottleneckConfig
from .context import current_context
from .entry import AdapterEntry, get_entry
from .lora import LoraConfig
from .manage import adapter_modules, add, check_new_name, remove_adapter
from .registry import AdapterKind, register
from .router import Router, learned_route
from .routing import Route

KIND = "mixture"
ROUTINGS = ("tag", "top1", "soft")
IDENTITY = "identity"


@dataclass(frozen=True)
class MixtureConfig:
    """experts: expert names (adapters "<mixture>/<expert>" are created); kind "lora" | "bottleneck"
    with its config; routing (see the module docstring); tags: modality -> expert name or
    "identity" (tag routing); balance_weight: factor on the top-1 load-balancing loss."""

    experts: tuple[str, ...]
    kind: str = "lora"
    routing: str = "tag"
    tags: dict = field(default_factory=dict)
    lora: Optional[LoraConfig] = None
    bottleneck: Optional[BottleneckConfig] = None
    balance_weight: float = 0.01

    def __post_init__(self):
        object.__setattr__(self, "experts", tuple(self.experts))
        if not self.experts or len(set(self.experts)) != len(self.experts) or IDENTITY in self.experts:
            raise AdapterError(f"a mixture needs distinct expert names (not {IDENTITY!r}), got {self.experts}")
        if self.kind not in ("lora", "bottleneck"):
            raise AdapterError(f"mixture experts are 'lora' or 'bottleneck', got {self.kind!r}")
        if self.routing not in ROUTINGS:
            raise AdapterError(f"mixture routing must be one of {ROUTINGS}, got {self.routing!r}")
        bad = {t: e for t, e in self.tags.items() if e != IDENTITY and e not in self.experts}
        if bad:
            raise AdapterError(f"tags route to unknown experts {bad}; experts are {self.experts} or {IDENTITY!r}")
        if self.routing == "tag" and not self.tags:
            raise AdapterError("tag routing needs tags={modality: expert or 'identity'}")

    def to_dict(self) -> dict:
        return {
            "experts": list(self.experts),
            "kind": self.kind,
            "routing": self.routing,
            "tags": dict(self.tags),
            "lora": None if self.lora is None else self.lora.to_dict(),
            "bottleneck": None if self.bottleneck is None else self.bottleneck.to_dict(),
            "balance_weight": self.balance_weight,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "MixtureConfig":
        return cls(
            experts=tuple(d["experts"]),
            kind=d["kind"],
            routing=d["routing"],
            tags=dict(d["tags"]),
            lora=None if d.get("lora") is None else LoraConfig.from_dict(d["lora"]),
            bottleneck=None if d.get("bottleneck") is None else BottleneckConfig.from_dict(d["bottleneck"]),
            balance_weight=d.get("balance_weight", 0.01),
        )

    def expert_config(self) -> LoraConfig | BottleneckConfig:
        """The config of each expert adapter (of kind `self.kind`)."""
        if self.kind == "lora":
            return self.lora or LoraConfig()
        return self.bottleneck or BottleneckConfig()


@dataclass(eq=False)
class MixtureEntry(AdapterEntry):
    """A mixture on a model: `layers` are its expert adapters' names; `router` the module path of
    its learned router (None with tag routing)."""

    router: Optional[str] = None


def expert_names(name: str, config: MixtureConfig) -> tuple[str, ...]:
    """The registered adapter name of each expert."""
    return tuple(f"{name}/{e}" for e in config.experts)


def route_for(
    model: nn.Module, name: str, images: Optional[Tensor] = None, modalities: Optional[Sequence[str]] = None
) -> Route:
    """The Route of mixture `name` for a batch of images (B, 1, D, H, W) (learned routing) or of
    modalities (tag routing; default: the current `prompt_context`)."""
    config = _entry(model, name).config
    names = expert_names(name, config)
    if config.routing == "tag":
        if modalities is None:
            ctx = current_context()
            rows = images.shape[0] if images is not None else 1
            modalities = ctx.modality_rows(rows) if ctx is not None else None
        if modalities is None:
            raise AdapterError(f"tag routing of {name!r} needs the images' modalities (modalities= or prompt_context)")
        unknown = [m for m in modalities if m not in config.tags]
        if unknown:
            raise AdapterError(f"mixture {name!r} has no tag for modality {unknown[0]!r}; tags: {sorted(config.tags)}")
        index = [-1 if config.tags[m] == IDENTITY else config.experts.index(config.tags[m]) for m in modalities]
        return Route(names, index=torch.tensor(index, dtype=torch.int64))
    if images is None:
        raise AdapterError(f"{config.routing} routing of {name!r} needs the images (B, 1, D, H, W)")
    router: Router = model.mixture_routers[_key(name)]
    embed = model.image_encoder.patch_embedding
    return learned_route(router, names, config.routing, config.balance_weight, images, embed)


def routes_on_images(model: nn.Module, name: str) -> bool:
    """Whether mixture `name` routes by the images (a learned router) rather than by their
    modality tags: `route_for` then needs `images=`."""
    return _entry(model, name).config.routing != "tag"


def _entry(model: nn.Module, name: str) -> MixtureEntry:
    entry = get_entry(model, name)
    if entry is None or entry.kind != KIND:
        raise AdapterError(f"no mixture named {name!r} on this model")
    return entry


# ---------------------------------------------------------------------------- the kind
def add_mixture(model: nn.Module, name: str, config: MixtureConfig, *, freeze_base: bool = True) -> list[str]:
    """Attach a mixture of adapters: one adapter "<name>/<expert>" per expert, of config.kind,
    and a learned router for top-1 / soft routing. Use it per batch with
    `with route(route_for(model, name, images)): ...`. Returns the expert adapters' names."""
    return list(add(model, KIND, name, config, freeze_base=freeze_base, activate=False).layers)


def _attach(model: nn.Module, name: str, config: MixtureConfig) -> MixtureEntry:
    experts = expert_names(name, config)
    for e in experts:
        check_new_name(model, e)
    added = []
    try:
        for e in experts:
            add(model, config.kind, e, config.expert_config(), freeze_base=False, activate=False)
            added.append(e)
        router = _attach_router(model, name, config)
    except Exception:
        for e in added:
            remove_adapter(model, e)
        raise
    return MixtureEntry(name, KIND, config, list(experts), router)


def _detach(model: nn.Module, entry: MixtureEntry) -> None:
    for e in entry.layers:
        remove_adapter(model, e)
    routers = getattr(model, "mixture_routers", None)
    if routers is not None and _key(entry.name) in routers:
        del routers[_key(entry.name)]


def _modules(model: nn.Module, entry: MixtureEntry) -> list[tuple[str, nn.Module]]:
    pieces = [(f"{e}@{path}", m) for e in entry.layers for path, m in adapter_modules(model, e)]
    return pieces + ([(entry.router, model.get_submodule(entry.router))] if entry.router else [])


def _aux_loss(model: nn.Module, entry: MixtureEntry) -> Optional[Tensor]:
    return None if entry.router is None else model.get_submodule(entry.router).aux_loss


def _key(name: str) -> str:
    return name.replace(".", "_").replace("/", "_")


def _attach_router(model: nn.Module, name: str, config: MixtureConfig) -> Optional[str]:
    """Add the learned router of mixture `name` (None for tag routing); returns its path."""
    if config.routing == "tag":
        return None
    if not hasattr(model, "mixture_routers"):
        model.mixture_routers = nn.ModuleDict()
    ref = model.image_encoder.norm.weight
    model.mixture_routers[_key(name)] = Router(model.config.hidden_size, len(config.experts)).to(
        device=ref.device, dtype=ref.dtype
    )
    return f"mixture_routers.{_key(name)}"


register(
    AdapterKind(
        name=KIND,
        label="mixture",
        config_type=MixtureConfig,
        attach=_attach,
        detach=_detach,
        modules=_modules,
        not_selectable="{name!r} is a mixture: run it with `with route(route_for(model, {name!r}, images)):`",
        route=route_for,
        aux_loss=_aux_loss,
        keeps_saved_name=True,
    )
)
