"""User prompts -> crop-frame prompts: axis order, crop offset, world coordinates, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segevol_fast.errors import ArgumentTypeError, PromptError
from segevol_fast.inference import segment
from segevol_fast.inference.prompts import build_prompts, check_prompt_arguments, crop_to_input, input_to_crop

SHAPE, START = (100, 90, 40), (2, 3, 4)  # input (X, Y, Z); crop start in (D, H, W) = (Z, Y, X)


def test_axes_are_reversed_and_offset_by_the_crop_start():
    (p,) = build_prompts(box=[10, 20, 5, 30, 40, 15], points=[[12, 22, 6]], shape=SHAPE, start=START)
    # (i, j, k) -> (d, h, w) = (k, j, i) - start
    np.testing.assert_array_equal(p.box, [5 - 2, 20 - 3, 10 - 4, 15 - 2, 40 - 3, 30 - 4])
    np.testing.assert_array_equal(p.points, [[6 - 2, 22 - 3, 12 - 4]])
    np.testing.assert_array_equal(p.point_labels, [1])
    np.testing.assert_array_equal(crop_to_input(input_to_crop([[1, 2, 3]], START), START), [[1, 2, 3]])


def test_each_text_is_a_prompt_sharing_box_and_points():
    ps = build_prompts(["liver", "spleen"], box=[0, 0, 0, 5, 5, 5], points=[[1, 1, 1]], shape=SHAPE, start=(0, 0, 0))
    assert [p.label for p in ps] == ["liver", "spleen"]
    assert all(p.kinds == ("text", "box", "points") for p in ps)


def test_one_box_per_text_and_boxes_alone():
    ps = build_prompts(["a", "b"], box=[[0, 0, 0, 5, 5, 5], [1, 1, 1, 9, 9, 9]], shape=SHAPE, start=(0, 0, 0))
    np.testing.assert_array_equal(ps[1].box, [1, 1, 1, 9, 9, 9])
    ps = build_prompts(box=[[0, 0, 0, 5, 5, 5], [1, 1, 1, 9, 9, 9]], shape=SHAPE, start=(0, 0, 0))
    assert [p.label for p in ps] == ["box 0", "box 1"] and all(p.text is None for p in ps)


def test_world_millimetres_go_through_the_inverse_affine():
    affine = np.array([[-2.0, 0, 0, 100], [0, 2.0, 0, -50], [0, 0, 3.0, 10], [0, 0, 0, 1]])
    ijk = np.array([[10, 20, 5], [30, 40, 15]], dtype=float)
    mm = ijk @ affine[:3, :3].T + affine[:3, 3]
    (a,) = build_prompts(box=mm.reshape(-1), coords="world", affine=affine, shape=SHAPE, start=(0, 0, 0))
    (b,) = build_prompts(box=ijk.reshape(-1), shape=SHAPE, start=(0, 0, 0))
    np.testing.assert_allclose(a.box, b.box)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(), "at least one prompt"),
        (dict(text=""), "non-empty"),
        (dict(box=[0, 0, 0, 5, 5]), r"box must be"),
        (dict(text=["a", "b", "c"], box=[[0] * 6, [1] * 6]), "2 boxes for 3 text"),
        (dict(points=[[1, 2]]), "points must be"),
        (dict(points=[[1, 2, 3]], point_labels=[2]), "point_labels"),
        (dict(points=[[1, 2, 3]], point_labels=[0]), "at least one point must be positive"),
        (dict(point_labels=[1]), "without points"),
        (dict(box=[0, 0, 0, 500, 5, 5]), "outside the volume"),
        (dict(box=[0, 0, 0, 5, 5, 5], coords="pixels"), "coords must be"),
        (dict(box=[0, 0, 0, 5, 5, 5], coords="world"), "needs the volume's affine"),
    ],
)
def test_bad_prompts_raise_prompt_error(kwargs, msg):
    with pytest.raises(PromptError, match=msg):
        build_prompts(shape=SHAPE, start=START, **kwargs)


# ------------------------------------------------------------------ negative points
RULE = "negative points only say where the target is not; give a positive point, a box or a text prompt"


@pytest.mark.parametrize(
    "kwargs",
    [dict(text="liver"), dict(box=[0, 0, 0, 5, 5, 5]), dict(text=["liver", "spleen"], box=[0, 0, 0, 5, 5, 5])],
    ids=["text", "box", "text-and-box"],
)
def test_negative_only_points_are_correction_clicks_next_to_a_text_or_box(kwargs):
    check_prompt_arguments(points=[[1, 2, 3], [4, 5, 6]], point_labels=[0, 0.0], **kwargs)
    prompts = build_prompts(
        points=[[1, 2, 3], [4, 5, 6]], point_labels=[0, 0.0], shape=SHAPE, start=(0, 0, 0), **kwargs
    )
    assert all(p.point_labels.tolist() == [0, 0] and "points" in p.kinds for p in prompts)


def test_negative_only_points_alone_are_refused_with_the_rule():
    for check in (check_prompt_arguments, lambda **kw: build_prompts(shape=SHAPE, start=START, **kw)):
        with pytest.raises(PromptError, match=RULE):
            check(points=[[1, 2, 3], [4, 5, 6]], point_labels=[0, 0])


@pytest.fixture
def scan():
    rng = np.random.default_rng(0)
    return (rng.random((40, 40, 12)) * 100).astype(np.float32)


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_segment_takes_negative_only_clicks_beside_a_text_or_box(tiny_model, scan, one_thread, mode):
    """The decoder gets the negative point (the result differs from the text alone); exact mode runs
    the official zoom-in, whose point map holds positives only, so its windows get the -1 point."""
    kw = dict(mode=mode, progress=False, return_probabilities=True)
    plain = segment(tiny_model, scan, text="liver", **kw)
    clicked = segment(tiny_model, scan, text="liver", points=[[20, 20, 6]], point_labels=[0], **kw)
    assert clicked.labels == ["liver"] and clicked.zoom_in_windows["liver"] > 0
    assert not np.array_equal(plain.probabilities["liver"], clicked.probabilities["liver"])
    boxed = segment(
        tiny_model,
        scan,
        box=[5, 5, 2, 30, 30, 10],
        points=[[20, 20, 6]],
        point_labels=[0],
        mode=mode,
        zoom_in=mode == "fast",
        progress=False,
    )  # exact: official zoom-in takes box or points
    assert boxed.labels == ["box 0"]
    with pytest.raises(PromptError, match=RULE):
        segment(tiny_model, scan, points=[[20, 20, 6]], point_labels=[0], mode=mode, progress=False)


def test_exact_mode_point_map_of_negative_only_clicks_is_empty():
    from segevol_fast.inference.exact import select_points, zoom_out_prompt

    (p,) = build_prompts(text="liver", points=[[20, 20, 6]], point_labels=[0], shape=(40, 40, 12), start=(0, 0, 0))
    zp = zoom_out_prompt(p, (12, 40, 40), (8, 32, 32))
    assert zp.points[1].tolist() == [[0]] and not zp.point_map.any()
    coords, labels = select_points(zp.point_map, torch.Generator().manual_seed(0))
    assert labels.tolist() == [-1] and coords.tolist() == [[-1.0, -1.0, -1.0]]


# ------------------------------------------------------------------ the argument at fault
BAD_PROMPTS = [
    # (prompt arguments, the argument at fault)
    (dict(text=5), "text"),
    (dict(text=["liver", ""], box=[1, 2, 3]), "text"),  # the first at fault, in argument order
    (dict(box="1,2,3,4,5,6"), "box"),
    (dict(box=[0, 0, 0, np.nan, 4, 4], points=[[1, 2, 3, 4]]), "box"),
    (dict(text=["a", "b", "c"], box=[[0] * 6, [1] * 6]), "box"),  # the count is the boxes' fault
    (dict(text="liver", points=[[1, 2, 3, 4]]), "points"),
    (dict(text="liver", points=torch.tensor([[1.0, 2.0, float("inf")]])), "points"),
    (dict(points=[[1, 2, 3]], point_labels=[1, 1]), "point_labels"),
    (dict(points=[[1, 2, 3]], point_labels="1"), "point_labels"),
    (dict(text="liver", point_labels=[1]), "point_labels"),  # labels without points
    (dict(points=[[1, 2, 3], [4, 5, 6]], point_labels=[0, 0]), "point_labels"),  # no positive point alone
    (dict(), None),  # no prompt at all: no one argument is at fault
]


def _first_failing_prefix(prompts: dict):
    """The argument at fault by definition: adding the given arguments one at a time in argument
    order, the one whose addition makes the check fail."""
    given = {}
    for name in ("text", "box", "points", "point_labels"):
        if prompts.get(name) is None:
            continue
        given[name] = prompts[name]
        try:
            check_prompt_arguments(**given)
        except (PromptError, ArgumentTypeError):
            return name
    return None


@pytest.mark.parametrize("prompts,argument", BAD_PROMPTS, ids=[str(i) for i in range(len(BAD_PROMPTS))])
def test_a_prompt_error_names_the_argument_at_fault(prompts, argument):
    with pytest.raises((PromptError, ArgumentTypeError)) as info:
        check_prompt_arguments(**prompts)
    assert info.value.argument == argument
    if prompts:
        assert _first_failing_prefix(prompts) == argument
    with pytest.raises(type(info.value)) as again:  # build_prompts says the same
        build_prompts(shape=SHAPE, start=START, **prompts)
    assert str(again.value) == str(info.value)
