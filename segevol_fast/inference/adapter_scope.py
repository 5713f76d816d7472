"""`segment(adapter=...)`: which adapter a call runs with, applied for the call only.

    adapter=None      the model as it stands (its active adapter, if any)
    adapter="base"    no adapter: the base model
    adapter="<name>"  that LoRA / bottleneck adapter, or that mixture routed for this scan
    adapter="auto"    the model's one mixture, routed for this scan (by modality tag or by its
                      learned router on the zoom-out image)

A mixture routes per scan: one choice (an expert, the identity, or soft gates) for all of the
scan's windows and decodes, a one-row `Route` that every adapted layer broadcasts. The call also
declares the scan's modality (`adapters.prompt_context`) for adapters that read it. Whatever the
model's active adapter was, it is restored afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

from torch import Tensor

from .. import adapters
from ..errors import AdapterError


def _mixture_for(model, adapter: str) -> Optional[str]:
    configs = getattr(model, "adapter_configs", {})
    if adapter == "auto":
        mixtures = [n for n, e in configs.items() if e["kind"] == "mixture"]
        if len(mixtures) != 1:
            raise AdapterError(f"adapter='auto' routes with the model's mixture of adapters; it has "
                               f"{len(mixtures)} ({mixtures or 'none'}): name the adapter instead")
        return mixtures[0]
    if adapter not in configs:
        raise AdapterError(f"no adapter named {adapter!r}; this model has {list(configs) or 'none'} "
                           "(or use 'base' / 'auto')")
    return adapter if configs[adapter]["kind"] == "mixture" else None


def describe(route: adapters.Route) -> str:
    if route.index is not None:
        i = int(route.index[0])
        return "identity (base model)" if i < 0 else route.names[i]
    return "gates " + ", ".join(f"{n} {float(g):.3f}" for n, g in zip(route.names, route.gates[0]))


@contextlib.contextmanager
def adapter_scope(model, adapter: Optional[str], modality: str, zoom_image: Callable[[], Tensor]) -> Iterator[str]:
    """Apply `adapter` for the block; yields a description of what runs ("base", a name, or a
    mixture's choice). zoom_image() gives the scan's (1, 1, *spatial) model input (learned routing)."""
    with adapters.prompt_context(modalities=[modality]), contextlib.ExitStack() as stack:
        if adapter is None:
            yield "as set on the model"
            return
        mixture = None if adapter == "base" else _mixture_for(model, adapter)
        saved = adapters.active_state(model)
        stack.callback(adapters.restore_active, model, saved)
        if mixture is None:
            adapters.set_active(model, None if adapter == "base" else adapter)
            yield adapter
            return
        adapters.set_active(model, None)
        routing = model.adapter_configs[mixture]["config"]["routing"]
        images = None if routing == "tag" else zoom_image()
        r = adapters.route_for(model, mixture, images=images, modalities=[modality])
        stack.enter_context(adapters.route(r))
        yield f"{mixture}: {describe(r)}"
