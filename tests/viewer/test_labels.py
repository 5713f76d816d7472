"""Organ bookkeeping of the viewer: one label map, stable ids, the latest organ on top, clearing and
undo re-exposing what lay beneath, names and colours that follow the ids."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from segevol_fast.errors import ArgumentTypeError, InvalidArgumentError, ResultError, ShapeError
from segevol_fast.viewer.labels import BACKGROUND, OrganLabels, label_color

SHAPE = (6, 5, 4)


def block(i0, i1, j0=0, j1=5) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[i0:i1, j0:j1] = True
    return mask


def expected_map(layers: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """The map drawn by hand, bottom layer first."""
    out = np.zeros(SHAPE, np.uint16)
    for label_id, mask in layers:
        out[mask] = label_id
    return out


@pytest.fixture
def organs():
    o = OrganLabels(SHAPE)
    assert o.set("liver", block(0, 4)) == 1
    assert o.set("spleen", block(2, 6)) == 2  # overlaps the liver on rows 2, 3
    return o


def test_the_latest_organ_wins_where_they_overlap(organs):
    got = organs.label_map()
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, expected_map([(1, block(0, 4)), (2, block(2, 6))]))
    # refining the liver puts it on top, keeping its id
    assert organs.set("liver", block(0, 5)) == 1
    np.testing.assert_array_equal(organs.label_map(), expected_map([(2, block(2, 6)), (1, block(0, 5))]))


def test_clearing_re_exposes_the_organ_beneath(organs):
    organs.clear("spleen")
    np.testing.assert_array_equal(organs.label_map(), expected_map([(1, block(0, 4))]))
    assert organs.names() == {1: "liver"} and "spleen" not in organs and len(organs) == 1


def test_undo_of_a_new_organ_removes_it(organs):
    assert organs.undo() == "spleen"
    assert organs.names() == {1: "liver"}
    np.testing.assert_array_equal(organs.label_map(), expected_map([(1, block(0, 4))]))


def test_undo_of_a_refinement_restores_the_mask_and_the_order(organs):
    organs.set("liver", block(0, 6, 0, 2))
    assert organs.undo() == "liver"
    np.testing.assert_array_equal(organs.masks()["liver"], block(0, 4))
    np.testing.assert_array_equal(organs.label_map(), expected_map([(1, block(0, 4)), (2, block(2, 6))]))
    assert organs.undo() == "spleen" and organs.undo() == "liver" and organs.undo() is None
    assert organs.names() == {} and not organs.label_map().any()


def test_ids_are_stable_and_a_new_organ_takes_the_smallest_free_one(organs):
    organs.set("aorta", block(5, 6))
    organs.clear("liver")
    assert organs.names() == {2: "spleen", 3: "aorta"}
    assert organs.set("pancreas", block(0, 1)) == 1
    assert organs.set("spleen", block(3, 4)) == 2
    assert organs.names() == {1: "pancreas", 2: "spleen", 3: "aorta"}


def test_a_cleared_organ_leaves_the_undo_history(organs):
    organs.set("liver", block(0, 2))
    organs.clear("liver")
    assert organs.undo() == "spleen"  # the liver's two sets are gone from the history
    assert organs.undo() is None and len(organs) == 0


def test_undo_depth_bounds_the_history():
    o = OrganLabels(SHAPE, undo_depth=2)
    for n in range(4):
        o.set("liver", block(0, n + 1))
    assert o.undo() == "liver" and o.undo() == "liver" and o.undo() is None
    np.testing.assert_array_equal(o.masks()["liver"], block(0, 2))


def test_features_rows_match_names_and_colours_are_fixed(organs):
    organs.set("aorta", block(5, 6))
    organs.clear("spleen")
    features = organs.features()
    assert features == {"index": [0, 1, 3], "name": [BACKGROUND, "liver", "aorta"]}
    label_map = organs.label_map()
    for index, name in zip(features["index"][1:], features["name"][1:]):
        np.testing.assert_array_equal(label_map == index, organs.masks()[name])  # no overlap left
    colors = organs.colors()
    assert list(colors) == [0, 1, 3] and colors[0][3] == 0.0
    assert colors[3] == label_color(3) and OrganLabels(SHAPE).colors() == {0: label_color(0)}


def test_colours_are_distinct_and_opaque():
    rgba = np.array([label_color(i) for i in range(1, 41)])
    assert (rgba[:, 3] == 1.0).all() and ((rgba >= 0) & (rgba <= 1)).all()
    assert len({tuple(c) for c in rgba}) == 40
    first = rgba[:12, :3]  # a typical abdominal session: told apart at a glance
    gaps = np.linalg.norm(first[:, None] - first[None], axis=-1)[np.triu_indices(12, 1)]
    assert gaps.min() > 0.1


def test_masks_are_private_copies(organs):
    mask = block(0, 1)
    organs.set("aorta", mask)
    mask[:] = True  # the caller's array changes later ...
    assert organs.masks()["aorta"].sum() == block(0, 1).sum()  # ... the organ does not
    with pytest.raises(ValueError):
        organs.masks()["aorta"][0, 0, 0] = False
    organs.set("kidney", np.where(block(4, 5), 1, 0).astype(np.uint8))  # 0/1 integers are masks too
    assert organs.masks()["kidney"].dtype == bool


def test_bad_input_is_a_typed_error(organs):
    with pytest.raises(ShapeError):
        organs.set("aorta", np.zeros((6, 5, 3), bool))
    with pytest.raises(ArgumentTypeError):
        organs.set("aorta", np.zeros(SHAPE, np.float32))
    with pytest.raises(ArgumentTypeError):
        organs.set("  ", block(0, 1))
    with pytest.raises(ResultError):
        organs.clear("heart")
    with pytest.raises(ShapeError):
        OrganLabels((6, 5))
    with pytest.raises(InvalidArgumentError):
        OrganLabels(SHAPE, undo_depth=-1)


GUI_PACKAGES = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "vispy")


def test_the_logic_modules_import_neither_napari_nor_qt():
    """Every import attempt of a GUI package is recorded, installed or not (a guarded
    `try: import napari` counts too), in a fresh interpreter."""
    code = f"""
import sys
tried = []
class Recorder:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {GUI_PACKAGES!r}:
            tried.append(name)
        return None
sys.meta_path.insert(0, Recorder())
import segevol_fast.viewer.coords, segevol_fast.viewer.prompts, segevol_fast.viewer.labels
import segevol_fast.viewer.reader
assert not tried, tried
"""
    subprocess.run([sys.executable, "-c", code], check=True)
