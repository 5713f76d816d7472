"""Adapters saved alone: a small safetensors file that names the base weights it was trained on.

The file holds only the adapter's tensors (LoRA A/B per adapted layer) plus metadata: format and
version, the adapter kind and config, the layers it attaches to, and a SHA-256 of the base model's
weights (`base_weights_hash`). Loading refuses a file whose hash differs from the model it is
loaded into (`AdapterMismatchError`): an adapter on other base weights gives wrong masks with no
error otherwise. `check_base=False` overrides that, for a deliberate transfer.

The metadata also holds a SHA-256 of the adapter's own tensors (`tensors_sha256`): a file whose
bytes changed after saving is refused as damaged (`DamagedWeightsError`), even when the changed
values are still plausible numbers. Files written before that key existed load without it. NaN or
infinite values are refused on saving and on loading (`NonFiniteWeightsError`), since they make
every mask empty.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional

import torch
from torch import nn

from ..errors import AdapterError, AdapterMismatchError, CheckpointError, DamagedWeightsError
from ..model.checkpoint import check_finite
from . import registry
from .manage import adapter_modules, add, entry_of, remove_adapter, set_active
from .registry import AdapterModule

FORMAT = "segevol_fast.adapter"
VERSION = 1


def save_adapter(model: nn.Module, name: str, path: str | os.PathLike) -> str:
    """Write adapter `name` alone to `path` (safetensors + metadata naming the base weights'
    SHA-256). Returns the path."""
    entry = entry_of(model, name)
    tensors = {f"{holder}.{k}": t for holder, m in adapter_modules(model, name) for k, t in m.state_dict().items()}
    meta = {
        "name": name,
        "kind": entry.kind,
        "config": entry.config.to_dict(),
        "layers": list(entry.layers),
        "base_weights_sha256": base_weights_hash(model),
        "base_weights_source": None if getattr(model, "weights_source", None) is None else str(model.weights_source),
        "model_config": _config_dict(model),
    }
    save_adapter_file(path, tensors, meta)
    return os.fspath(path)


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: Optional[str] = None,
    *,
    check_base: bool = True,
    activate: bool = True,
    kind: Optional[str] = None,
) -> str:
    """Attach the adapter saved in `path` (as `name`, default its saved name); returns the name.

    kind: refuse (CheckpointError) a file holding another kind of adapter ("lora", "mixture", ...).
    Raises AdapterMismatchError when it was trained on other base weights (unless
    check_base=False), CheckpointError for a damaged or foreign file or mismatched tensors."""
    tensors, meta = read_adapter_file(path)
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} adapter, not a {kind!r} one")
    check_base_weights(model, meta, path, check_base)
    spec = registry.find(meta.get("kind"))
    if spec is None:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} adapter, which this version cannot load")
    name = name or meta["name"]
    if spec.keeps_saved_name and name != meta["name"]:
        raise CheckpointError(f"{path}: a {spec.label} loads under its saved name {meta['name']!r}")
    layers = add(
        model, spec.name, name, spec.config_type.from_dict(meta["config"]), freeze_base=False, activate=False
    ).layers
    try:
        if len(layers) != len(meta["layers"]):
            raise CheckpointError(
                f"{path} adapts {len(meta['layers'])} places, but its config matches {len(layers)} here"
            )
        for holder, m in adapter_modules(model, name):
            _refuse_retired(path, holder, m, tensors)
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
    if activate and spec.selectable:  # mixtures route, priors always apply
        set_active(model, name)
    return name


def _refuse_retired(path, holder: str, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """CheckpointError with the module's own reason for a tensor that an earlier layout of it saved
    (its `retired_tensors`: {tensor name: why a file holding it no longer loads})."""
    for key, why in getattr(module, "retired_tensors", {}).items():
        if f"{holder}.{key}" in tensors:
            raise CheckpointError(f"{path} holds {holder}.{key}: {why}")


def _config_dict(model: nn.Module) -> Optional[dict]:
    cfg = getattr(model, "config", None)
    if cfg is None or not dataclasses.is_dataclass(cfg):
        return None
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """state_dict keys that belong to adapters (anything under an `AdapterModule`)."""
    names = set()
    for path, m in model.named_modules():
        if isinstance(m, AdapterModule):
            names.update(f"{path}.{k}" if path else k for k in m.state_dict())
    return names


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without adapter tensors: exactly the base checkpoint's keys."""
    skip = adapter_parameter_names(model)
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def base_weights_hash(model: nn.Module) -> str:
    """SHA-256 over every base tensor's name, shape, dtype and bytes, in key order. Refuses a model
    with a merged adapter (its weights are not the base's)."""
    merged = [p for p, m in model.named_modules() if getattr(m, "merged", None) is not None]
    if merged:
        raise AdapterError(
            f"{len(merged)} layer(s) hold a merged adapter (e.g. {merged[0]}): unmerge before hashing "
            "or saving the base"
        )
    return tensors_sha256(base_state_dict(model))


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, shape, dtype and bytes, in key order."""
    h = hashlib.sha256()
    for key, t in sorted(tensors.items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _checked_for_saving(path, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The integrity metadata of an adapter about to be written; refuses non-finite tensors, which
    no load would accept."""
    check_finite(
        tensors,
        f"adapter for {os.fspath(path)}",
        advice="The training diverged (try a lower learning rate or an earlier adapter); nothing was written.",
    )
    return {"tensors_sha256": tensors_sha256(tensors)}


def _verify(path: str, tensors: dict[str, torch.Tensor], header: dict) -> None:
    """DamagedWeightsError when the tensors differ from the checksum saved with them;
    NonFiniteWeightsError for NaN / inf (also in files saved before the checksum existed)."""
    want = header.get("tensors_sha256")
    if want is not None and tensors_sha256(tensors) != want:
        raise DamagedWeightsError(
            f"{path} is corrupt: its tensors no longer match the SHA-256 saved with them (the file changed "
            "after it was written: a damaged disk, copy or download). Copy it again from its source, or "
            "save the adapter again."
        )
    check_finite(tensors, path)


def save_adapter_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write tensors + JSON metadata to `path` (safetensors), atomically and with a normal file's
    mode (`io.output.write_file_atomic`; safetensors alone would leave it 0600)."""
    from safetensors.torch import save_file

    from ..io.output import write_file_atomic

    header = {
        "format": FORMAT,
        "version": str(VERSION),
        "meta": json.dumps(meta, sort_keys=True),
        **_checked_for_saving(path, tensors),
    }
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_file_atomic(os.path.abspath(os.fspath(path)), lambda tmp: save_file(cpu, tmp, metadata=header))


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of an adapter file, its checksum and values checked (`_verify`);
    CheckpointError for anything else."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no adapter file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own types for damaged / foreign files
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a segevol_fast adapter (format {header.get('format')!r})"
        )
    if int(header.get("version", "0")) > VERSION:
        raise CheckpointError(
            f"{path} was written by a newer segevol_fast (adapter format {header['version']}); upgrade"
        )
    _verify(path, tensors, header)
    return tensors, json.loads(header["meta"])


def check_base_weights(model: nn.Module, meta: dict, path, check: bool, base_hash: Optional[str] = None) -> None:
    """Refuse an adapter trained on other base weights (AdapterMismatchError)."""
    if not check:
        return
    want = meta.get("base_weights_sha256")
    have = base_hash or base_weights_hash(model)
    if want != have:
        # weights cast to 16 bits hash differently from the float32 weights the adapter was trained on
        cast = sorted(
            {str(t.dtype) for t in base_state_dict(model).values() if t.dtype in (torch.bfloat16, torch.float16)}
        )
        hint = f" (this model's weights are cast to {cast[0]}: load the adapter before casting them)" if cast else ""
        raise AdapterMismatchError(
            f"{path} was trained on base weights with SHA-256 {str(want)[:16]}..., but this model's are "
            f"{have[:16]}...{hint}: load the base checkpoint it was trained on (its metadata names "
            f"{meta.get('base_weights_source') or 'no source'}), or pass check_base=False to load it anyway"
        )
