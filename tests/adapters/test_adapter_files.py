"""Adapter files are checked on loading: a checksum of their tensors catches any change of the
stored bytes (even one that keeps the values plausible), and NaN / inf is refused on saving and
on loading (files saved before the checksum existed included)."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.adapters import LoraConfig
from segevol_fast.errors import CheckpointError, DamagedWeightsError, NonFiniteWeightsError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = SegVol(SegVolConfig.tiny()).eval()
    adapters.add_lora(m, "mr", LoraConfig(rank=4))
    with torch.no_grad():  # B starts at zero: give the file values whose bits mean something
        for p in adapters.adapter_parameters(m):
            p.normal_(0, 0.1)
    return m


def _fresh(model) -> SegVol:
    fresh = SegVol(SegVolConfig.tiny()).eval()
    fresh.load_state_dict(adapters.base_state_dict(model), strict=True)
    return fresh


def _layout(path) -> tuple[int, dict]:
    """(offset of the data region, header) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8 : 8 + n])


def _overwrite_float(path, value: float) -> str:
    """Write `value` over the first float32 of the first tensor's data (header untouched); its key."""
    start, header = _layout(path)
    key = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    assert header[key]["dtype"] == "F32"
    raw = bytearray(path.read_bytes())
    at = start + header[key]["data_offsets"][0]
    raw[at : at + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(raw))
    return key


def _without_checksum(path) -> None:
    """Rewrite `path` as the previous version wrote adapters: the same metadata minus the checksum."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta["tensors_sha256"]
    save_file(tensors, str(path), metadata=meta)


def test_intact_files_load_with_and_without_a_checksum(model, tmp_path):
    path = adapters.save_adapter(model, "mr", tmp_path / "mr.safetensors")
    with safe_open(path, framework="pt") as f:
        assert len(f.metadata()["tensors_sha256"]) == 64
    assert adapters.load_adapter(_fresh(model), path) == "mr"
    _without_checksum(tmp_path / "mr.safetensors")
    assert adapters.load_adapter(_fresh(model), path) == "mr"


@pytest.mark.parametrize("value", [math.inf, math.nan, 1e24, 0.125], ids=["inf", "nan", "huge", "plausible"])
def test_changed_tensor_bytes_are_refused_as_damaged(model, tmp_path, value):
    path = tmp_path / "mr.safetensors"
    adapters.save_adapter(model, "mr", path)
    _overwrite_float(path, value)
    fresh = _fresh(model)
    with pytest.raises(DamagedWeightsError, match="corrupt") as info:
        adapters.load_adapter(fresh, path)
    assert str(path) in str(info.value) and isinstance(info.value, CheckpointError)
    assert adapters.adapter_names(fresh) == []  # nothing half-attached


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_values_in_a_file_without_checksum_are_refused(model, tmp_path, value):
    path = tmp_path / "mr.safetensors"
    adapters.save_adapter(model, "mr", path)
    _without_checksum(path)
    key = _overwrite_float(path, value)
    with pytest.raises(NonFiniteWeightsError) as info:
        adapters.load_adapter(_fresh(model), path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_a_non_finite_adapter_is_not_saved(model, tmp_path):
    with torch.no_grad():
        adapters.adapter_parameters(model)[0].view(-1)[0] = math.nan
    with pytest.raises(NonFiniteWeightsError, match="nothing was written"):
        adapters.save_adapter(model, "mr", tmp_path / "mr.safetensors")
    assert list(tmp_path.iterdir()) == []
