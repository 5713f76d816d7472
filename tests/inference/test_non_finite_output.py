"""NaN or infinite logits end the call with NonFiniteOutputError naming the prompts, never as an
empty mask: from NaN weights (both modes, the zoom-out pass), from an overflow in the zoom-in
windows, through sessions and cohorts."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from segevol_fast.errors import NonFiniteOutputError, SegVolFastError
from segevol_fast.inference import segment
from segevol_fast.inference.cohort import cohort_items, segment_cohort

pytestmark = pytest.mark.usefixtures("one_thread")

BOX = [30, 20, 5, 80, 70, 20]


@pytest.fixture
def nan_model(tiny_model):
    with torch.no_grad():
        tiny_model.mask_decoder.output_upscaling[0].weight.view(-1)[0] = math.nan
    return tiny_model


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_nan_weights_raise_naming_the_prompts_and_the_tensor(nan_model, ct, mode):
    with pytest.raises(NonFiniteOutputError) as info:
        segment(nan_model, ct, text="liver", box=BOX, mode=mode, zoom_in=False, progress=False)
    msg = str(info.value)
    assert "'liver'" in msg and "mask_decoder.output_upscaling.0.weight" in msg
    assert info.value.prompts == ["liver"]
    assert isinstance(info.value, FloatingPointError) and isinstance(info.value, SegVolFastError)


def test_an_overflow_in_the_zoom_in_windows_is_caught(tiny_model, ct, monkeypatch):
    # the zoom-out pass (first decode) is fine and all foreground, so every window runs; one window
    # logit is inf, as after a float16 overflow; the weights stay finite
    decode, calls = tiny_model.decode, []

    def overflowing(*args, **kwargs):
        out = decode(*args, **kwargs) + 1.0
        calls.append(1)
        if len(calls) > 1:
            out[..., 0, 0, 0] = math.inf
        return out

    monkeypatch.setattr(tiny_model, "decode", overflowing)
    with pytest.raises(NonFiniteOutputError, match="zoom-in") as info:
        segment(tiny_model, ct.array[30:90, 20:80, 5:25], text=["liver", "spleen"], progress=False)
    assert info.value.prompts == ["liver", "spleen"] and "precision='fp32'" in str(info.value)
    assert len(calls) > 1


def test_a_session_and_a_cohort_see_the_error(nan_model, ct, tmp_path, data_dir):
    session = nan_model.session(ct)
    with pytest.raises(NonFiniteOutputError):
        session.segment(text="liver", zoom_in=False)
    assert session.history == {}
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(data_dir / "ct_abdomen_sm.nii.gz", scans / "ct.nii.gz")
    out = tmp_path / "out"
    (row,) = segment_cohort(nan_model, cohort_items(str(scans), text="liver"), out, progress=False, zoom_in=False)
    assert row["status"] == "error" and row["error"].startswith("NonFiniteOutputError")
    assert not (out / "ct").exists()  # no result written for that scan
