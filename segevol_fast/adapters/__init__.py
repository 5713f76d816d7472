"""Adapting SegVol: LoRA (and, built on the same seams, bottleneck adapters, mixtures, priors).

    from segevol_fast import SegVol, adapters
    model = SegVol.from_pretrained("BAAI/SegVol")                  # strict base load first
    adapters.add_lora(model, "mri", adapters.LoraConfig(rank=16, alpha=16, rslora=True))
    ...train: only adapter parameters require grad...
    adapters.save_adapter(model, "mri", "mri_lora.safetensors")   # a few MB, names its base
    adapters.load_adapter(model2, "mri_lora.safetensors")          # refused on other base weights
    with adapters.route(["mri", "pet"], index=[0, 1]):             # one adapter per batch row
        emb = model.encode_image(windows)

Adapters attach at the model's seams (`model.seams`) after the base checkpoint is loaded, and are
saved apart from it (`io.py`). Every cache keys on the adapter state, so switching adapters never
returns stale embeddings.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

from torch import nn

from ..errors import AdapterError, CheckpointError
from . import context_prior
from . import io as _io
from .bottleneck import (
    BottleneckConfig,
    BottleneckSlot,
    attach_bottleneck,
    detach_bottleneck,
)
from .context import PromptContext, current_context, prompt_context
from .context_prior import (
    ContextPriorConfig,
    ContextPriors,
    add_context_priors,
    get_context_priors,
)
from .io import base_state_dict, base_weights_hash
from .lora import AdapterModule, LoraConfig, LoraLinear, LoraWeights
from .mixture import (
    MixtureConfig,
    attach_router,
    detach_router,
    expert_names,
    route_for,
)
from .routing import Route, current_route, no_route, route
from .targets import SEGEVOLUTION_TARGETS, match_linears, output_slices

__all__ = [
    "LoraConfig", "LoraLinear", "LoraWeights", "AdapterModule", "Route", "route", "no_route", "current_route",
    "SEGEVOLUTION_TARGETS", "add_lora", "add_bottleneck", "BottleneckConfig", "add_mixture", "MixtureConfig", "route_for", "active_state", "restore_active", "active_adapter", "ContextPriorConfig", "ContextPriors",
    "add_context_priors", "get_context_priors", "batch_route", "aux_loss", "adapter_modules", "set_active", "merge", "unmerge", "remove_adapter", "adapter_names",
    "adapter_parameters", "base_parameters", "save_adapter", "prompt_context", "current_context", "PromptContext", "load_adapter", "base_state_dict", "base_weights_hash",
]


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for path, m in model.named_modules():
        if isinstance(m, LoraLinear):
            yield path, m


def _holders(model: nn.Module) -> Iterator[tuple[str, nn.ModuleDict, nn.Module]]:
    """(path, named-adapter dict, holder) of every place holding adapters: LoRA layers and
    bottleneck slots. The holder has `.active`."""
    for path, m in model.named_modules():
        if isinstance(m, LoraLinear):
            yield path, m.lora, m
        elif isinstance(m, BottleneckSlot):
            yield path, m.experts, m


def adapter_modules(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """(holder path, module) of every piece of adapter `name` (a mixture: its experts' pieces,
    each under "<expert>@<path>", and its router)."""
    entry = getattr(model, "adapter_configs", {}).get(name)
    if entry is not None and entry["kind"] == context_prior.KIND:
        handle = context_prior.get_context_priors(model)
        return [("image_encoder.after_encoder", handle.image_side), ("mask_decoder.after_transformer", handle.decoder_side)]
    if entry is not None and entry["kind"] == "mixture":
        pieces = [(f"{e}@{path}", m) for e in entry["layers"] for path, m in adapter_modules(model, e)]
        return pieces + ([(entry["router"], model.get_submodule(entry["router"]))] if entry.get("router") else [])
    return [(path, d[name]) for path, d, _ in _holders(model) if name in d]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters attached to `model`, in the order they were added."""
    return list(getattr(model, "adapter_configs", {}))


def _register(model: nn.Module, name: str, entry: dict, freeze_base: bool, activate: bool) -> None:
    model.__dict__.setdefault("adapter_configs", {})[name] = entry
    if freeze_base:
        for p in base_parameters(model):
            p.requires_grad_(False)
    if activate:
        set_active(model, name)


def _new_name(model: nn.Module, name: str) -> None:
    if name in adapter_names(model):
        raise AdapterError(f"model already has an adapter named {name!r}; remove_adapter it first or pick another name")


def add_lora(model: nn.Module, name: str = "default", config: Optional[LoraConfig] = None, *,
             freeze_base: bool = True, activate: bool = True) -> list[str]:
    """Attach a LoRA adapter called `name` to every layer `config.targets` matches.

    Returns the adapted layers' names. With freeze_base (default) every non-adapter parameter is
    set requires_grad=False, so an optimiser over `adapter_parameters(model)` trains adapters only;
    with activate (default) the new adapter is the active one. At step 0 the model's outputs
    equal the base model's bit for bit (B starts at zero).
    """
    config = config or LoraConfig()
    _new_name(model, name)
    matched = match_linears(model, config.targets)
    for path, layer, parts in matched:
        slices = output_slices(layer, parts, path)
        if not isinstance(layer, LoraLinear):
            layer = _replace(model, path, LoraLinear(layer))
        layer.add_adapter(name, config, slices)
    layers = [p for p, _, _ in matched]
    _register(model, name, {"kind": "lora", "config": config.to_dict(), "layers": layers}, freeze_base, activate)
    return layers


def add_bottleneck(model: nn.Module, name: str = "default", config: Optional[BottleneckConfig] = None, *,
                   freeze_base: bool = True, activate: bool = True) -> list[str]:
    """Attach a bottleneck adapter (Medical SAM Adapter style, `bottleneck.py`) called `name`
    beside the attention and/or MLP of the chosen encoder blocks; returns the module paths."""
    config = config or BottleneckConfig()
    _new_name(model, name)
    paths = attach_bottleneck(model, name, config)
    _register(model, name, {"kind": "bottleneck", "config": config.to_dict(), "layers": paths}, freeze_base, activate)
    return paths


def add_mixture(model: nn.Module, name: str, config: MixtureConfig, *, freeze_base: bool = True) -> list[str]:
    """Attach a mixture of adapters (`mixture.py`): one adapter "<name>/<expert>" per expert, of
    config.kind, and a learned router for top-1 / soft routing. Use it per batch with
    `with route(route_for(model, name, images)): ...`. Returns the expert adapters' names."""
    _new_name(model, name)
    experts = expert_names(name, config)
    for e in experts:
        _new_name(model, e)
    added = []
    try:
        for e in experts:
            if config.kind == "lora":
                add_lora(model, e, config.lora or LoraConfig(), freeze_base=False, activate=False)
            else:
                add_bottleneck(model, e, config.bottleneck or BottleneckConfig(), freeze_base=False, activate=False)
            added.append(e)
        router = attach_router(model, name, config)
    except Exception:
        for e in added:
            remove_adapter(model, e)
        raise
    _register(model, name, {"kind": "mixture", "config": config.to_dict(), "layers": list(experts),
                            "router": router}, freeze_base, activate=False)
    return list(experts)


def _replace(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return new


def base_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    skip = {id(p) for m in model.modules() if isinstance(m, AdapterModule) for p in m.parameters()}
    return (p for p in model.parameters() if id(p) not in skip)


def adapter_parameters(model: nn.Module, name: Optional[str] = None) -> list[nn.Parameter]:
    """Parameters of every adapter (or of adapter `name`): what the trainer optimises."""
    names = adapter_names(model) if name is None else [name]
    _known(model, name)
    params = {id(p): p for n in names for _, m in adapter_modules(model, n) for p in m.parameters()}
    return list(params.values())  # a mixture's experts are adapters of their own too: once each


def _known(model: nn.Module, name: Optional[str]) -> None:
    if name is not None and name not in adapter_names(model):
        raise AdapterError(f"no adapter named {name!r}; this model has {adapter_names(model) or 'none'}")


def set_active(model: nn.Module, name: Optional[str]) -> None:
    """Make `name` the adapter the model applies (None: the base model). One at a time; a batch
    that needs several goes through `route(...)` (a mixture always does: `route_for`)."""
    _known(model, name)
    if name is not None and model.adapter_configs[name]["kind"] == "mixture":
        raise AdapterError(f"{name!r} is a mixture: run it with `with route(route_for(model, {name!r}, images)):`")
    if name is not None and model.adapter_configs[name]["kind"] == context_prior.KIND:
        raise AdapterError(f"{name!r} are context priors: they apply while attached (remove_adapter to drop them)")
    for _, d, holder in _holders(model):
        holder.active = name if name in d else None


def active_state(model: nn.Module) -> list[tuple[nn.Module, Optional[str]]]:
    """Every adapter holder's active adapter, to put back with `restore_active`."""
    return [(holder, holder.active) for _, _, holder in _holders(model)]


def restore_active(model: nn.Module, state: list[tuple[nn.Module, Optional[str]]]) -> None:
    for holder, name in state:
        holder.active = name


def active_adapter(model: nn.Module) -> Optional[str]:
    """The adapter `set_active` made the model apply; None for the base model, or when holders
    disagree (an adapter set per layer by hand), since then no one name describes the model."""
    active = {holder.active for _, _, holder in _holders(model)} - {None}
    return active.pop() if len(active) == 1 else None


def merge(model: nn.Module, name: str) -> None:
    """Fold LoRA adapter `name` into the base weights (no LoRA cost at inference; routing then
    refuses). Bottleneck adapters have nonlinear branches and cannot be merged."""
    _known(model, name)
    if model.adapter_configs[name]["kind"] != "lora":
        raise AdapterError(f"only LoRA adapters can be merged; {name!r} is a {model.adapter_configs[name]['kind']} adapter")
    for _, layer in _lora_layers(model):
        if name in layer.lora:
            layer.merge(name)


def unmerge(model: nn.Module) -> None:
    """Undo `merge` (weights equal the originals up to float rounding)."""
    for _, layer in _lora_layers(model):
        layer.unmerge()


def remove_adapter(model: nn.Module, name: str) -> None:
    _known(model, name)
    entry = model.adapter_configs[name]
    if entry["kind"] == context_prior.KIND:
        context_prior.remove_context_priors(model)
        return
    if entry["kind"] == "mixture":
        for e in entry["layers"]:
            remove_adapter(model, e)
        detach_router(model, name)
    elif entry["kind"] == "bottleneck":
        detach_bottleneck(model, name)
    else:
        for _, layer in _lora_layers(model):
            if name in layer.lora:
                layer.remove_adapter(name)
    del model.adapter_configs[name]


# ---------------------------------------------------------------------------- training helpers
def batch_route(model: nn.Module, images, modalities) -> Optional[Route]:
    """The route of the model's mixture of adapters for a batch (None when it has none): what the
    trainer applies around encode (and, row by row, decode). AdapterError with several mixtures."""
    mixtures = [n for n, e in getattr(model, "adapter_configs", {}).items() if e["kind"] == "mixture"]
    if not mixtures:
        return None
    if len(mixtures) > 1:
        raise AdapterError(f"the model has several mixtures {mixtures}: train one at a time")
    return route_for(model, mixtures[0], images=images, modalities=list(modalities))


def aux_loss(model: nn.Module):
    """Sum of the auxiliary losses the last forward left on adapters (a top-1 router's load
    balancing, Hermes priors' modality classification), or None."""
    parts = [r.aux_loss for r in getattr(model, "mixture_routers", {}).values() if r.aux_loss is not None]
    priors = context_prior.get_context_priors(model)
    if priors is not None and priors.aux_loss is not None:
        parts.append(priors.aux_loss)
    return sum(parts) if parts else None


# ---------------------------------------------------------------------------- files
_ATTACH = {"lora": (LoraConfig, add_lora), "bottleneck": (BottleneckConfig, add_bottleneck),
           "mixture": (MixtureConfig, add_mixture),
           context_prior.KIND: (context_prior.ContextPriorConfig, context_prior.attach)}


def save_adapter(model: nn.Module, name: str, path: str | os.PathLike) -> str:
    """Write adapter `name` alone to `path` (safetensors + metadata naming the base weights'
    SHA-256). Returns the path."""
    _known(model, name)
    entry = model.adapter_configs[name]
    tensors = {f"{holder}.{k}": t for holder, m in adapter_modules(model, name) for k, t in m.state_dict().items()}
    meta = {"name": name, "kind": entry["kind"], "config": entry["config"], "layers": entry["layers"],
            "base_weights_sha256": base_weights_hash(model),
            "base_weights_source": None if getattr(model, "weights_source", None) is None else str(model.weights_source),
            "model_config": _config_dict(model)}
    _io.save_adapter_file(path, tensors, meta)
    return os.fspath(path)


def load_adapter(model: nn.Module, path: str | os.PathLike, name: Optional[str] = None, *,
                 check_base: bool = True, activate: bool = True, kind: Optional[str] = None) -> str:
    """Attach the adapter saved in `path` (as `name`, default its saved name); returns the name.

    kind: refuse (CheckpointError) a file holding another kind of adapter ("lora", "mixture", ...).
    Raises AdapterMismatchError when it was trained on other base weights (unless
    check_base=False), CheckpointError for a damaged or foreign file or mismatched tensors."""
    tensors, meta = _io.read_adapter_file(path)
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} adapter, not a {kind!r} one")
    _io.check_base(model, meta, path, check_base)
    if meta.get("kind") not in _ATTACH:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} adapter, which this version cannot load")
    name = name or meta["name"]
    config_cls, attach = _ATTACH[meta["kind"]]
    if meta["kind"] == "mixture":
        if name != meta["name"]:
            raise CheckpointError(f"{path}: a mixture loads under its saved name {meta['name']!r}")
        layers = add_mixture(model, name, config_cls.from_dict(meta["config"]), freeze_base=False)
    else:
        layers = attach(model, name, config_cls.from_dict(meta["config"]), freeze_base=False, activate=False)
    try:
        if len(layers) != len(meta["layers"]):
            raise CheckpointError(f"{path} adapts {len(meta['layers'])} places, but its config matches {len(layers)} here")
        for holder, m in adapter_modules(model, name):
            own = {k: tensors.pop(f"{holder}.{k}", None) for k in m.state_dict()}
            missing = [k for k, v in own.items() if v is None]
            if missing:
                raise CheckpointError(f"{path} lacks {holder}.{missing[0]}")
            m.load_state_dict(own, strict=True)
        if tensors:
            raise CheckpointError(f"{path} has tensors for no adapted place here, e.g. {next(iter(tensors))}")
    except (CheckpointError, RuntimeError) as exc:
        remove_adapter(model, name)
        raise CheckpointError(str(exc)) from exc
    if activate and meta["kind"] in ("lora", "bottleneck"):  # mixtures route, priors always apply
        set_active(model, name)
    return name


def _config_dict(model: nn.Module) -> Optional[dict]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    import dataclasses

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()} \
        if dataclasses.is_dataclass(cfg) else None
