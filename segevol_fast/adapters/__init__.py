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

Each kind lives in its own module and registers itself once (`registry.py`): `lora.py`,
`bottleneck.py`, `mixture.py`, `context_prior.py`, `rotation_branch.py`. The operations that work
on any kind (select, merge, remove, parameters) are in `manage.py`, files in `io.py`; this package
only gathers them.
"""

from __future__ import annotations

from .bottleneck import BottleneckConfig, add_bottleneck
from .context import PromptContext, current_context, prompt_context
from .context_prior import (
    ContextPriorConfig,
    ContextPriors,
    add_context_priors,
    get_context_priors,
    prompts_without_text_are_untasked,
)
from .io import base_state_dict, base_weights_hash, load_adapter, save_adapter
from .lora import LoraConfig, LoraLinear, LoraWeights, add_lora
from .manage import (
    active_adapter,
    active_state,
    adapter_modules,
    adapter_names,
    adapter_parameters,
    aux_loss,
    base_parameters,
    batch_route,
    merge,
    merge_and_unload,
    remove_adapter,
    restore_active,
    set_active,
    unmerge,
)
from .mixture import MixtureConfig, add_mixture, route_for
from .registry import AdapterModule
from .rotation_branch import RotationBranchConfig, add_rotation_branch
from .routing import Route, current_route, no_route, route
from .targets import SEGEVOLUTION_TARGETS

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "LoraWeights",
    "AdapterModule",
    "Route",
    "route",
    "no_route",
    "current_route",
    "SEGEVOLUTION_TARGETS",
    "add_lora",
    "add_bottleneck",
    "BottleneckConfig",
    "add_mixture",
    "MixtureConfig",
    "route_for",
    "add_rotation_branch",
    "RotationBranchConfig",
    "active_state",
    "restore_active",
    "active_adapter",
    "ContextPriorConfig",
    "ContextPriors",
    "add_context_priors",
    "get_context_priors",
    "prompts_without_text_are_untasked",
    "batch_route",
    "aux_loss",
    "adapter_modules",
    "set_active",
    "merge",
    "merge_and_unload",
    "unmerge",
    "remove_adapter",
    "adapter_names",
    "adapter_parameters",
    "base_parameters",
    "save_adapter",
    "prompt_context",
    "current_context",
    "PromptContext",
    "load_adapter",
    "base_state_dict",
    "base_weights_hash",
]
