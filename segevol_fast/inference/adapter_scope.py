"""`segment(adapter=...)`: which adapter a call runs with, applied for the call only.

    adapter=None      the model as it stands (its active adapter, if any)
    adapter="base"    no adapter: the base model
    adapter="<name>"  that LoRA / bottleneck adapter, or that mixture routed for this scan
    adapter="auto"    the model's one mixture, routed for this scan (by modality tag or by its
                      learned router on the zoom-out image)

The command line and cohort manifests may also name an adapter file: `adapter_for` attaches it
once (inactive) and gives the name to pass as `adapter=`. A file of a kind that applies to every
call while attached (context priors) cannot be chosen per scan, so a manifest row may not name one;
the command's own `--adapter`, which is for every scan of the run, attaches it for good
(`attach_for_every_scan`).

A mixture routes per scan: one choice (an expert, the identity, or soft gates) for all of the
scan's windows and decodes, a one-row `Route` that every adapted layer broadcasts. The call also
declares the scan's modality (`adapters.prompt_context`) for adapters that read it. Whatever the
model's active adapter was, it is restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

from torch import Tensor

from .. import adapters
from ..adapters import registry
from ..adapters.io import read_adapter_file
from ..adapters.manage import routed_adapters
from ..adapters.mixture import routes_on_images
from ..errors import AdapterError


def mixture_for(model, adapter: str) -> Optional[str]:
    """The mixture that `segment(adapter=...)` routes through: the model's one mixture for
    "auto", `adapter` itself when it names a mixture, None for any other adapter. AdapterError
    for an unknown name, or "auto" on a model without exactly one mixture."""
    mixtures = routed_adapters(model)
    if adapter == "auto":
        if len(mixtures) != 1:
            raise AdapterError(
                f"adapter='auto' routes with the model's mixture of adapters; it has "
                f"{len(mixtures)} ({mixtures or 'none'}): name the adapter instead"
            )
        return mixtures[0]
    names = adapters.adapter_names(model)
    if adapter not in names:
        raise AdapterError(f"no adapter named {adapter!r}; this model has {names or 'none'} (or use 'base' / 'auto')")
    return adapter if adapter in mixtures else None


def scan_route(model, mixture: str, modality: str, zoom_image: Callable[[], Tensor]) -> adapters.Route:
    """The one-row route of `mixture` for one scan: by its modality tag, or by the mixture's
    learned router on the scan's zoom-out image (zoom_image() (1, 1, *spatial), called only then)."""
    images = zoom_image() if routes_on_images(model, mixture) else None
    return adapters.route_for(model, mixture, images=images, modalities=[modality])


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
        mixture = None if adapter == "base" else mixture_for(model, adapter)
        saved = adapters.active_state(model)
        stack.callback(adapters.restore_active, model, saved)
        if mixture is None:
            adapters.set_active(model, None if adapter == "base" else adapter)
            yield adapter
            return
        adapters.set_active(model, None)
        r = scan_route(model, mixture, modality, zoom_image)
        stack.enter_context(adapters.route(r))
        yield f"{mixture}: {describe(r)}"


def adapter_for(model, spec: Optional[str], attached: dict[str, str]) -> Optional[str]:
    """The `segment(adapter=...)` value for `spec`: None, "base", "auto" or the name of an attached
    adapter as they are; the path of an adapter file (`adapters.save_adapter`) is attached to
    `model` once, inactive, and its name returned. `attached` maps the files attached so far
    (real path -> name) and grows; `adapters.remove_adapter` them when done.

    Raises AdapterError for a spec that is neither, AdapterMismatchError for a file trained on
    other base weights, CheckpointError for a file that is no adapter."""
    if spec is None or spec in ("base", "auto") or spec in adapters.adapter_names(model):
        return spec
    if not os.path.isfile(spec):
        raise AdapterError(
            f"no adapter named {spec!r} (the model has {adapters.adapter_names(model) or 'none'}) "
            f"and no adapter file at {spec}"
        )
    key = os.path.realpath(spec)
    if key not in attached:
        attached[key] = _attach_file(model, spec)
    return attached[key]


def applies_to_every_scan(path: str) -> bool:
    """Whether the adapter file at `path` holds a kind that applies to every call while attached
    (context priors) rather than one chosen per call."""
    kind = registry.find(read_adapter_file(path)[1].get("kind"))
    return kind is not None and kind.always_on


def attach_for_every_scan(model, path: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """A run's own adapter file, for all its scans: (the `segment(adapter=...)` value, the name it
    is attached under). A kind that applies while attached is attached for good and the call
    chooses nothing (None); any other kind goes through `adapter_for`."""
    if path is None:
        return None, None
    if applies_to_every_scan(path):
        return None, adapters.load_adapter(model, path)
    name = adapter_for(model, path, {})
    return name, name


def file_note(name: str, path: str) -> str:
    """The note (summary.json "notes") of a result whose adapter came from a file."""
    return f"adapter {name!r} loaded from {path}"


def _attach_file(model, path: str) -> str:
    _, meta = read_adapter_file(path)
    kind, name = registry.find(meta.get("kind")), meta.get("name") or "adapter"
    if kind is not None and kind.always_on:  # not chosen per call, so one row's would apply to every scan
        raise AdapterError(
            f"{path} holds {kind.label}, which apply to every scan while attached: attach them "
            "with segevol_fast.adapters.load_adapter(model, path) before segmenting instead"
        )
    taken = adapters.adapter_names(model)
    if name in taken and kind is not None and kind.keeps_saved_name:
        raise AdapterError(
            f"{path} holds the {kind.label} {name!r}, and the model already has an adapter of that "
            f"name: a {kind.label} loads under its saved name"
        )
    unique, n = name, 1
    while unique in taken:  # two files saved under the same name (e.g. "default") both load
        n += 1
        unique = f"{name}_{n}"
    return adapters.load_adapter(model, path, name=unique, activate=False)
