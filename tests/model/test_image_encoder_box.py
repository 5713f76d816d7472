"""ImageEncoder.encode_box (a box of the token grid only) against forward and a plain reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segevol_fast.errors import AdapterError, ShapeError
from segevol_fast.model.config import SegVolConfig
from segevol_fast.model.image_encoder import ImageEncoder
from segevol_fast.model.network import SegVolNetwork
from segevol_fast.ops.patch_embed.op import patchify
from tests.numerics import assert_matches_reference

CFG = SegVolConfig.tiny(spatial_size=(16, 64, 64))  # a (4, 4, 4) token grid: room for sub-boxes


def voxels(lo, hi, patch=CFG.patch_size):
    """The voxel slices of the token box [lo, hi)."""
    return (slice(None), slice(None)) + tuple(slice(a * p, b * p) for a, b, p in zip(lo, hi, patch))


def plain_box_encoding(enc: ImageEncoder, x: torch.Tensor, lo, hi) -> torch.Tensor:
    """The definition in plain torch: embed the whole window, keep the box's tokens, run pre-norm
    blocks of softmax attention over them, final norm; in x's dtype, (B, hidden, *box)."""
    sd = {k: v.to(x.dtype) for k, v in enc.state_dict().items()}
    tokens = F.linear(patchify(x, CFG.patch_size), sd["patch_embedding.patch_embeddings.1.weight"])
    tokens = tokens + sd["patch_embedding.patch_embeddings.1.bias"] + sd["patch_embedding.position_embeddings"]
    grid = tokens.reshape(x.shape[0], *CFG.grid_size, -1)[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    t = grid.reshape(x.shape[0], -1, grid.shape[-1])
    heads, (B, S, C) = CFG.num_heads, t.shape

    def norm(v, name):
        return F.layer_norm(v, (C,), sd[f"{name}.weight"], sd[f"{name}.bias"], CFG.layer_norm_eps)

    for i in range(CFG.num_layers):
        p = f"blocks.{i}."
        q, k, v = (norm(t, p + "norm1") @ sd[p + "attn.qkv.weight"].T).view(B, S, 3, heads, -1).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        t = t + F.linear(
            a.transpose(1, 2).reshape(B, S, C), sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"]
        )
        h = F.gelu(F.linear(norm(t, p + "norm2"), sd[p + "mlp.linear1.weight"], sd[p + "mlp.linear1.bias"]))
        t = t + F.linear(h, sd[p + "mlp.linear2.weight"], sd[p + "mlp.linear2.bias"])
    t = norm(t, "norm")
    return t.transpose(1, 2).reshape(B, C, *(b - a for a, b in zip(lo, hi)))


def test_whole_grid_box_equals_forward_bit_for_bit():
    model = SegVolNetwork(CFG).eval()
    x = torch.rand(2, 1, *CFG.spatial_size)
    with torch.no_grad():
        full = model.encode_image(x)
        box = model.encode_image_tokens(x, (0, 0, 0), CFG.grid_size)
    assert torch.equal(box, full)


@pytest.mark.parametrize("lo, hi", [((1, 1, 1), (3, 3, 3)), ((0, 1, 2), (4, 3, 4)), ((2, 0, 0), (3, 4, 1))])
def test_sub_box_matches_plain_reference(lo, hi):
    enc = ImageEncoder(CFG).eval()
    x = torch.rand(2, 1, *CFG.spatial_size)  # the box's surroundings are image too: they must not count
    with torch.no_grad():
        out = enc.encode_box(x[voxels(lo, hi)], lo, hi)
        ref32 = plain_box_encoding(enc, x, lo, hi)
        exact = plain_box_encoding(copy.deepcopy(enc).double(), x.double(), lo, hi)
    assert out.shape == (2, CFG.hidden_size, *(b - a for a, b in zip(lo, hi)))
    assert_matches_reference(out, ref32, exact, f"box {lo}..{hi}")


def test_one_box_per_item_matches_separate_calls():
    enc = ImageEncoder(CFG).eval()
    x = torch.rand(2, 1, *CFG.spatial_size)
    los, his = [(0, 1, 1), (2, 0, 2)], [(2, 3, 3), (4, 2, 4)]
    with torch.no_grad():
        both = enc.encode_box(
            torch.cat([x[i : i + 1][voxels(a, b)] for i, (a, b) in enumerate(zip(los, his))]), los, his
        )
        for i, (a, b) in enumerate(zip(los, his)):
            alone = enc.encode_box(x[i : i + 1][voxels(a, b)], a, b)
            assert (both[i : i + 1] - alone).abs().max() <= 1e-5 * alone.abs().max()


def test_gradient_checkpointing_recomputes_the_blocks():
    enc = ImageEncoder(CFG)
    calls = []
    enc.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))  # a recompute may stop early
    x = torch.rand(1, 1, 8, 32, 32)
    for checkpointing, runs in ((False, 1), (True, 2)):
        calls.clear()
        enc.gradient_checkpointing = checkpointing
        enc.encode_box(x, (1, 1, 1), (3, 3, 3)).sum().backward()
        assert len(calls) == runs


@pytest.mark.parametrize("seam", ["beside_patch_embed", "after_encoder"])
def test_encoder_level_adapter_refuses(seam):
    enc = ImageEncoder(CFG)
    assert enc.token_boxes_supported
    setattr(enc, seam, nn.Identity())
    assert not enc.token_boxes_supported
    with pytest.raises(AdapterError, match="whole window"):
        enc.encode_box(torch.rand(1, 1, 8, 32, 32), (1, 1, 1), (3, 3, 3))


@pytest.mark.parametrize(
    "shape, lo, hi",
    [
        ((1, 1, 8, 32, 32), (1, 1, 1), (3, 3, 4)),  # x is not the box's voxels
        ((1, 1, 8, 32, 32), (3, 3, 3), (5, 5, 5)),  # outside the grid
        ((1, 1, 0, 32, 32), (1, 1, 1), (1, 3, 3)),  # empty box
        ((2, 1, 8, 32, 32), [(0, 0, 0), (1, 1, 1)], [(2, 2, 2), (3, 3, 4)]),  # two sizes
        ((3, 1, 8, 32, 32), [(0, 0, 0), (1, 1, 1)], [(2, 2, 2), (3, 3, 3)]),  # 2 boxes for 3 items
    ],
)
def test_bad_boxes_raise(shape, lo, hi):
    with pytest.raises(ShapeError):
        ImageEncoder(CFG).encode_box(torch.rand(shape), lo, hi)


def test_summary_tokens_are_exact_for_padding_of_equal_positions():
    """Padding tokens with one position embedding per group are identical at every layer, so one
    summary token weighted by the group's size stands for them exactly: the box tokens come out as
    in the full pass, and the summaries as the padding tokens do (input shift: padding is not 0)."""
    enc = ImageEncoder(CFG).eval()
    lo, hi = (1, 1, 1), (3, 3, 3)
    inside = torch.zeros(CFG.grid_size, dtype=torch.bool)
    inside[1:3, 1:3, 1:3] = True
    groups = torch.stack(
        [~inside & (torch.arange(4)[:, None, None] == 0), ~inside & (torch.arange(4)[:, None, None] > 0)]
    )
    with torch.no_grad():  # position embeddings equal within each group
        pos = enc.patch_embedding.position_embeddings.view(*CFG.grid_size, -1)
        for g in groups:
            pos[g] = torch.randn(CFG.hidden_size) * 0.1
    x = torch.zeros(2, 1, *CFG.spatial_size)
    x[voxels(lo, hi)] = torch.rand(2, 1, 8, 32, 32)
    with torch.no_grad():
        box, summaries = enc.encode_box(
            x[voxels(lo, hi)], lo, hi, input_shift=0.1, padding_groups=groups.flatten(1)[None].float()
        )
        full32 = enc(x, input_shift=0.1)
        full64 = copy.deepcopy(enc).double()(x.double(), input_shift=0.1)
    sel = voxels(lo, hi, (1, 1, 1))
    assert_matches_reference(box, full32[sel], full64[sel], "box tokens")
    for k, g in enumerate(groups):
        pad32, pad64 = full32[:, :, g], full64[:, :, g]  # (B, hidden, n): all columns equal
        got = summaries[:, :, k : k + 1].expand_as(pad32)
        assert_matches_reference(got, pad32, pad64, f"summary of group {k}")


@pytest.mark.parametrize(
    "groups",
    [torch.ones(1, 2, 10), -torch.ones(1, 1, 64), torch.zeros(1, 1, 64), torch.ones(3, 1, 64)],
    ids=["not the grid", "negative", "empty", "wrong batch"],
)
def test_bad_padding_groups_raise(groups):
    with pytest.raises(ShapeError, match="padding_groups"):
        ImageEncoder(CFG).encode_box(torch.rand(2, 1, 8, 32, 32), (1, 1, 1), (3, 3, 3), padding_groups=groups)
