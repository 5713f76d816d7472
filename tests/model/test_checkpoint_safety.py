"""Checkpoints that must not be used: NaN / inf tensors are refused naming the file and the key,
and a pickle holding code or custom objects is refused without advising the unsafe reader."""

from __future__ import annotations

import math
import os
import pickle
import re

import pytest
import torch

from segevol_fast import SegVol, SegVolConfig
from segevol_fast.errors import CheckpointError, NonFiniteWeightsError
from segevol_fast.model.checkpoint import save_safetensors

KEY = "mask_decoder.output_upscaling.0.weight"


@pytest.fixture
def state():
    torch.manual_seed(0)
    return SegVol(SegVolConfig.tiny()).state_dict()


@pytest.mark.parametrize(
    "name,value", [("model.safetensors", math.nan), ("pytorch_model.bin", math.inf), ("SegVol_v1.pth", -math.inf)]
)
def test_a_non_finite_tensor_is_refused_naming_file_and_key(tmp_path, state, name, value):
    assert KEY in state
    state[KEY] = state[KEY].clone()
    state[KEY].view(-1)[3] = value
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_safetensors(state, path)
    elif name == "SegVol_v1.pth":
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:
        torch.save({f"model.{k}": v for k, v in state.items()}, path)
    with pytest.raises(NonFiniteWeightsError) as info:
        SegVol.from_pretrained(path, config=SegVolConfig.tiny())
    msg = str(info.value)
    assert str(path) in msg and KEY in msg and isinstance(info.value, CheckpointError)


class _Shell:
    """Unpickling this would run a shell command (it never may)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Custom:
    pass


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain-pickle", "custom-class"])
def test_a_pickle_with_code_is_refused_without_advising_the_unsafe_reader(tmp_path, state, kind):
    marker = tmp_path / "code-ran"
    path = tmp_path / "pytorch_model.bin"
    payload = {**{f"model.{k}": v for k, v in state.items()}, "extra": _Shell(marker)}
    if kind == "zip":
        torch.save(payload, path)
    elif kind == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    elif kind == "plain-pickle":
        path.write_bytes(pickle.dumps({"extra": _Shell(marker)}, protocol=2))
    else:
        torch.save({**payload, "extra": _Custom()}, path)
    with pytest.raises(CheckpointError) as info:
        SegVol.from_pretrained(tmp_path, config=SegVolConfig.tiny())
    msg = str(info.value)
    assert not marker.exists()
    assert str(path) in msg and "not loaded" in msg and "safetensors" in msg and "state dict" in msg
    assert "weights_only" not in msg and not re.search(r"weights.only.{0,40}false", msg, re.I | re.S)
    assert "arbitrary code" not in msg and info.value.__suppress_context__  # torch's advice stays hidden
