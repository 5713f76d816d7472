"""MaskDecoder / TwoWayTransformer against a plain loop re-implementation of the official algorithm
(docs/official-pipeline.md §3, quirks §11.6–11.8). The reference below is written from the reference notes, using
only the module's parameters: explicit softmax attention, per-prompt image copies, all four masks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segevol_fast.errors import ShapeError
from segevol_fast.model.config import SegVolConfig
from segevol_fast.model.mask_decoder import MaskDecoder, upsample_logits
from segevol_fast.model.prompt_encoder import PromptEncoder
from tests.model.official_keys import _mask_decoder as official_mask_decoder_keys

CFG = SegVolConfig.tiny()


# ---------------------------------------------------------------------- reference implementation
def lin(m, x):
    return x @ m.weight.T + m.bias


def ref_attn(m, q, k, v, heads):
    q, k, v = lin(m.q_proj, q), lin(m.k_proj, k), lin(m.v_proj, v)
    B, Sq, C = q.shape
    hd = C // heads
    out = torch.zeros(B, Sq, C, dtype=q.dtype)
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd), dim=-1)
        out[..., sl] = w @ v[..., sl]
    return lin(m.out_proj, out)


def ln(m, x):
    return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)


def ref_mlp(m, x):
    for i, layer in enumerate(m.layers):
        x = lin(layer, x)
        if i < len(m.layers) - 1:
            x = torch.relu(x)
    return x


def ref_decoder(dec, image, pe, sparse, dense, text, heads=CFG.decoder_num_heads):
    """Official predict_masks, step by step: returns all masks (B, 4, ...) and iou (B, 4)."""
    B = sparse.shape[0]
    tokens = torch.cat([torch.cat([dec.iou_token.weight, dec.mask_tokens.weight])[None].repeat(B, 1, 1), sparse], 1)
    if image.shape[0] != B:
        image = image.repeat_interleave(B, dim=0)
    src = image + dense
    _, c, d, h, w = src.shape
    keys = src.flatten(2).transpose(1, 2)
    kpe = pe.repeat_interleave(B, dim=0).flatten(2).transpose(1, 2)
    queries = tokens
    for i, L in enumerate(dec.transformer.layers):
        if i == 0:
            queries = ref_attn(L.self_attn, queries, queries, queries, heads)
        else:
            queries = queries + ref_attn(L.self_attn, queries + tokens, queries + tokens, queries, heads)
        queries = ln(L.norm1, queries)
        queries = ln(
            L.norm2, queries + ref_attn(L.cross_attn_token_to_image, queries + tokens, keys + kpe, keys, heads)
        )
        queries = ln(L.norm3, queries + lin(L.mlp.lin2, torch.relu(lin(L.mlp.lin1, queries))))
        keys = ln(L.norm4, keys + ref_attn(L.cross_attn_image_to_token, keys + kpe, queries + tokens, queries, heads))
    T = dec.transformer
    queries = ln(
        T.norm_final_attn, queries + ref_attn(T.final_attn_token_to_image, queries + tokens, keys + kpe, keys, heads)
    )
    up0, norm, up1 = dec.output_upscaling[0], dec.output_upscaling[1], dec.output_upscaling[3]
    x = F.conv_transpose3d(keys.transpose(1, 2).reshape(B, c, d, h, w), up0.weight, up0.bias, stride=2)
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)  # over the whole sample, not per voxel
    var = x.var(dim=(1, 2, 3, 4), unbiased=False, keepdim=True)
    x = F.gelu((x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias)
    up = F.gelu(F.conv_transpose3d(x, up1.weight, up1.bias, stride=2))
    hyper = torch.stack([ref_mlp(dec.output_hypernetworks_mlps[i], queries[:, 1 + i]) for i in range(4)], 1)
    b, cc, D, H, W = up.shape
    masks = (hyper @ up.reshape(b, cc, -1)).reshape(b, 4, D, H, W)
    if text is not None:
        sim = (lin(dec.txt_align_upscaled_embedding, text)[:, None] @ up.reshape(b, cc, -1)).reshape(b, 1, D, H, W)
        masks = masks + sim.repeat(1, 4, 1, 1, 1)
    return masks, ref_mlp(dec.iou_prediction_head, queries[:, 0])


# ---------------------------------------------------------------------- helpers
def randomise(module):
    """Non-trivial LayerNorm affines and embeddings, so every parameter matters."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


def inputs(B=3, T=4, image_batch=1, text=True, cfg=CFG):
    hid, grid = cfg.hidden_size, cfg.grid_size
    return dict(
        image_embedding=torch.randn(image_batch, hid, *grid),
        image_pe=torch.randn(1, hid, *grid),
        sparse=torch.randn(B, T, hid),
        dense=torch.randn(1, hid, 1, 1, 1).expand(B, hid, *grid),
        text_embedding=torch.randn(B, hid) if text else None,
    )


def call_ref(dec, x):
    return ref_decoder(dec, x["image_embedding"], x["image_pe"], x["sparse"], x["dense"], x["text_embedding"])


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("text", [True, False])
@pytest.mark.parametrize("image_batch", [1, 3])
def test_matches_loop_reference(text, image_batch):
    dec = randomise(MaskDecoder(CFG))
    x = inputs(image_batch=image_batch, text=text)
    logits = dec(**x)
    assert logits.shape == (3, 1, *CFG.low_res_size)
    with torch.no_grad():
        masks, _ = call_ref(dec, x)
    close(logits.detach(), masks[:, :1])


def test_mask_token_zero_selected():
    dec = randomise(MaskDecoder(CFG))
    x = inputs()
    with torch.no_grad():
        out = dec(**x)
        masks, _ = call_ref(dec, x)
        close(out, masks[:, :1])
        assert not torch.allclose(out, masks[:, 1:2], atol=1e-3)
        for i in (1, 2, 3):  # the other hypernetworks cannot influence the output
            for p in dec.output_hypernetworks_mlps[i].parameters():
                p.add_(torch.randn_like(p))
        assert torch.equal(dec(**x), out)
        dec.output_hypernetworks_mlps[0].layers[2].bias.add_(1.0)
        assert not torch.allclose(dec(**x), out, atol=1e-3)


def test_iou_head_only_on_request():
    dec = randomise(MaskDecoder(CFG))
    x = inputs()
    seen = []
    dec.iou_prediction_head.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        dec(**x)
        assert not seen
        logits, iou = dec(**x, return_iou=True)
        _, ref_iou = call_ref(dec, x)
    assert iou.shape == (3, 1)
    close(iou, ref_iou[:, :1])


def test_first_decoder_self_attention_has_no_residual():
    dec = randomise(MaskDecoder(CFG))
    x = inputs()
    rec = {}
    for i, layer in enumerate(dec.transformer.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: rec.__setitem__(("in", i), a[0]))
        layer.self_attn.register_forward_hook(lambda m, a, o, i=i: rec.__setitem__(("sa", i), (a, o)))
        layer.norm1.register_forward_hook(lambda m, a, o, i=i: rec.__setitem__(("n1", i), a[0]))
    with torch.no_grad():
        dec(**x)
    (q0, k0, v0), out0 = rec[("sa", 0)]
    tokens = rec[("in", 0)]
    # Layer 0: q = k = v = the tokens (no PE added) and the attention output replaces them.
    assert torch.equal(q0, tokens) and torch.equal(k0, tokens) and torch.equal(v0, tokens)
    assert torch.equal(rec[("n1", 0)], out0)
    # Layer 1 for contrast: PE added to q/k, and the residual is kept.
    (q1, k1, v1), out1 = rec[("sa", 1)]
    close(q1, rec[("in", 1)] + tokens)
    close(rec[("n1", 1)], rec[("in", 1)] + out1)


def test_cross_attention_internal_dim_is_downsampled():
    dec = MaskDecoder(CFG)
    hid, rate = CFG.hidden_size, CFG.attention_downsample_rate
    layer = dec.transformer.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (hid, hid)
    for m in (
        layer.cross_attn_token_to_image,
        layer.cross_attn_image_to_token,
        dec.transformer.final_attn_token_to_image,
    ):
        assert m.q_proj.weight.shape == (hid // rate, hid) and m.out_proj.weight.shape == (hid, hid // rate)


def test_upscaling_layernorm_is_full_shape():
    dec = randomise(MaskDecoder(CFG))
    dec.fused_upscale = False  # inspect the literal module path (the fused one is tested against it)
    norm = dec.output_upscaling[1]
    full = (CFG.hidden_size // 4, *(2 * g for g in CFG.grid_size))
    assert isinstance(norm, torch.nn.LayerNorm) and tuple(norm.normalized_shape) == full
    assert norm.weight.shape == full
    rec = {}
    norm.register_forward_hook(lambda m, a, o: rec.update(x=a[0], y=o))
    with torch.no_grad():
        dec(**inputs(B=2))
    x, y = rec["x"], rec["y"]
    flat = x.flatten(1)
    want = (
        (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + norm.eps)
    ).view_as(x)
    close(y, want * norm.weight + norm.bias)
    per_voxel = F.layer_norm(x.movedim(1, -1), (full[0],)).movedim(-1, 1)  # channel-wise: must differ
    assert not torch.allclose(y, per_voxel * norm.weight + norm.bias, atol=1e-3)


def test_text_used_as_token_and_additive_map():
    enc, dec = randomise(PromptEncoder(CFG)), randomise(MaskDecoder(CFG))
    dec.fused_upscale = False  # hooks see the module path; test_fused_upscale_* ties the two together
    text = torch.randn(2, CFG.hidden_size)
    box = torch.tensor([[1.0, 2, 3, 5, 20, 25], [0.0, 0, 0, 7, 31, 31]])
    sparse, dense = enc(boxes=box, text_embedding=text)
    assert torch.equal(sparse[:, -1], text)  # use 1: the last sparse token
    image, pe = torch.randn(1, CFG.hidden_size, *CFG.grid_size), enc.get_dense_pe()
    rec = {}
    dec.output_upscaling.register_forward_hook(lambda m, a, o: rec.update(features=o))
    with torch.no_grad():
        with_text = dec(image, pe, sparse, dense, text)
        without = dec(image, pe, sparse, dense, None)
    # Use 2: the same tokens, so the only difference is txt_align(text) · upscaled features.
    sim = torch.einsum("bc,bcdhw->bdhw", dec.txt_align_upscaled_embedding(text), rec["features"]).unsqueeze(1)
    close(with_text - without, sim.detach())
    assert sim.abs().max() > 1e-3


def test_batched_n_prompts_equal_n_single_calls():
    enc, dec = randomise(PromptEncoder(CFG)), randomise(MaskDecoder(CFG))
    N = 4
    coords, labels = torch.rand(N, 2, 3) * 8, torch.randint(0, 2, (N, 2))
    box, text = torch.rand(N, 6) * 8, torch.randn(N, CFG.hidden_size)
    image, pe = torch.randn(1, CFG.hidden_size, *CFG.grid_size), enc.get_dense_pe()
    with torch.no_grad():
        sparse, dense = enc(points=(coords, labels), boxes=box, text_embedding=text)
        batched = dec(image, pe, sparse, dense, text)
        for n in range(N):
            s1, d1 = enc(
                points=(coords[n : n + 1], labels[n : n + 1]), boxes=box[n : n + 1], text_embedding=text[n : n + 1]
            )
            close(batched[n : n + 1], dec(image, pe, s1, d1, text[n : n + 1]))
        # A materialised (copied) image / dense batch gives the same answer as the broadcast one.
        close(batched, dec(image.repeat(N, 1, 1, 1, 1), pe, sparse, dense.contiguous(), text))


def test_backward_reaches_prompts_image_and_weights():
    enc, dec = randomise(PromptEncoder(CFG)), randomise(MaskDecoder(CFG))
    image = torch.randn(1, CFG.hidden_size, *CFG.grid_size, requires_grad=True)
    text = torch.randn(2, CFG.hidden_size, requires_grad=True)
    sparse, dense = enc(points=(torch.rand(2, 3, 3) * 8, torch.ones(2, 3, dtype=torch.long)), text_embedding=text)
    logits = dec(image, enc.get_dense_pe(), sparse, dense, text)
    logits.square().mean().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert text.grad is not None and text.grad.abs().sum() > 0
    for name in (
        "transformer.layers.0.self_attn.q_proj.weight",
        "output_upscaling.1.weight",
        "output_hypernetworks_mlps.0.layers.0.weight",
        "txt_align_upscaled_embedding.weight",
    ):
        assert dec.get_parameter(name).grad is not None, name
    assert enc.point_embeddings[1].weight.grad is not None and enc.no_mask_embed.weight.grad is not None
    assert enc.pe_layer.positional_encoding_gaussian_matrix.grad is None  # a buffer, not trained


def test_full_config_shapes():
    cfg = SegVolConfig()
    dec = MaskDecoder(cfg)
    with torch.no_grad():
        out = dec(**inputs(B=2, T=3, cfg=cfg))
    assert out.shape == (2, 1, 32, 64, 64)
    assert upsample_logits(out, cfg.spatial_size).shape == (2, 1, 32, 256, 256)


def test_upsample_logits_is_trilinear_align_corners_false():
    def interp_matrix(n_in, n_out):
        # align_corners=False: source = (dst + 0.5) * n_in / n_out - 0.5, clamped at 0.
        m = torch.zeros(n_out, n_in, dtype=torch.float64)
        for o in range(n_out):
            s = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(math.floor(s)), n_in - 1)
            i1, frac = min(i0 + 1, n_in - 1), s - math.floor(s)
            m[o, i0] += 1 - frac
            m[o, i1] += frac
        return m

    low = torch.randn(2, 1, 3, 4, 5, dtype=torch.float64)
    size = (3, 16, 10)
    got = upsample_logits(low, size)
    Md, Mh, Mw = (interp_matrix(a, b) for a, b in zip(low.shape[2:], size))
    want = torch.einsum("ad,bh,cw,nkdhw->nkabc", Md, Mh, Mw, low)
    torch.testing.assert_close(got, want)


def test_bad_shapes_raise_shape_error():
    dec = MaskDecoder(CFG)
    good = inputs(B=2)
    bad = [
        dict(sparse=torch.randn(2, 3, CFG.hidden_size + 1)),
        dict(image_embedding=torch.randn(3, CFG.hidden_size, *CFG.grid_size)),  # batch neither 1 nor B
        dict(image_embedding=torch.randn(1, CFG.hidden_size, 2, 2, 3)),  # wrong grid
        dict(image_pe=torch.randn(2, CFG.hidden_size, *CFG.grid_size)),
        dict(text_embedding=torch.randn(3, CFG.hidden_size)),
    ]
    for override in bad:
        with pytest.raises(ShapeError):
            dec(**{**good, **override})
    with pytest.raises(ShapeError):
        upsample_logits(torch.randn(2, 4, 4), (8, 8, 8))


def test_state_dict_keys_match_official():
    with torch.device("meta"):
        dec = MaskDecoder(SegVolConfig())
    prefix = "mask_decoder."
    want = {k[len(prefix) :]: tuple(s) for k, s in official_mask_decoder_keys()}
    got = {k: tuple(v.shape) for k, v in dec.state_dict().items()}
    assert got == want
    assert sum(v.numel() for v in dec.state_dict().values()) == 29_923_716


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grid", [(2, 2, 2), (1, 3, 2)])
def test_fused_upscale_equals_official_module_path(dtype, grid):
    cfg = SegVolConfig.tiny(spatial_size=(4 * grid[0], 16 * grid[1], 16 * grid[2]))
    enc, dec = randomise(PromptEncoder(cfg)).to(dtype), randomise(MaskDecoder(cfg)).to(dtype)
    text = torch.randn(3, cfg.hidden_size, dtype=dtype)
    sparse, dense = enc(boxes=torch.rand(3, 6, dtype=dtype) * 4, text_embedding=text)
    image = torch.randn(1, cfg.hidden_size, *cfg.grid_size, dtype=dtype)
    pe = enc.get_dense_pe()
    with torch.no_grad():
        fused = dec(image, pe, sparse, dense, text)
        dec.fused_upscale = False
        modules = dec(image, pe, sparse, dense, text)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(fused, modules, rtol=tol, atol=tol)
