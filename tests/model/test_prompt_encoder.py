"""PromptEncoder against hand-written formulas (docs/official-pipeline.md §2, quirks §11.4–11.5, §11.7).

Expected values are computed here from scratch (explicit loops over coordinates, a fresh Gaussian
matrix copied into the module), never by calling the module's own helpers.
"""

from __future__ import annotations

import math

import pytest
import torch

from segevol_fast.errors import ShapeError
from segevol_fast.model.config import SegVolConfig
from segevol_fast.model.prompt_encoder import PromptEncoder
from tests.model.official_keys import _prompt_encoder as official_prompt_encoder_keys


def make(config=None):
    """A PromptEncoder with a fresh Gaussian matrix and non-trivial embeddings; returns (pe, G)."""
    enc = PromptEncoder(config or SegVolConfig.tiny())
    G = torch.randn(3, enc.hidden_size // 2)
    with torch.no_grad():
        enc.pe_layer.positional_encoding_gaussian_matrix.copy_(G)
    return enc, G


def fourier(v, G):
    """One 3-vector v (already normalised) -> [sin, cos] of 2π·(2v−1)·G, written as a loop."""
    feats = []
    for f in range(G.shape[1]):
        feats.append(2 * math.pi * sum((2 * float(v[a]) - 1) * float(G[a, f]) for a in range(3)))
    t = torch.tensor(feats, dtype=torch.float64)
    return torch.cat([t.sin(), t.cos()]).float()


def point_pe(coord, G, divisors):
    """Voxel index (d, h, w) -> PE with the +0.5 shift and the given per-axis divisors."""
    return fourier([(float(coord[a]) + 0.5) / divisors[a] for a in range(3)], G)


def emb(module):
    return module.weight.detach()[0]


def test_fourier_pe_is_sin_then_cos_of_2pi_2cminus1_times_gaussian():
    enc, G = make()
    v = torch.rand(5, 3)
    got = enc.pe_layer.encode(v)
    want = torch.stack([fourier(row, G) for row in v])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_point_coordinate_divisors_are_256_32_256():
    enc, G = make(SegVolConfig())  # the official 32×256×256 frame
    coords = torch.tensor([[[3.0, 100.0, 17.0], [31.0, 255.0, 0.0]]])
    labels = torch.tensor([[1, 1]])
    sparse, _ = enc(points=(coords, labels), boxes=torch.tensor([[0.0, 0, 0, 1, 1, 1]]))
    for p in range(2):
        want = point_pe(coords[0, p], G, (256.0, 32.0, 256.0)) + emb(enc.point_embeddings[1])
        # Phases reach hundreds of radians here (h/32 up to 8), so float32 sin/cos err ~1e-5.
        torch.testing.assert_close(sparse[0, p], want, atol=2e-4, rtol=0)
    # Sanity: the "natural" (32, 256, 256) divisors give a different answer, so the test can fail.
    natural = point_pe(coords[0, 0], G, (32.0, 256.0, 256.0)) + emb(enc.point_embeddings[1])
    assert not torch.allclose(sparse[0, 0], natural, atol=1e-3)


def test_point_coordinate_divisors_follow_spatial_1_0_2_at_tiny():
    enc, G = make()
    d, h, w = SegVolConfig.tiny().spatial_size
    coords = torch.tensor([[[5.0, 7.0, 30.0]]])
    sparse, _ = enc(points=(coords, torch.tensor([[0]])), boxes=torch.zeros(1, 6))
    want = point_pe(coords[0, 0], G, (h, d, w)) + emb(enc.point_embeddings[0])
    torch.testing.assert_close(sparse[0, 0], want, atol=2e-5, rtol=1e-5)
    assert d != h  # otherwise the quirk would be invisible


def test_dense_pe_axis_order_is_dim1_dim0_dim2():
    cfg = SegVolConfig.tiny(spatial_size=(12, 32, 48))  # grid (3, 2, 3): all axes distinguishable
    enc, G = make(cfg)
    gd, gh, gw = cfg.grid_size
    got = enc.get_dense_pe()
    assert got.shape == (1, cfg.hidden_size, gd, gh, gw)
    for i in range(gd):
        for j in range(gh):
            for k in range(gw):
                want = fourier([(j + 0.5) / gh, (i + 0.5) / gd, (k + 0.5) / gw], G)
                torch.testing.assert_close(got[0, :, i, j, k], want, atol=2e-5, rtol=1e-5)
    # The unswapped order would differ.
    assert not torch.allclose(got[0, :, 0, 1, 0], fourier([0.5 / gd, 1.5 / gh, 0.5 / gw], G), atol=1e-3)


def test_dense_pe_full_config_shape():
    enc, _ = make(SegVolConfig())
    assert enc.get_dense_pe().shape == (1, 768, 8, 16, 16)


def test_point_labels_minus1_zero_one():
    enc, G = make()
    coords = torch.randint(0, 8, (2, 3, 3)).float()
    labels = torch.tensor([[1, 0, -1], [-1, 1, 0]])
    sparse, _ = enc(points=(coords, labels), boxes=torch.zeros(2, 6))
    d, h, w = SegVolConfig.tiny().spatial_size
    for b in range(2):
        for p in range(3):
            lab = int(labels[b, p])
            if lab == -1:
                want = emb(enc.not_a_point_embed)  # PE zeroed, not_a_point added
            else:
                want = point_pe(coords[b, p], G, (h, d, w)) + emb(enc.point_embeddings[lab])
            torch.testing.assert_close(sparse[b, p], want, atol=2e-5, rtol=1e-5)


def test_padding_point_appended_without_box():
    enc, _ = make()
    coords, labels = torch.rand(3, 2, 3) * 8, torch.ones(3, 2, dtype=torch.long)
    alone, _ = enc(points=(coords, labels))
    assert alone.shape == (3, 3, enc.hidden_size)  # 2 points + 1 padding point
    torch.testing.assert_close(alone[:, 2], emb(enc.not_a_point_embed).expand(3, -1))
    with_box, _ = enc(points=(coords, labels), boxes=torch.zeros(3, 6))
    assert with_box.shape == (3, 4, enc.hidden_size)  # 2 points + 2 corners, no padding
    torch.testing.assert_close(with_box[:, :2], alone[:, :2])


def test_box_corners_use_point_embeddings_2_and_3():
    enc, G = make()
    d, h, w = SegVolConfig.tiny().spatial_size
    box = torch.tensor([[1.0, 2.0, 3.0, 6.0, 20.0, 30.0]])
    sparse, _ = enc(boxes=box)
    assert sparse.shape == (1, 2, enc.hidden_size)
    torch.testing.assert_close(
        sparse[0, 0], point_pe(box[0, :3], G, (h, d, w)) + emb(enc.point_embeddings[2]), atol=2e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        sparse[0, 1], point_pe(box[0, 3:], G, (h, d, w)) + emb(enc.point_embeddings[3]), atol=2e-5, rtol=1e-5
    )
    sparse3, _ = enc(boxes=box[:, None, :])  # the official (B, 1, 6) form
    torch.testing.assert_close(sparse3, sparse)


def test_empty_box_is_still_encoded():
    enc, G = make()
    d, h, w = SegVolConfig.tiny().spatial_size
    sparse, _ = enc(boxes=-torch.ones(1, 6))
    assert sparse.shape == (1, 2, enc.hidden_size)
    corner = torch.full((3,), -1.0)  # encoded at -0.5 after the shift, not skipped or zeroed
    torch.testing.assert_close(
        sparse[0, 0], point_pe(corner, G, (h, d, w)) + emb(enc.point_embeddings[2]), atol=2e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        sparse[0, 1], point_pe(corner, G, (h, d, w)) + emb(enc.point_embeddings[3]), atol=2e-5, rtol=1e-5
    )


def test_sparse_token_order_points_box_text():
    enc, _ = make()
    coords, labels = torch.rand(2, 3, 3) * 8, torch.tensor([[1, 0, 1], [1, 1, 0]])
    box, text = torch.rand(2, 6) * 8, torch.randn(2, enc.hidden_size)
    sparse, _ = enc(points=(coords, labels), boxes=box, text_embedding=text)
    assert sparse.shape == (2, 3 + 2 + 1, enc.hidden_size)
    pts, _ = enc(points=(coords, labels), boxes=box)
    bx, _ = enc(boxes=box)
    torch.testing.assert_close(sparse[:, :3], pts[:, :3])
    torch.testing.assert_close(sparse[:, 3:5], bx)
    assert torch.equal(sparse[:, 5], text)  # text appended as-is, nothing added


def test_text_used_as_token_unchanged():
    enc, _ = make()
    text = torch.randn(4, enc.hidden_size)
    sparse, dense = enc(text_embedding=text)
    assert sparse.shape == (4, 1, enc.hidden_size) and torch.equal(sparse[:, 0], text)
    assert dense.shape[0] == 4


def test_dense_embedding_is_no_mask_embed_broadcast():
    cfg = SegVolConfig.tiny()
    enc, _ = make(cfg)
    _, dense = enc(boxes=torch.zeros(3, 6))
    assert dense.shape == (3, cfg.hidden_size, *cfg.grid_size)
    want = emb(enc.no_mask_embed)[None, :, None, None, None].expand_as(dense)
    assert torch.equal(dense, want)


def test_batch_size_from_points_boxes_text_else_one():
    enc, _ = make()
    h = enc.hidden_size
    assert enc(points=(torch.zeros(5, 1, 3), torch.ones(5, 1, dtype=torch.long)))[1].shape[0] == 5
    assert enc(boxes=torch.zeros(4, 6))[1].shape[0] == 4
    assert enc(text_embedding=torch.zeros(2, h))[1].shape[0] == 2
    sparse, dense = enc()
    assert sparse.shape == (1, 0, h) and dense.shape[0] == 1


def test_mask_downscaling_is_unused():
    enc, _ = make()
    sparse, dense = enc(
        points=(torch.rand(2, 2, 3) * 8, torch.ones(2, 2, dtype=torch.long)),
        boxes=torch.rand(2, 6),
        text_embedding=torch.randn(2, enc.hidden_size),
    )
    (sparse.sum() + dense.sum()).backward()
    assert all(p.grad is None for p in enc.mask_downscaling.parameters())
    assert enc.point_embeddings[1].weight.grad is not None and enc.no_mask_embed.weight.grad is not None


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(points=(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))),  # coords not (B, P, 3)
        dict(points=(torch.zeros(2, 3, 3), torch.zeros(2, 2, dtype=torch.long))),  # labels mismatch
        dict(points=(torch.zeros(2, 3, 3), torch.zeros(2, 3))),  # float labels
        dict(boxes=torch.zeros(2, 4)),
        dict(text_embedding=torch.zeros(2, 7)),
        dict(boxes=torch.zeros(2, 6), text_embedding=torch.zeros(3, 32)),  # batch sizes differ
    ],
)
def test_bad_shapes_raise_shape_error(kwargs):
    enc, _ = make()
    with pytest.raises(ShapeError):
        enc(**kwargs)


def test_state_dict_keys_match_official():
    with torch.device("meta"):
        enc = PromptEncoder(SegVolConfig())
    prefix = "prompt_encoder."
    want = {k[len(prefix) :]: tuple(s) for k, s in official_prompt_encoder_keys()}
    got = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert got == want
