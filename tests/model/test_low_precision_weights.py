"""Weights cast by the caller (`model.to(torch.bfloat16)`, `.half()`): every public path runs, in
the weights' own dtype, and agrees with float32 weights under autocast of that dtype.

Measured on the tiny model and a 60x60x30 crop of the shared CT (text "liver", "spleen"):
bf16 weights vs fp32 weights with precision="bf16" differ by at most 0.0012 in probability (mask
Dice 0.996, fast and exact mode, session, with and without a LoRA adapter); fp16 by 0.0001
(Dice 0.9997). The bounds below leave room for other seeds and thread counts.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from segevol_fast.adapters import add_bottleneck, add_lora, load_adapter, remove_adapter, save_adapter
from segevol_fast.errors import AdapterMismatchError, InvalidArgumentError
from segevol_fast.inference.precision import inference_state, resolve_precision
from segevol_fast.model.layers import LayerNorm32

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_PROB_DIFF = 0.01
MIN_DICE = 0.98


@pytest.fixture
def crop(ct):
    return ct.array[20:80, 20:80, :]  # small enough for a second per call on the tiny model


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


def _assert_agree(ref, got):
    assert ref.labels == got.labels
    for label in ref.labels:
        diff = np.abs(ref.probabilities[label] - got.probabilities[label]).max()
        assert diff <= MAX_PROB_DIFF, (label, diff)
        assert _dice(ref.masks[label], got.masks[label]) >= MIN_DICE, label


def _segment(model, crop, **kw):
    return model.segment(crop, text=["liver", "spleen"], return_probabilities=True, progress=False, **kw)


# ---------------------------------------------------------------------------- building blocks
def test_layernorm32_keeps_the_input_dtype_without_autocast_and_float32_under_it():
    norm = LayerNorm32(16).to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    assert norm(x).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x).dtype == torch.float32
    wide = LayerNorm32(16)
    ref = torch.nn.functional.layer_norm(x.float(), (16,), wide.weight, wide.bias, wide.eps)
    assert torch.equal(wide(x.float()), ref)  # float32 in, float32 out: the plain LayerNorm


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_cast_model_encodes_and_decodes_like_float32_under_autocast(tiny_model, name):
    low = copy.deepcopy(tiny_model).to(DTYPES[name])
    assert low.weights_precision == name and low.precision == name
    x = torch.rand(1, 1, *tiny_model.config.spatial_size)
    tiny_model.set_precision(name)
    ref = tiny_model(x, text=["liver"])
    got = low(x, text=["liver"])
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    # the three calls one by one, boxes and points too
    emb = low.encode_image(x)
    text = low.encode_text(["liver", "spleen"])
    assert text.dtype == DTYPES[name]
    boxes = torch.tensor([[1.0, 4, 4, 6, 20, 24], [-1] * 6])
    points = (torch.tensor([[[3, 10, 12]], [[5, 20, 20]]]), torch.tensor([[1], [0]]))
    logits = low.decode(emb, text_embedding=text, boxes=boxes, points=points, upsample=False)
    assert logits.dtype == torch.float32 and bool(torch.isfinite(logits).all())


def test_image_encoder_alone_runs_in_the_weights_dtype_without_autocast(tiny_model):
    encoder = copy.deepcopy(tiny_model.image_encoder).to(torch.bfloat16)
    out = encoder(torch.rand(1, 1, *tiny_model.config.spatial_size))
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


# ---------------------------------------------------------------------------- public paths
@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_bf16_weights_segment_agrees_with_float32_weights_under_bf16(tiny_model, crop, mode):
    low = copy.deepcopy(tiny_model).to(torch.bfloat16)
    ref = _segment(tiny_model, crop, mode=mode, precision="bf16")
    got = _segment(low, crop, mode=mode)
    assert got.precision == "bf16"
    _assert_agree(ref, got)
    assert low.precision == "bf16" and next(low.parameters()).dtype == torch.bfloat16  # the model as it was


def test_fp16_weights_segment_agrees_with_float32_weights_under_fp16(tiny_model, crop):
    low = copy.deepcopy(tiny_model).half()
    ref = _segment(tiny_model, crop, precision="fp16")
    got = _segment(low, crop, precision="fp16")
    assert got.precision == "fp16"
    _assert_agree(ref, got)


def test_bf16_weights_session_agrees_with_float32_weights_under_bf16(tiny_model, crop):
    low = copy.deepcopy(tiny_model).to(torch.bfloat16)
    ref = tiny_model.session(crop, precision="bf16").segment(text="liver", return_probabilities=True)
    session = low.session(crop)
    got = session.segment(text="liver", return_probabilities=True)
    assert got.precision == "bf16"
    _assert_agree(ref, got)
    again = session.segment(text="liver", return_probabilities=True)  # from the session's window cache
    assert np.array_equal(again.masks["liver"], got.masks["liver"])


def test_lora_on_bf16_weights_agrees_with_float32_weights_under_bf16(tiny_model, crop):
    add_lora(tiny_model, "tuned")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B = 0 would make it the identity
        for name, p in tiny_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    low = copy.deepcopy(tiny_model).to(torch.bfloat16)
    _assert_agree(_segment(tiny_model, crop, precision="bf16"), _segment(low, crop))


def test_adapters_attached_after_the_cast_take_the_weights_dtype(tiny_model, crop):
    low = copy.deepcopy(tiny_model).to(torch.bfloat16)
    add_lora(low, "lora")
    add_bottleneck(low, "bottleneck")
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    for adapter in ("lora", "bottleneck"):
        res = _segment(low, crop, adapter=adapter)
        assert res.adapter == adapter and res.precision == "bf16"


# ---------------------------------------------------------------------------- what precision= means
@pytest.mark.parametrize("asked", ["fp32", "fp16"])
def test_another_precision_on_bf16_weights_is_refused_before_the_scan_is_read(tiny_model, tmp_path, asked):
    low = copy.deepcopy(tiny_model).to(torch.bfloat16)
    missing = tmp_path / "not_read.nii.gz"
    missing.write_bytes(b"")  # exists, so argument checks pass; reading it would fail differently
    with pytest.raises(InvalidArgumentError, match=r"model\.float\(\).*precision='bf16'"):
        low.segment(missing, text="liver", precision=asked, progress=False)
    with pytest.raises(InvalidArgumentError, match="stored in bf16"):
        low.session(missing, precision=asked)
    with pytest.raises(InvalidArgumentError, match="stored in bf16"):
        low.set_precision(asked)


def test_precision_of_cast_weights_does_not_overwrite_the_set_one(tiny_model, crop):
    tiny_model.set_precision("fp16")
    tiny_model.to(torch.bfloat16)
    assert tiny_model.precision == "bf16"
    with inference_state(tiny_model, "bf16"):
        assert tiny_model.precision == "bf16"
    tiny_model.set_precision("bf16")  # allowed: the weights' own precision
    tiny_model.float()
    assert tiny_model.precision == "fp16"  # what was set for float32 weights comes back


def test_resolve_precision_follows_cast_weights():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", "bf16", cpu, "exact", weights="bf16") == "bf16"
    assert resolve_precision(None, "fp16", cpu, "fast", weights="fp16") == "fp16"
    assert resolve_precision("bf16", "bf16", cpu, "fast", weights="bf16") == "bf16"
    assert resolve_precision("fp32", "bf16", cpu, "fast") == "fp32"  # float32 weights: anything goes
    with pytest.raises(InvalidArgumentError):
        resolve_precision("fp32", "bf16", cpu, "fast", weights="bf16")


def test_weights_of_mixed_dtypes_are_refused(tiny_model):
    tiny_model.image_encoder.to(torch.bfloat16)
    with pytest.raises(InvalidArgumentError, match="mix dtypes"):
        tiny_model.encode_image(torch.rand(1, 1, *tiny_model.config.spatial_size))


def test_saved_adapter_loads_before_the_cast_and_says_so_after_it(tiny_model, crop, tmp_path):
    add_lora(tiny_model, "saved")
    save_adapter(tiny_model, "saved", tmp_path / "saved")
    remove_adapter(tiny_model, "saved")
    low = copy.deepcopy(tiny_model).to(torch.bfloat16)
    with pytest.raises(AdapterMismatchError, match="cast to torch.bfloat16: load the adapter before casting"):
        load_adapter(low, tmp_path / "saved")
    load_adapter(tiny_model, tmp_path / "saved")
    tiny_model.to(torch.bfloat16)
    assert _segment(tiny_model, crop, adapter="saved").adapter == "saved"


def test_cast_keeps_the_fourier_frequencies_float32(tiny_model):
    pe = tiny_model.prompt_encoder.pe_layer
    exact = pe.positional_encoding_gaussian_matrix.clone()
    tiny_model.to(torch.bfloat16)
    assert torch.equal(pe.positional_encoding_gaussian_matrix, exact)  # not rounded to 8 bits
    tiny_model.double()
    assert pe.positional_encoding_gaussian_matrix.dtype == torch.float64
    tiny_model.float()
    assert torch.equal(pe.positional_encoding_gaussian_matrix, exact)
    assert tiny_model.state_dict()["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].dtype == torch.float32
