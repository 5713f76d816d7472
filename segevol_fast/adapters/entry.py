"""What the model knows of each attached adapter: a typed entry, kept with the model.

Entries live on the model object itself (one private attribute), so they follow it through
`copy.deepcopy` and pickling together with the modules they describe; nothing outside this module
reads that attribute. They are not part of `state_dict()`: the checkpoint keys stay the official
ones, and adapter tensors are saved apart (`io.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

_ATTRIBUTE = "_segevol_adapter_entries"


@dataclass(eq=False)
class AdapterEntry:
    """name: the adapter's name on this model; kind: its registered kind's name (`registry.py`);
    config: the kind's config object; layers: what it adapts, in attach order, as its file
    records them (module paths; a mixture: its experts' adapter names)."""

    name: str
    kind: str
    config: Any
    layers: list[str]


def entries(model: nn.Module) -> list[AdapterEntry]:
    """Every adapter attached to `model`, in the order they were added."""
    return list(_table(model).values())


def get_entry(model: nn.Module, name: Optional[str]) -> Optional[AdapterEntry]:
    """The entry of adapter `name`, or None."""
    return _table(model).get(name)


def put_entry(model: nn.Module, entry: AdapterEntry) -> None:
    vars(model).setdefault(_ATTRIBUTE, {})[entry.name] = entry


def drop_entry(model: nn.Module, name: str) -> None:
    _table(model).pop(name, None)


def _table(model: nn.Module) -> dict[str, AdapterEntry]:
    return vars(model).get(_ATTRIBUTE, {})
