"""The cross-attentions' reordered products (model/cross_attention.py) against the official order:
the functions alone on random shapes and batch broadcasts, the whole decoder with reassociate=True
against its float64 loop reference (tests/numerics.py rule), the cost choice, and the official order
kept for projections the reorder cannot read (adapters' wrappers, hooks)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from segevol_fast.model import cross_attention
from segevol_fast.model.config import SegVolConfig
from segevol_fast.model.cross_attention import few_keys_attention, few_queries_attention, reassociation_pays
from segevol_fast.model.mask_decoder import MaskDecoder
from segevol_fast.model.two_way_transformer import Attention
from tests.model.test_mask_decoder import call_ref, inputs, randomise
from tests.numerics import assert_matches_reference

# a decoder where the reorder pays: 64 image tokens, internal dim 32 > 2 heads x 7 tokens
CFG = dataclasses.replace(SegVolConfig.tiny(), spatial_size=(16, 32, 32), hidden_size=64)


def _attention(embed=48, heads=4, rate=2) -> Attention:
    return randomise(Attention(embed, heads, rate)).eval()


@pytest.mark.parametrize("batches", [(1, 1, 1), (3, 1, 1), (1, 3, 3), (3, 3, 3)])
@pytest.mark.parametrize("few", [few_queries_attention, few_keys_attention])
def test_reordered_attention_equals_the_official_order(few, batches):
    attn = _attention()
    small, big = int(torch.randint(1, 9, ())), int(torch.randint(20, 90, ()))
    sq, sk = (small, big) if few is few_queries_attention else (big, small)
    bq, bk, bv = batches
    q, k, v = torch.randn(bq, sq, 48), torch.randn(bk, sk, 48), torch.randn(bv, sk, 48)
    with torch.no_grad():
        out = few(attn, q, k, v)
        same = attn(q, k, v)
        exact = copy.deepcopy(attn).double()(q.double(), k.double(), v.double())
    assert out.shape == same.shape == (max(batches), sq, 48)
    assert_matches_reference(out, same, exact, few.__name__)


def test_the_cheaper_order_is_chosen_by_shape():
    attn = _attention(embed=768, heads=8, rate=2)  # the official decoder's cross-attention
    prompt, image = torch.randn(1, 7, 768), torch.randn(1, 2048, 768)
    assert reassociation_pays(attn, prompt, image, image) == "queries"
    assert reassociation_pays(attn, image, prompt, prompt) == "keys"
    # 30 prompts against one shared image: projecting the image once is cheaper
    assert reassociation_pays(attn, torch.randn(30, 7, 768), image, image) is None
    # many prompt tokens (a long click history): no gain either
    assert reassociation_pays(attn, torch.randn(1, 200, 768), image, image) is None


def test_wrapped_or_hooked_projections_keep_the_official_order():
    attn = _attention(embed=768, heads=8, rate=2)
    prompt, image = torch.randn(1, 7, 768), torch.randn(1, 2048, 768)
    hooked = copy.deepcopy(attn)
    hooked.k_proj.register_forward_hook(lambda m, i, o: 2 * o)
    assert reassociation_pays(hooked, prompt, image, image) is None
    with torch.no_grad():  # what the official order computes through the hook
        torch.testing.assert_close(hooked(prompt, image, image, reassociate=True), hooked(prompt, image, image))

    class Wrapped(nn.Linear):  # what an adapter's LoRA wrapper looks like to the reorder
        pass

    wrapped = copy.deepcopy(attn)
    wrapped.v_proj = Wrapped(768, 384)
    assert reassociation_pays(wrapped, prompt, image, image) is None


@pytest.mark.parametrize("image_batch", [1, 3])
@pytest.mark.parametrize("text", [True, False])
def test_decoder_with_reordered_products_matches_the_loop_reference(monkeypatch, image_batch, text):
    dec = randomise(MaskDecoder(CFG)).eval()
    x = inputs(B=3, T=2, image_batch=image_batch, text=text, cfg=CFG)
    used = []
    for name in ("few_queries_attention", "few_keys_attention"):
        real = getattr(cross_attention, name)
        monkeypatch.setattr(
            "segevol_fast.model.two_way_transformer." + name, lambda *a, _r=real, _n=name: used.append(_n) or _r(*a)
        )
    with torch.no_grad():
        out = dec(**x, reassociate=True)
        same = dec(**x)
        dec64 = copy.deepcopy(dec).double()
        exact, _ = call_ref(dec64, {k: None if v is None else v.double() for k, v in x.items()})
    assert set(used) == {"few_queries_attention", "few_keys_attention"}  # the reorder really ran
    assert_matches_reference(out, same, exact[:, :1], "decoder, reordered")


def test_decoder_with_reordered_products_under_bf16_autocast():
    """precision="bf16" on a CPU (autocast): the reorder's products run in bf16 like the official
    order's, its softmax in float32."""
    dec = randomise(MaskDecoder(CFG)).eval()
    x = inputs(B=2, T=2, cfg=CFG)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = dec(**x, reassociate=True).float()
            same = dec(**x).float()
        exact, _ = call_ref(copy.deepcopy(dec).double(), {k: None if v is None else v.double() for k, v in x.items()})
    err, ref_err = (out.double() - exact[:, :1]).abs().max(), (same.double() - exact[:, :1]).abs().max()
    assert err <= 2 * ref_err + 1e-2 * exact.abs().max(), (err, ref_err)
