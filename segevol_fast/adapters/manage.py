"""Adapters of any kind on a model: add, select, merge, remove, list their parameters.

Every operation looks the adapter's kind up in the registry (`registry.py`) and runs what that
kind registered, so nothing here names a kind. The typed entries live with the model (`entry.py`).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from torch import Tensor, nn

from ..errors import AdapterError
from . import registry
from .entry import AdapterEntry, drop_entry, entries, get_entry, put_entry
from .registry import AdapterModule
from .routing import Route


def add(model: nn.Module, kind: str, name: str, config: Any, *, freeze_base: bool, activate: bool) -> AdapterEntry:
    """Attach adapter `name` of `kind` with `config` and record it. With freeze_base every
    non-adapter parameter gets requires_grad=False; with activate it becomes the active adapter."""
    spec = registry.get(kind)
    check_new_name(model, name)
    entry = spec.attach(model, name, config)
    put_entry(model, entry)
    if freeze_base:
        for p in base_parameters(model):
            p.requires_grad_(False)
    if activate:
        set_active(model, name)
    return entry


def check_new_name(model: nn.Module, name: str) -> None:
    if name in adapter_names(model):
        raise AdapterError(f"model already has an adapter named {name!r}; remove_adapter it first or pick another name")


def remove_adapter(model: nn.Module, name: str) -> None:
    entry = entry_of(model, name)
    registry.get(entry.kind).detach(model, entry)
    drop_entry(model, name)


def entry_of(model: nn.Module, name: str) -> AdapterEntry:
    """The entry of adapter `name`; AdapterError naming the model's adapters when it has none."""
    _known(model, name)
    return get_entry(model, name)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters attached to `model`, in the order they were added."""
    return [e.name for e in entries(model)]


def adapter_modules(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """(holder path, module) of every piece of adapter `name` (a mixture: its experts' pieces,
    each under "<expert>@<path>", and its router); empty for a name the model does not have."""
    entry = get_entry(model, name)
    return [] if entry is None else registry.get(entry.kind).modules(model, entry)


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
    if name is not None and get_entry(model, name) is None:
        raise AdapterError(f"no adapter named {name!r}; this model has {adapter_names(model) or 'none'}")


# ---------------------------------------------------------------------------- which adapter runs
def holders(model: nn.Module) -> Iterator[tuple[str, nn.ModuleDict, nn.Module]]:
    """(path, named-adapter dict, holder) of every module holding selectable adapters (LoRA
    layers, bottleneck slots); the holder has `.active`."""
    for spec in registry.kinds():
        if spec.holders is not None:
            yield from spec.holders(model)


def set_active(model: nn.Module, name: Optional[str]) -> None:
    """Make `name` the adapter the model applies (None: the base model). One at a time; a batch
    that needs several goes through `route(...)` (a mixture always does: `route_for`)."""
    _known(model, name)
    if name is not None:
        spec = registry.get(get_entry(model, name).kind)
        if not spec.selectable:
            raise AdapterError(spec.not_selectable.format(name=name))
    for _, d, holder in holders(model):
        holder.active = name if name in d else None


def active_state(model: nn.Module) -> list[tuple[nn.Module, Optional[str]]]:
    """Every adapter holder's active adapter, to put back with `restore_active`."""
    return [(holder, holder.active) for _, _, holder in holders(model)]


def restore_active(model: nn.Module, state: list[tuple[nn.Module, Optional[str]]]) -> None:
    for holder, name in state:
        holder.active = name


def active_adapter(model: nn.Module) -> Optional[str]:
    """The adapter `set_active` made the model apply; None for the base model, or when holders
    disagree (an adapter set per layer by hand), since then no one name describes the model."""
    active = {holder.active for _, _, holder in holders(model)} - {None}
    return active.pop() if len(active) == 1 else None


def routed_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters that run through a per-image route (mixtures), in the order added."""
    return [e.name for e in entries(model) if registry.get(e.kind).route is not None]


# ---------------------------------------------------------------------------- merging
def merge(model: nn.Module, name: str) -> None:
    """Fold LoRA adapter `name` into the base weights (no LoRA cost at inference; routing then
    refuses). Bottleneck adapters have nonlinear branches and cannot be merged."""
    entry = entry_of(model, name)
    spec = registry.get(entry.kind)
    if spec.merge is None:
        raise AdapterError(f"only LoRA adapters can be merged; {name!r} is a {entry.kind} adapter")
    spec.merge(model, name)


def unmerge(model: nn.Module) -> None:
    """Undo `merge` (weights equal the originals up to float rounding)."""
    for spec in registry.kinds():
        if spec.unmerge is not None:
            spec.unmerge(model)


def merge_and_unload(model: nn.Module, name: str) -> None:
    """Fold LoRA adapter `name` into the base weights for good and take it off the model (peft's
    merge_and_unload): its layers become plain nn.Linear again where no other adapter sits on them,
    so `model.save_pretrained(dir)` writes an ordinary SegVol checkpoint that
    `SegVol.from_pretrained(dir)` loads and that segments as the adapted model did (up to the
    rounding of the fold). Works on a merged or an unmerged adapter; cannot be undone. Other
    adapters stay attached (remove them before exporting), and the model's base weights are now
    the merged ones, so adapters saved against the old base no longer load onto it."""
    entry = entry_of(model, name)
    spec = registry.get(entry.kind)
    if spec.unload_merged is None:
        raise AdapterError(f"only LoRA adapters can be merged; {name!r} is a {entry.kind} adapter")
    owners = [m for m in routed_adapters(model) if name in get_entry(model, m).layers]
    if owners:
        raise AdapterError(f"{name!r} is an expert of mixture {owners[0]!r}: a routed expert cannot be merged for good")
    spec.unload_merged(model, name)
    drop_entry(model, name)


# ---------------------------------------------------------------------------- training helpers
def batch_route(model: nn.Module, images, modalities) -> Optional[Route]:
    """The route of the model's mixture of adapters for a batch (None when it has none): what the
    trainer applies around encode (and, row by row, decode). AdapterError with several mixtures."""
    mixtures = routed_adapters(model)
    if not mixtures:
        return None
    if len(mixtures) > 1:
        raise AdapterError(f"the model has several mixtures {mixtures}: train one at a time")
    route = registry.get(get_entry(model, mixtures[0]).kind).route
    return route(model, mixtures[0], images=images, modalities=list(modalities))


def aux_loss(model: nn.Module) -> Optional[Tensor]:
    """Sum of the auxiliary losses the last forward left on adapters (a top-1 router's load
    balancing, Hermes priors' modality classification), or None."""
    parts = []
    for entry in entries(model):
        spec = registry.get(entry.kind)
        loss = None if spec.aux_loss is None else spec.aux_loss(model, entry)
        if loss is not None:
            parts.append(loss)
    return sum(parts) if parts else None
