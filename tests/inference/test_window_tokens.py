"""Encoding only a window's image tokens (inference/window_tokens.py): the token box arithmetic,
the reader, the fills, and the encodings against the full-window pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segevol_fast.crop import StoredCrop
from segevol_fast.errors import InvalidArgumentError, ShapeError
from segevol_fast.geometry.sliding_window import global_grid, iter_windows
from segevol_fast.inference.window_tokens import (
    FILLS,
    encode_window_tokens,
    encoded_tokens,
    fill_grid,
    fill_summaries,
    padding_groups,
    read_boxes,
    token_box,
)
from segevol_fast.model.config import SegVolConfig
from segevol_fast.model.network import SegVolNetwork

OFFICIAL = ((32, 256, 256), (4, 16, 16))  # window, patch
CFG = SegVolConfig.tiny(spatial_size=(16, 64, 64))  # a (4, 4, 4) token grid


def grid_origins(shape, window=CFG.spatial_size):
    g = global_grid(shape, window)
    return [(d, h, w) for d in g[0] for h in g[1] for w in g[2]]


@pytest.mark.parametrize(
    "crop, origin, margin, box",
    [
        # the shared CT's crop: one window, padded on every axis (MONAI: pad // 2 before)
        ((30, 96, 121), (-1, -80, -67), 0, ((0, 5, 4), (8, 11, 12))),
        ((30, 96, 121), (-1, -80, -67), 1, ((0, 4, 3), (8, 12, 13))),
        # a 164x126x120 crop: D is tiled, H and W padded; 512 of 2048 tokens
        ((164, 126, 120), (64, -65, -68), 0, ((0, 4, 4), (8, 12, 12))),
        ((164, 126, 120), (64, -65, -68), 5, ((0, 0, 0), (8, 16, 16))),  # clamped to the grid
        ((300, 300, 300), (10, 0, 44), 0, ((0, 0, 0), (8, 16, 16))),  # inside the crop: the whole grid
        ((40, 300, 300), (8, 0, 0), 0, ((0, 0, 0), (8, 16, 16))),  # ends at the crop's edge
        ((10, 300, 300), (-3, 0, 0), 0, ((0, 0, 0), (4, 16, 16))),  # image in voxels 3..12: patches 0..3
        ((10, 300, 300), (-4, 0, 0), 0, ((1, 0, 0), (4, 16, 16))),  # 4..13: patch 0 is all padding
    ],
)
def test_token_box_by_hand(crop, origin, margin, box):
    assert token_box(crop, origin, *OFFICIAL, margin) == box
    assert encoded_tokens(crop, origin, *OFFICIAL, margin) == torch.tensor(box[1]).sub(torch.tensor(box[0])).prod()


def test_token_box_of_a_164x126x120_crop_is_a_quarter_of_the_window():
    origins = grid_origins((164, 126, 120), OFFICIAL[0])
    assert {encoded_tokens((164, 126, 120), o, *OFFICIAL) for o in origins} == {512}
    # box (0, 4, 4)..(8, 12, 12): every 2x4x4 cell but the 4 x 2 x 2 inside it holds padding; one for all
    assert encoded_tokens((164, 126, 120), origins[0], *OFFICIAL, fill="summary") == 512 + 64 - 16
    assert encoded_tokens((164, 126, 120), origins[0], *OFFICIAL, fill="summary1") == 513
    assert encoded_tokens((164, 126, 120), origins[0], *OFFICIAL, fill="edge") == 512


@pytest.mark.parametrize(
    "origin, window, margin, error",
    [
        ((0, 0, 40), (32, 256, 256), 0, ShapeError),  # misses the crop (W 30)
        ((0, -300, 0), (32, 256, 256), 0, ShapeError),
        ((0, 0, 0), (30, 256, 256), 0, ShapeError),  # not whole patches
        ((0, 0, 0), (32, 256, 256), -1, InvalidArgumentError),
    ],
)
def test_token_box_refuses(origin, window, margin, error):
    with pytest.raises(error):
        token_box((30, 30, 30), origin, window, (4, 16, 16), margin)


def test_read_boxes_is_the_zero_padded_crop():
    image = torch.rand(7, 9, 11)
    crop, pad = StoredCrop(image), 20
    padded = F.pad(image, (pad,) * 6)
    size = (5, 12, 8)
    starts = [tuple(torch.randint(-s - 3, n + 3, ()).item() for n, s in zip(image.shape, size)) for _ in range(20)]
    starts += [(-5, -12, -8), (7, 9, 11)]  # wholly outside: all zero
    out = read_boxes(crop, starts, size)
    for b, s in enumerate(starts):
        assert torch.equal(out[b, 0], padded[tuple(slice(x + pad, x + pad + n) for x, n in zip(s, size))])


def test_read_boxes_of_whole_windows_are_the_official_zero_padded_windows():
    image = torch.rand(20, 20, 30)
    official = torch.cat([w for _, _, w in iter_windows(image[None, None], CFG.spatial_size)])
    got = read_boxes(StoredCrop(image), grid_origins(image.shape), CFG.spatial_size)
    assert torch.equal(got, official)


def test_fill_zeros_and_edge_place_the_box():
    box, lo, grid = torch.randn(2, 3, 2, 3, 1), (1, 0, 2), (4, 5, 4)
    at = (slice(None), slice(None), slice(1, 3), slice(0, 3), slice(2, 3))
    zeros = fill_grid(box, lo, grid, "zeros")
    assert torch.equal(zeros[at], box)
    zeros[at] = 0
    assert not zeros.any()
    edge = fill_grid(box, lo, grid, "edge")
    assert torch.equal(edge, F.pad(box, (2, 1, 0, 2, 1, 1), mode="replicate"))


def test_fill_mean_takes_the_margin_tokens():
    box, lo, grid = torch.randn(1, 3, 3, 3, 3), (1, 1, 1), (5, 5, 5)
    image = ((2, 2, 2), (3, 3, 3))  # the centre token holds image; its 26 neighbours are margin
    out = fill_grid(box, lo, grid, "mean", image)
    margin = box.flatten(2)[:, :, torch.arange(27) != 13].mean(-1)
    assert torch.allclose(out[:, :, 0, 4, 0], margin, atol=1e-6) and torch.equal(out[:, :, 1:4, 1:4, 1:4], box)
    # no margin token: the edge fill
    assert torch.equal(fill_grid(box, lo, grid, "mean", ((1, 1, 1), (4, 4, 4))), fill_grid(box, lo, grid, "edge"))


def test_padding_groups_by_cell():
    lo, hi, grid = (1, 1, 1), (3, 3, 3), (4, 4, 4)
    groups, owner = padding_groups(lo, hi, grid, (2, 2, 2))
    owner = owner.view(grid)
    # eight 2x2x2 cells, each with one token in the box: eight groups of seven, in raster order
    assert groups.shape == (8, 64) and torch.equal(groups.sum(1), torch.full((8,), 7.0))
    assert (owner[1:3, 1:3, 1:3] == -1).all() and (owner >= 0).sum() == 56
    assert owner[0, 0, 0] == 0 and owner[0, 3, 0] == 2 and owner[3, 0, 3] == 5 and owner[3, 3, 3] == 7
    for k in range(8):
        assert torch.equal(groups[k].view(grid).bool(), owner == k)
    one, owner1 = padding_groups(lo, hi, grid)  # one cell: all the padding in one group
    assert one.shape == (1, 64) and torch.equal(one[0].bool(), owner.flatten() >= 0)
    assert torch.equal(owner1 >= 0, owner.flatten() >= 0)
    assert padding_groups((0, 1, 0), (4, 4, 4), grid, (1, 1, 1))[0].shape == (16, 64)  # a token a group
    assert padding_groups((0, 0, 0), grid, grid)[0].shape[0] == 0  # no padding left out


def test_fill_summaries_places_each_groups_summary():
    lo, hi, grid = (0, 1, 1), (2, 3, 4), (4, 4, 4)
    groups, owner = padding_groups(lo, hi, grid, (2, 2, 2))
    box, summaries = torch.randn(2, 3, 2, 2, 3), torch.randn(2, 3, len(groups))
    out = fill_summaries(box, lo, grid, summaries, owner).flatten(2)
    assert torch.equal(out.view(2, 3, *grid)[:, :, 0:2, 1:3, 1:4], box)
    for n, k in enumerate(owner.tolist()):
        if k >= 0:
            assert torch.equal(out[:, :, n], summaries[:, :, k])


@pytest.fixture(scope="module")
def model():
    return SegVolNetwork(CFG).eval()


@pytest.mark.parametrize("fill", FILLS)
def test_whole_grid_box_is_the_full_encoding_bit_for_bit(model, fill):
    crop = StoredCrop(torch.rand(20, 20, 30))
    origins = grid_origins(crop.shape)
    with torch.no_grad():
        full = model.encode_image(read_boxes(crop, origins, CFG.spatial_size))
        got = encode_window_tokens(model, crop, origins, margin=4, fill=fill)
    assert len(got) == len(origins) == 2
    for b, e in enumerate(got):
        assert torch.equal(e, full[b : b + 1])


@pytest.mark.parametrize("fill", ["edge", "summary"])
def test_box_encodings_land_at_their_tokens(model, fill):
    crop = StoredCrop(torch.rand(20, 20, 30))
    # a box of another size (encoded apart) and one of the same size elsewhere (encoded together)
    origins = grid_origins(crop.shape) + [(2, -30, -17), (2, -22, -33)]
    lo, hi = zip(*(token_box(crop.shape, o, CFG.spatial_size, CFG.patch_size, 0) for o in origins))
    with torch.no_grad():
        got = encode_window_tokens(model, crop, origins, margin=0, fill=fill)
        one_by_one = encode_window_tokens(model, crop, origins, margin=0, fill=fill, batch=1)
        for o, a, b, e, e1 in zip(origins, lo, hi, got, one_by_one):
            x = read_boxes(
                crop,
                [tuple(v + t * p for v, t, p in zip(o, a, CFG.patch_size))],
                [(j - i) * p for i, j, p in zip(a, b, CFG.patch_size)],
            )
            if fill == "summary":
                ref = model.encode_image_tokens(
                    x, a, b, padding_groups=padding_groups(a, b, CFG.grid_size, (2, 4, 4))[0][None]
                )[0]
            else:
                ref = model.encode_image_tokens(x, a, b)
            at = (slice(None), slice(None)) + tuple(slice(i, j) for i, j in zip(a, b))
            assert e.shape == (1, CFG.hidden_size, *CFG.grid_size)
            assert (e[at] - ref).abs().max() <= 1e-5 * ref.abs().max()
            assert (e - e1).abs().max() <= 1e-5 * e1.abs().max()


@pytest.mark.parametrize("fill", ["zeros", "summary"])
def test_encoder_level_adapter_encodes_whole_windows(fill):
    model = SegVolNetwork(CFG).eval()
    model.image_encoder.after_encoder = nn.Linear(CFG.hidden_size, CFG.hidden_size)
    crop = StoredCrop(torch.rand(20, 20, 30))
    origins = grid_origins(crop.shape)
    with torch.no_grad():
        full = model.encode_image(read_boxes(crop, origins, CFG.spatial_size))
        got = encode_window_tokens(model, crop, origins, margin=0, fill=fill)
    assert all(torch.equal(e, full[b : b + 1]) for b, e in enumerate(got))


def test_unknown_fill_refused(model):
    with pytest.raises(InvalidArgumentError, match="fill"):
        encode_window_tokens(model, StoredCrop(torch.rand(20, 20, 30)), [(0, -22, -17)], fill="nearest")
    with pytest.raises(InvalidArgumentError, match="fill"):
        fill_grid(torch.zeros(1, 1, 1, 1, 1), (0, 0, 0), (2, 2, 2), "summary")
