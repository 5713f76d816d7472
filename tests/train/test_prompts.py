"""Training prompt sampling (docs/official-pipeline.md §5.2, §6): boxes with jitter, the official point recipe,
the six mixes and their batching, determinism per generator, and no use of the global RNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segevol_fast.errors import ArgumentTypeError, InvalidArgumentError, ShapeError
from segevol_fast.train.prompts import (
    PROMPT_MIXES,
    _Candidates,
    box_from_mask,
    collate_prompts,
    jitter_box,
    points_from_mask,
    restrict_to_mix,
    sample_prompts,
)

EMPTY_BOX = [-1.0] * 6


def gen(seed=None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(torch.randint(2**31, ())) if seed is None else seed)
    return g


def random_blob(shape=(6, 12, 10)) -> torch.Tensor:
    """A random non-empty float mask with a few scattered foreground voxels."""
    mask = (torch.rand(shape) > 0.9).float()
    mask.view(-1)[int(torch.randint(mask.numel(), ()))] = 1.0
    return mask


def numpy_box(mask: np.ndarray) -> list[float]:
    idx = np.argwhere(mask > 0)
    return [float(v) for v in list(idx.min(0)) + list(idx.max(0))]


# ------------------------------------------------------------------------------ boxes
def test_box_is_min_max_inclusive():
    mask = random_blob()
    box = box_from_mask(mask)
    assert box.dtype == torch.float32 and box.shape == (6,)
    assert box.tolist() == numpy_box(mask.numpy())


def test_empty_mask_gives_empty_box_even_with_jitter():
    assert box_from_mask(torch.zeros(4, 5, 6)).tolist() == EMPTY_BOX
    assert box_from_mask(torch.zeros(4, 5, 6, dtype=torch.bool), jitter=5, generator=gen()).tolist() == EMPTY_BOX


def test_jitter_needs_a_generator_and_a_sane_amount():
    mask = random_blob()
    with pytest.raises(InvalidArgumentError):
        box_from_mask(mask, jitter=3)
    with pytest.raises(InvalidArgumentError):
        box_from_mask(mask, jitter=-1, generator=gen())
    with pytest.raises(ArgumentTypeError):
        box_from_mask(mask, jitter=1.5, generator=gen())
    with pytest.raises(ArgumentTypeError):
        box_from_mask(mask, jitter=1, generator=np.random.default_rng())


def test_jitter_covers_the_whole_range_uniformly():
    """A box far from the borders: every shift in [-2, 2] appears on every coordinate, roughly
    equally often (200 draws per coordinate, 40 expected per value)."""
    mask = torch.zeros(20, 20, 20)
    mask[8:12, 7:13, 6:14] = 1
    base = torch.tensor(numpy_box(mask.numpy()))
    g = gen()
    shifts = torch.stack([box_from_mask(mask, jitter=2, generator=g) - base for _ in range(200)])
    for c in range(6):
        counts = torch.bincount((shifts[:, c] + 2).long(), minlength=5)
        assert len(counts) == 5 and counts.min() >= 10, (c, counts)


@settings(max_examples=60)
@given(
    shape=st.tuples(*[st.integers(1, 12)] * 3),
    corner=st.tuples(*[st.floats(0, 1)] * 6),
    jitter=st.sampled_from([0, 1, 5, 10, 50]),
    seed=st.integers(0, 2**31 - 1),
)
def test_jittered_box_stays_within_jitter_inside_and_ordered(shape, corner, jitter, seed):
    lo = [int(c * (s - 1)) for c, s in zip(corner[:3], shape)]
    hi = [max(a, int(c * (s - 1))) for a, c, s in zip(lo, corner[3:], shape)]
    mask = torch.zeros(shape)
    mask[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = 1
    box = box_from_mask(mask, jitter=jitter, generator=gen(seed))
    b = np.array(box.tolist())
    exact = np.array(lo + hi, dtype=float)
    assert np.all(np.abs(b - exact) <= jitter)
    assert np.all(b == np.round(b))
    assert np.all(b >= 0) and np.all(b[:3] <= np.array(shape) - 1) and np.all(b[3:] <= np.array(shape) - 1)
    assert np.all(b[:3] <= b[3:])
    assert torch.equal(box, box_from_mask(mask, jitter=jitter, generator=gen(seed)))


def test_jitter_box_batch_clamp_to_and_empty_rows():
    boxes = torch.tensor([[0.0, 0, 0, 3, 3, 3], EMPTY_BOX, [5, 5, 5, 9, 9, 9]])
    out = jitter_box(boxes, 50, gen(), clamp_to=(10, 10, 10))
    assert out.shape == (3, 6) and out[1].tolist() == EMPTY_BOX
    assert (out[[0, 2]] >= 0).all() and (out[[0, 2]] <= 9).all()
    assert torch.equal(jitter_box(boxes, 0, None, clamp_to=(10, 10, 10)), boxes)
    with pytest.raises(ShapeError):
        jitter_box(torch.zeros(5), 1, gen(), clamp_to=(10, 10, 10))


# ------------------------------------------------------------------------------ points
def split_points(coords: torch.Tensor, labels: torch.Tensor):
    """Check the official layout [first] + [1]*e + [0]*n + [-1]*rest and return (first_label, e, n)."""
    lab = labels.tolist()
    first = lab[0]
    rest = lab[1:]
    e = next((i for i, v in enumerate(rest) if v != 1), len(rest))
    n = next((i for i, v in enumerate(rest[e:]) if v != 0), len(rest) - e)
    assert all(v == -1 for v in rest[e + n :]), lab
    pads = coords[labels == -1]
    assert (pads == -1).all()
    return first, e, n


def test_points_follow_the_official_recipe():
    mask = torch.zeros(6, 10, 12)
    mask[1:5, 2:8, 3:9] = 1.0
    mask[1, 2:8, 3:9] = 0.5  # an area-resized rim: neither positive nor negative
    g = gen()
    extras, negs = set(), set()
    for _ in range(200):  # P(a count value never drawn) ~ 22 * (10/11)**200 ~ 1e-7
        coords, labels = points_from_mask(mask, g)
        assert coords.shape == (21, 3) and coords.dtype == torch.float32
        assert labels.shape == (21,) and labels.dtype == torch.int64
        first, e, n = split_points(coords, labels)
        assert first == 1 and 0 <= e <= 10 and 0 <= n <= 10
        extras.add(e)
        negs.add(n)
        idx = coords.long()
        values = mask[idx[:, 0], idx[:, 1], idx[:, 2]]
        assert (values[labels == 1] > 0.9).all() and (values[labels == 0] < 0.1).all()
        assert len({tuple(p) for p in coords[1 : 1 + e].tolist()}) == e  # extras distinct
        assert len({tuple(p) for p in coords[labels == 0].tolist()}) == n
    assert extras == set(range(11)) and negs == set(range(11))


def test_points_are_deterministic_per_generator_and_leave_global_rng_alone():
    mask = random_blob()
    state = torch.get_rng_state()
    a = points_from_mask(mask, gen(7))
    b = points_from_mask(mask, gen(7))
    sample_prompts(mask, None, gen(3), jitter=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    draws = {tuple(points_from_mask(mask, gen(s))[0].flatten().tolist()) for s in range(5)}
    assert len(draws) > 1


def test_empty_mask_gives_padding_first_then_negatives():
    g = gen()
    saw_negatives = False
    for _ in range(20):
        coords, labels = points_from_mask(torch.zeros(3, 4, 5), g)
        assert labels[0] == -1 and coords[0].tolist() == [-1.0, -1.0, -1.0]
        assert not (labels == 1).any() and coords.shape == (21, 3)
        saw_negatives |= bool((labels == 0).any())
    assert saw_negatives


def test_full_mask_and_scarce_positives():
    g = gen()
    for _ in range(20):
        coords, labels = points_from_mask(torch.ones(2, 3, 4), g)
        assert not (labels == 0).any() and labels[0] == 1
    two = torch.zeros(3, 4, 5)
    two[1, 2, 3] = two[2, 0, 1] = 1
    for _ in range(20):
        coords, labels = points_from_mask(two, g)
        assert (labels == 1).sum() <= 3  # first + at most the 2 distinct positives
        assert {tuple(p) for p in coords[labels == 1].tolist()} <= {(1.0, 2.0, 3.0), (2.0, 0.0, 1.0)}


def test_padding_options():
    mask = random_blob()
    g = gen()
    for _ in range(10):
        coords, labels = points_from_mask(mask, g, max_extra_pos=3, max_neg=2, pad_to=None)
        _, e, n = split_points(coords, labels)
        assert len(labels) >= 1 + e + n and len(labels) <= 6
    coords, labels = points_from_mask(mask, g, max_extra_pos=0, max_neg=0, pad_to=4)
    assert labels.tolist()[1:] == [-1, -1, -1]
    with pytest.raises(InvalidArgumentError):
        points_from_mask(mask, g, pad_to=20)
    with pytest.raises(InvalidArgumentError):
        points_from_mask(mask, None)
    with pytest.raises(ShapeError):
        points_from_mask(mask[None], g)


@pytest.mark.parametrize("fraction", [0.05, 0.9])  # the candidate list path and the rejection path
def test_candidates_draw_distinct_uniform_voxels(fraction):
    ok = torch.rand(400) < fraction
    ok[:3] = True
    cand = _Candidates(ok)
    g = gen()
    allowed = set(torch.nonzero(ok).flatten().tolist())
    for k in (1, 3, 10):
        picked = cand.pick(k, g).tolist()
        assert len(picked) == min(k, len(allowed)) == len(set(picked)) and set(picked) <= allowed
    counts = torch.zeros(400)
    for _ in range(3000):
        counts[cand.pick(1, g)] += 1
    expected = 3000 / len(allowed)
    assert counts[~ok].sum() == 0
    # binomial spread: a 7-sigma band around the expected count per allowed voxel
    sd = (expected * (1 - 1 / len(allowed))) ** 0.5
    assert (counts[ok] - expected).abs().max() < 7 * sd + 2


# ------------------------------------------------------------------------------ mixes
def test_the_six_official_mixes_in_order():
    assert [m.name for m in PROMPT_MIXES] == ["points+text", "box+text", "text", "box", "points", "box+points"]
    fields = [(m.text, m.box, m.points) for m in PROMPT_MIXES]
    assert fields == [(1, 0, 1), (1, 1, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)]


@pytest.mark.parametrize("mix", PROMPT_MIXES, ids=lambda m: m.name)
def test_sample_prompts_gives_exactly_the_mix_fields(mix):
    mask = random_blob()
    out = sample_prompts(mask, mix.name, gen(), jitter=2)
    keys = {"mix", "text"} | ({"boxes"} if mix.box else set())
    keys |= {"point_coords", "point_labels"} if mix.points else set()
    assert set(out) == keys and out["mix"] == mix.name and out["text"] == mix.text
    batch = collate_prompts([out, sample_prompts(mask, mix, gen(), jitter=2)])
    assert (batch["boxes"] is not None) == mix.box and (batch["points"] is not None) == mix.points
    if mix.box:
        assert batch["boxes"].shape == (2, 6) and batch["boxes"].dtype == torch.float32
    if mix.points:
        coords, labels = batch["points"]
        assert coords.shape == (2, 21, 3) and labels.shape == (2, 21) and labels.dtype == torch.int64


def test_one_draw_serves_all_mixes_like_the_official_step():
    mask = random_blob()
    full = sample_prompts(mask, None, gen(3), jitter=4)
    g = gen(3)
    box = box_from_mask(mask, 4, g)  # the documented order: box, then points
    coords, _ = points_from_mask(mask, g)
    assert torch.equal(full["boxes"], box) and torch.equal(full["point_coords"], coords)
    for mix in PROMPT_MIXES:
        sub = restrict_to_mix(full, mix)
        for key in ("boxes", "point_coords", "point_labels"):
            assert (key in sub) == (key in sample_prompts(mask, mix, gen()))
            if key in sub:
                assert sub[key] is full[key]
    with pytest.raises(InvalidArgumentError):
        restrict_to_mix(restrict_to_mix(full, "text"), "box")


def test_bad_mixes_and_batches():
    mask = random_blob()
    with pytest.raises(InvalidArgumentError):
        sample_prompts(mask, "lasso", gen())
    with pytest.raises(InvalidArgumentError):
        collate_prompts([sample_prompts(mask, "box", gen()), sample_prompts(mask, "points", gen())])
    with pytest.raises(InvalidArgumentError):
        collate_prompts([])
    uneven = [sample_prompts(mask, "points", g, pad_to=None) for g in (gen(s) for s in range(8))]
    if len({len(u["point_labels"]) for u in uneven}) > 1:
        with pytest.raises(ShapeError):
            collate_prompts(uneven)


def test_collated_prompts_drive_the_tiny_decoder_and_the_loss():
    """End to end on the tiny random model: each mix's batch is accepted by `SegVol.decode` and the
    loss back-propagates finite gradients into the decoder."""
    from segevol_fast import SegVol, SegVolConfig
    from segevol_fast.train.loss import bce_dice_loss

    torch.manual_seed(0)
    model = SegVol(SegVolConfig.tiny())
    size = model.config.spatial_size
    masks = torch.zeros(2, *size)
    masks[0, 2:5, 4:20, 6:18] = 1
    masks[1, 1:3, 10:30, 2:9] = 1
    with torch.no_grad():
        embedding = model.encode_image(torch.rand(1, 1, *size))
    g = gen()
    full = [sample_prompts(m, None, g, jitter=2) for m in masks]
    total = 0.0
    for mix in PROMPT_MIXES:
        batch = collate_prompts([restrict_to_mix(f, mix) for f in full])
        hidden = embedding.shape[1]
        text = torch.randn(2, hidden) if batch["text"] else None
        logits = model.decode(embedding, text_embedding=text, boxes=batch["boxes"], points=batch["points"])
        assert logits.shape == (2, 1, *size)
        total = total + bce_dice_loss(logits, masks[:, None])
    total.backward()
    grads = [p.grad for p in model.mask_decoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
