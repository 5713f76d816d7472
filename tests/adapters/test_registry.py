"""A new adapter kind is one module and its registration: the generic API (add, parameters,
set_active, save / load, remove, deepcopy) runs it without knowing it. The toy kind here adds a
learned, zero-initialised offset to the encoder's tokens at the `after_encoder` seam."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import pytest
import torch
from torch import nn

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.adapters import registry
from segevol_fast.adapters.entry import AdapterEntry
from segevol_fast.adapters.manage import add
from segevol_fast.errors import AdapterError

pytestmark = pytest.mark.usefixtures("one_thread")
KIND = "token_offset"
SEAM = "image_encoder.after_encoder"


@dataclass(frozen=True)
class OffsetConfig:
    scale: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OffsetConfig":
        return cls(**d)


class TokenOffset(adapters.AdapterModule):
    def __init__(self, hidden: int, scale: float):
        super().__init__()
        self.scale = scale
        self.offset = nn.Parameter(torch.zeros(hidden))

    def forward(self, tokens):
        return tokens + self.scale * self.offset


def _attach(model, name, config):
    model.image_encoder.after_encoder = TokenOffset(model.config.hidden_size, config.scale)
    return AdapterEntry(name, KIND, config, [SEAM])


def _detach(model, entry):
    model.image_encoder.after_encoder = None


def _modules(model, entry):
    return [(SEAM, model.image_encoder.after_encoder)]


if registry.find(KIND) is None:  # a module imported twice registers once
    registry.register(
        registry.AdapterKind(
            name=KIND,
            label="token offset",
            config_type=OffsetConfig,
            attach=_attach,
            detach=_detach,
            modules=_modules,
            not_selectable="{name!r} is a token offset: it applies while attached",
        )
    )


@pytest.fixture
def model():
    torch.manual_seed(0)
    return SegVol(SegVolConfig.tiny()).eval()


def _encode(model, x):
    with torch.no_grad():
        return model.encode_image(x)


def test_a_registered_kind_runs_through_the_generic_api(model, tmp_path):
    x = torch.rand(1, 1, *model.config.spatial_size)
    base = _encode(model, x)
    assert add(model, KIND, "shift", OffsetConfig(0.5), freeze_base=True, activate=False).layers == [SEAM]
    assert adapters.adapter_names(model) == ["shift"]
    assert torch.equal(_encode(model, x), base)  # an identity until trained
    (param,) = adapters.adapter_parameters(model, "shift")
    assert param.requires_grad and not any(p.requires_grad for p in adapters.base_parameters(model))
    with torch.no_grad():
        param.normal_()
    trained = _encode(model, x)
    assert not torch.equal(trained, base)
    with pytest.raises(AdapterError, match="token offset: it applies while attached"):
        adapters.set_active(model, "shift")
    with pytest.raises(AdapterError, match="only LoRA adapters can be merged"):
        adapters.merge(model, "shift")

    path = adapters.save_adapter(model, "shift", tmp_path / "shift.safetensors")
    other = SegVol(SegVolConfig.tiny()).eval()
    other.load_state_dict(adapters.base_state_dict(model))
    assert adapters.load_adapter(other, path) == "shift"
    assert torch.equal(_encode(other, x), trained)
    assert torch.equal(_encode(copy.deepcopy(other), x), trained)

    adapters.remove_adapter(model, "shift")
    assert adapters.adapter_names(model) == [] and torch.equal(_encode(model, x), base)


def test_kinds_are_registered_once_with_a_consistent_switch():
    assert {"lora", "bottleneck", "mixture", "context_prior"} <= {k.name for k in registry.kinds()}
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(registry.get("lora"))
    with pytest.raises(ValueError, match="holders"):
        registry.AdapterKind(
            name="x", label="x", config_type=OffsetConfig, attach=_attach, detach=_detach, modules=_modules
        )
    with pytest.raises(AdapterError, match="unknown adapter kind"):
        registry.get("no such kind")
