"""The adapter kinds: each registers once, from its own module, what the generic API needs.

`adapters/__init__.py` (add, set_active, merge, save, load, ...) never names a kind: it looks the
kind up here and calls what the kind registered. A new kind is one module that defines its config
(a frozen dataclass with `to_dict` / `from_dict`), its modules (subclasses of `AdapterModule`, put
at the model's seams) and one `register(AdapterKind(...))` call, imported by `adapters/__init__.py`.

How a kind is switched on decides most of the rest:
  * selectable kinds (LoRA, bottleneck) hold named adapters in holder modules with an `.active`
    name; `set_active` picks one, `route(...)` picks one per batch row;
  * routed kinds (a mixture) choose their members per image with `route`;
  * the others (context priors) apply for as long as they are attached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from torch import Tensor, nn

from ..errors import AdapterError
from .entry import AdapterEntry

Holders = Iterator[tuple[str, nn.ModuleDict, nn.Module]]


class AdapterModule(nn.Module):
    """Marks modules that hold adapter parameters: they are trained, saved and hashed apart from
    the base model (`io.base_state_dict`)."""


@dataclass(frozen=True)
class AdapterKind:
    """What one kind of adapter registers.

    name: the kind's name, as adapter files record it ("lora", "mixture", ...).
    label: how messages call an adapter of this kind ("context priors").
    config_type: its config class (`to_dict()`, `from_dict(d)`; `config_type()` is the default
        config where the kind has one).
    attach(model, name, config) -> AdapterEntry: build the adapter at its seams.
    detach(model, entry): take it off again, leaving the model as it was before attach.
    modules(model, entry) -> [(path, module)]: every piece holding its tensors; the path prefixes
        the piece's tensor names in adapter files, so it must not change between versions.
    holders(model) -> (path, named-adapter dict, holder) of every module holding adapters of this
        kind, with its `.active` name: set for selectable kinds only.
    not_selectable: why `set_active` refuses this kind (formatted with `name`); None when it has
        holders.
    route(model, name, images=, modalities=) -> Route: the per-image choice of a routed kind.
    merge(model, name) / unmerge(model): fold into the base weights and back, where possible.
    unload_merged(model, name): fold into the base weights for good and take the adapter's modules
        off, leaving a plain model where it was (`manage.merge_and_unload`).
    aux_loss(model, entry) -> the auxiliary loss the last forward left (or None).
    keeps_saved_name: its files load only under the name they were saved with (their tensor
        names contain it).
    """

    name: str
    label: str
    config_type: type
    attach: Callable[[nn.Module, str, Any], AdapterEntry]
    detach: Callable[[nn.Module, AdapterEntry], None]
    modules: Callable[[nn.Module, AdapterEntry], list[tuple[str, nn.Module]]]
    holders: Optional[Callable[[nn.Module], Holders]] = None
    not_selectable: Optional[str] = None
    route: Optional[Callable[..., Any]] = None
    merge: Optional[Callable[[nn.Module, str], None]] = None
    unmerge: Optional[Callable[[nn.Module], None]] = None
    unload_merged: Optional[Callable[[nn.Module, str], None]] = None
    aux_loss: Optional[Callable[[nn.Module, AdapterEntry], Optional[Tensor]]] = None
    keeps_saved_name: bool = False

    def __post_init__(self):
        if (self.holders is None) == (self.not_selectable is None):
            raise ValueError(f"adapter kind {self.name!r}: give holders (selectable) or not_selectable, not both")

    @property
    def selectable(self) -> bool:
        """`set_active` (and a route naming it) switches an adapter of this kind on."""
        return self.holders is not None

    @property
    def always_on(self) -> bool:
        """It applies to every call while attached: neither selected nor routed per call."""
        return not self.selectable and self.route is None


_KINDS: dict[str, AdapterKind] = {}


def register(kind: AdapterKind) -> AdapterKind:
    """Make `kind` known (once per name); called by the kind's own module when it is imported."""
    if kind.name in _KINDS:
        raise ValueError(f"adapter kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


def find(name: Optional[str]) -> Optional[AdapterKind]:
    """The kind registered as `name`, or None."""
    return _KINDS.get(name)


def get(name: str) -> AdapterKind:
    """The kind registered as `name`; AdapterError naming the known ones otherwise."""
    kind = _KINDS.get(name)
    if kind is None:
        raise AdapterError(f"unknown adapter kind {name!r}; known kinds: {sorted(_KINDS)}")
    return kind


def kinds() -> tuple[AdapterKind, ...]:
    """Every registered kind, in registration order."""
    return tuple(_KINDS.values())
