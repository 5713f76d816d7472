"""Viewer input -> segment()'s prompts: clicks, rectangles, typed names, name completion; what the
conversions give is accepted by segment()'s own prompt checks, and input outside the scan is a
PromptError."""

from __future__ import annotations

import numpy as np
import pytest

from segevol_fast.errors import ArgumentTypeError, InvalidArgumentError, PromptError, ShapeError
from segevol_fast.inference.prompts import build_prompts
from segevol_fast.viewer.prompts import box_from_vertices, click_prompt, complete, text_prompts
from segevol_fast.vocabulary import NAMES

SHAPE = (40, 30, 12)


def rectangle(i0, i1, j0, j1, k) -> np.ndarray:
    """The four vertices napari gives for a rectangle drawn on slice k (axis 2)."""
    return np.array([[i0, j0, k], [i0, j1, k], [i1, j1, k], [i1, j0, k]], dtype=float)


def test_clicks_round_to_the_nearest_voxel():
    points, labels = click_prompt([[3.4, 7.6, 2.0], [0.0, 29.4, 11.49], [-0.4, 0.2, 0.5]], [True, False, True], SHAPE)
    assert points.dtype == np.int64 and labels.dtype == np.int64
    assert points.tolist() == [[3, 8, 2], [0, 29, 11], [0, 0, 0]]
    assert labels.tolist() == [1, 0, 1]
    # segment() takes them as they are, and puts them where they were clicked
    (prompt,) = build_prompts(points=points, point_labels=labels, shape=SHAPE, start=(0, 0, 0))
    assert prompt.points[:, ::-1].tolist() == points.tolist()


@pytest.mark.parametrize("outside", [[-0.6, 3, 3], [3, 29.6, 3], [3, 3, 11.7]])
def test_a_click_outside_the_scan_is_refused(outside):
    with pytest.raises(PromptError, match="outside the scan"):
        click_prompt([[1, 1, 1], outside], [True, True], SHAPE)


def test_bad_clicks_are_typed_errors():
    with pytest.raises(PromptError):
        click_prompt([[1, 1, 1]], [True, False], SHAPE)  # one label per point
    with pytest.raises(PromptError):
        click_prompt(np.zeros((0, 3)), [], SHAPE)
    with pytest.raises(ArgumentTypeError):
        click_prompt([[1, 1, 1]], ["yes"], SHAPE)
    with pytest.raises(PromptError):
        click_prompt([[1, np.inf, 1]], [True], SHAPE)
    with pytest.raises(ShapeError):
        click_prompt([[1, 1, 1]], [True], (40, 30))


def test_a_rectangle_on_one_slice_spans_the_scan_along_that_axis():
    box = box_from_vertices(rectangle(5.2, 20.7, 3.0, 9.4, k=6.0), SHAPE)
    assert box.dtype == np.int64
    assert box.tolist() == [5, 3, 0, 21, 9, 11]
    # drawn on an axial-in-j slice instead: j spans the scan
    vertices = rectangle(5, 20, 3, 9, k=6)[:, [0, 2, 1]]
    assert box_from_vertices(vertices, SHAPE).tolist() == [5, 0, 3, 20, 29, 9]


def test_rectangles_on_two_slices_bound_the_slices_too():
    vertices = np.concatenate([rectangle(5, 10, 3, 9, k=2), rectangle(8, 20, 1, 4, k=7)])
    assert box_from_vertices(vertices, SHAPE).tolist() == [5, 1, 2, 20, 9, 7]


def test_a_rectangle_partly_outside_is_clipped_and_segment_accepts_it():
    box = box_from_vertices(rectangle(-8.0, 12.0, 20.0, 55.0, k=3.0), SHAPE)
    assert box.tolist() == [0, 20, 0, 12, 29, 11]
    (prompt,) = build_prompts(box=box, shape=SHAPE, start=(0, 0, 0))
    assert prompt.box.tolist() == [0, 20, 0, 11, 29, 12]  # (d, h, w) = (k, j, i)


@pytest.mark.parametrize(
    "vertices",
    [
        rectangle(45, 60, 3, 9, k=4),  # right of the scan
        rectangle(-9, -1, 3, 9, k=4),  # left of it
        rectangle(5, 9, 3, 9, k=14),  # on a slice past the last one
    ],
)
def test_a_rectangle_outside_the_scan_is_refused(vertices):
    with pytest.raises(PromptError, match="outside the scan"):
        box_from_vertices(vertices, SHAPE)


def test_a_rectangle_without_area_is_refused():
    with pytest.raises(PromptError, match="no area"):
        box_from_vertices(rectangle(5, 5, 3, 9, k=4), SHAPE)
    with pytest.raises(ShapeError):
        box_from_vertices(np.zeros((0, 3)), SHAPE)
    with pytest.raises(PromptError):
        box_from_vertices(rectangle(5, np.nan, 3, 9, k=4), SHAPE)


def test_typed_names_split_strip_and_deduplicate():
    assert text_prompts(" liver,spleen ;  left   kidney,, Liver; ") == ["liver", "spleen", "left kidney"]
    assert text_prompts("Aorta") == ["Aorta"]


@pytest.mark.parametrize("text", ["", " , ;", ";;"])
def test_no_name_is_a_prompt_error(text):
    with pytest.raises(PromptError):
        text_prompts(text)


def test_names_must_be_a_string():
    with pytest.raises(ArgumentTypeError):
        text_prompts(["liver"])


def test_completion_lists_prefix_matches_then_word_matches():
    got = complete("KID")
    starts = sorted(n for n in NAMES if n.startswith("kid"))
    assert got[: len(starts)] == starts and starts
    rest = got[len(starts) :]
    assert "left kidney" in rest and "right kidney" in rest and rest == sorted(rest)
    assert all(n.startswith("kid") or " kid" in n for n in got)
    assert complete("kid", limit=2) == starts[:2]
    assert complete("", limit=5) == sorted(NAMES)[:5]
    assert complete("no such organ") == [] and complete("idney") == []  # words match from their start


def test_completion_arguments_are_checked():
    with pytest.raises(ArgumentTypeError):
        complete(None)
    with pytest.raises(ArgumentTypeError):
        complete("liv", limit=2.5)
    with pytest.raises(InvalidArgumentError):
        complete("liv", limit=-1)
