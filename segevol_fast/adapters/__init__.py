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
from . import io as _io
from .io import base_state_dict, base_weights_hash
from .lora import AdapterModule, LoraConfig, LoraLinear, LoraWeights
from .routing import Route, current_route, no_route, route
from .targets import SEGEVOLUTION_TARGETS, match_linears, output_slices

__all__ = [
    "LoraConfig", "LoraLinear", "LoraWeights", "AdapterModule", "Route", "route", "no_route", "current_route",
    "SEGEVOLUTION_TARGETS", "add_lora", "set_active", "merge", "unmerge", "remove_adapter", "adapter_names",
    "adapter_parameters", "base_parameters", "save_adapter", "load_adapter", "base_state_dict", "base_weights_hash",
]


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for path, m in model.named_modules():
        if isinstance(m, LoraLinear):
            yield path, m


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters attached to `model`, in the order they were added."""
    return list(getattr(model, "adapter_configs", {}))


def add_lora(model: nn.Module, name: str = "default", config: Optional[LoraConfig] = None, *,
             freeze_base: bool = True, activate: bool = True) -> list[str]:
    """Attach a LoRA adapter called `name` to every layer `config.targets` matches.

    Returns the adapted layers' names. With freeze_base (default) every non-adapter parameter is
    set requires_grad=False, so an optimiser over `adapter_parameters(model)` trains LoRA only;
    with activate (default) the new adapter is the active one. At step 0 the model's outputs
    equal the base model's bit for bit (B starts at zero).
    """
    config = config or LoraConfig()
    registry = model.__dict__.setdefault("adapter_configs", {})
    if name in registry:
        raise AdapterError(f"model already has an adapter named {name!r}; remove_adapter it first or pick another name")
    matched = match_linears(model, config.targets)
    for path, layer, parts in matched:
        slices = output_slices(layer, parts, path)
        if not isinstance(layer, LoraLinear):
            layer = _replace(model, path, LoraLinear(layer))
        layer.add_adapter(name, config, slices)
    registry[name] = {"kind": "lora", "config": config.to_dict(), "layers": [p for p, _, _ in matched]}
    if freeze_base:
        for p in base_parameters(model):
            p.requires_grad_(False)
    if activate:
        set_active(model, name)
    return [p for p, _, _ in matched]


def _replace(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return new


def base_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    skip = {id(p) for m in model.modules() if isinstance(m, AdapterModule) for p in m.parameters()}
    return (p for p in model.parameters() if id(p) not in skip)


def adapter_parameters(model: nn.Module, name: Optional[str] = None) -> list[nn.Parameter]:
    """Parameters of every adapter (or of adapter `name`): what the trainer optimises."""
    out = []
    for _, layer in _lora_layers(model):
        for n, w in layer.lora.items():
            if name is None or n == name:
                out.extend(w.parameters())
    return out


def _known(model: nn.Module, name: Optional[str]) -> None:
    if name is not None and name not in adapter_names(model):
        raise AdapterError(f"no adapter named {name!r}; this model has {adapter_names(model) or 'none'}")


def set_active(model: nn.Module, name: Optional[str]) -> None:
    """Make `name` the adapter every adapted layer applies (None: the base model)."""
    _known(model, name)
    for _, layer in _lora_layers(model):
        layer.active = name if name in layer.lora else None


def merge(model: nn.Module, name: str) -> None:
    """Fold adapter `name` into the base weights (no LoRA cost at inference; routing then refuses)."""
    _known(model, name)
    for _, layer in _lora_layers(model):
        if name in layer.lora:
            layer.merge(name)


def unmerge(model: nn.Module) -> None:
    """Undo `merge` (weights equal the originals up to float rounding)."""
    for _, layer in _lora_layers(model):
        layer.unmerge()


def remove_adapter(model: nn.Module, name: str) -> None:
    _known(model, name)
    for _, layer in _lora_layers(model):
        if name in layer.lora:
            layer.remove_adapter(name)
    del model.adapter_configs[name]


# ---------------------------------------------------------------------------- files
def save_adapter(model: nn.Module, name: str, path: str | os.PathLike) -> str:
    """Write adapter `name` alone to `path` (safetensors + metadata naming the base weights'
    SHA-256). Returns the path."""
    _known(model, name)
    entry = model.adapter_configs[name]
    tensors = {}
    for layer_path, layer in _lora_layers(model):
        if name in layer.lora:
            for k, t in layer.lora[name].state_dict().items():
                tensors[f"{layer_path}.{k}"] = t
    meta = {"name": name, "kind": entry["kind"], "config": entry["config"], "layers": entry["layers"],
            "base_weights_sha256": base_weights_hash(model),
            "base_weights_source": None if getattr(model, "weights_source", None) is None else str(model.weights_source),
            "model_config": _config_dict(model)}
    _io.save_adapter_file(path, tensors, meta)
    return os.fspath(path)


def load_adapter(model: nn.Module, path: str | os.PathLike, name: Optional[str] = None, *,
                 check_base: bool = True, activate: bool = True) -> str:
    """Attach the adapter saved in `path` (as `name`, default its saved name); returns the name.

    Raises AdapterMismatchError when it was trained on other base weights (unless
    check_base=False), CheckpointError for a damaged or foreign file or mismatched tensors."""
    tensors, meta = _io.read_adapter_file(path)
    _io.check_base(model, meta, path, check_base)
    if meta.get("kind") != "lora":
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} adapter, which this version cannot load")
    name = name or meta["name"]
    config = LoraConfig.from_dict(meta["config"])
    layers = add_lora(model, name, config, freeze_base=False, activate=False)
    if layers != meta["layers"]:
        remove_adapter(model, name)
        raise CheckpointError(f"{path} adapts {len(meta['layers'])} layers, but its targets match {len(layers)} here")
    try:
        for layer_path, layer in _lora_layers(model):
            if name in layer.lora:
                w = layer.lora[name]
                own = {k: tensors.pop(f"{layer_path}.{k}", None) for k in w.state_dict()}
                missing = [k for k, v in own.items() if v is None]
                if missing:
                    raise CheckpointError(f"{path} lacks {layer_path}.{missing[0]}")
                w.load_state_dict(own, strict=True)
        if tensors:
            raise CheckpointError(f"{path} has tensors for no adapted layer here, e.g. {next(iter(tensors))}")
    except (CheckpointError, RuntimeError) as exc:
        remove_adapter(model, name)
        raise CheckpointError(str(exc)) from exc
    if activate:
        set_active(model, name)
    return name


def _config_dict(model: nn.Module) -> Optional[dict]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    import dataclasses

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()} \
        if dataclasses.is_dataclass(cfg) else None
