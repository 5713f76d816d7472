"""SegmentationResult: volumes, saving (folder / single label map), preview, repr."""

from __future__ import annotations

import json
import math
import os

import nibabel as nib
import numpy as np
import pytest

from segevol_fast.errors import OutputError, ResultError, SegVolFastError
from segevol_fast.inference import result_files
from segevol_fast.inference.result import SegmentationResult
from segevol_fast.inference.result_files import safe_label, write_bytes_atomic
from segevol_fast.io.preview import LEGEND_ROW_PX, MAX_COLS, PAD_PX, TILE_PX

SHAPE = (20, 16, 12)


def _affine(spacing=(2.0, 2.0, 2.5)):
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = (-10.0, 5.0, 30.0)
    return aff


def _result(probabilities=False, **kw):
    a = np.zeros(SHAPE, bool)
    a[2:12, 3:13, 1:11] = True  # a 10x10x10 cube
    b = np.zeros(SHAPE, bool)
    b[8:15, 5:9, 4:6] = True  # overlaps the cube
    masks = {"liver": a, "left kidney": b}
    probs = {k: m.astype(np.float32) * 0.75 for k, m in masks.items()} if probabilities else None
    return SegmentationResult(
        masks,
        _affine(),
        modality="ct",
        probabilities=probs,
        timings={"zoom_out": 0.5, "total": 1.25},
        peak_memory_bytes=3 * 2**20,
        mode="fast",
        notes=["random weights: masks are meaningless"],
        **kw,
    )


def _no_tmp(folder):
    return [f for f in os.listdir(folder) if ".tmp" in f] == []


def test_volume_ml_of_a_known_cube():
    r = _result()
    # voxel 2*2*2.5 = 10 mm^3; 1000 voxels -> 10 000 mm^3 = 10 mL
    assert r.volume_ml("liver") == pytest.approx(10.0)
    assert r.volumes_ml() == {"liver": pytest.approx(10.0), "left kidney": pytest.approx(7 * 4 * 2 * 0.01)}
    assert r.labels == ["liver", "left kidney"] and r.shape == SHAPE and r.spacing == (2.0, 2.0, 2.5)
    with pytest.raises(ResultError, match="liver"):
        r.volume_ml("spleen")


def test_volume_uses_the_affine_determinant_for_oblique_grids():
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.5, 1.5, 4.0])
    m = np.ones((4, 5, 6), bool)
    r = SegmentationResult({"x": m}, aff)
    assert r.volume_ml("x") == pytest.approx(120 * 1.5 * 1.5 * 4.0 / 1000)


def test_inputs_are_validated_and_masks_made_bool():
    r = SegmentationResult({"a": np.ones(SHAPE, np.uint8)}, _affine())
    assert r.masks["a"].dtype == np.bool_
    with pytest.raises(ResultError, match="one grid"):
        SegmentationResult({"a": np.ones(SHAPE, bool), "b": np.ones((2, 2, 2), bool)}, _affine())
    with pytest.raises(ResultError, match="4x4"):
        SegmentationResult({"a": np.ones(SHAPE, bool)}, np.eye(3))
    with pytest.raises(ResultError, match="probabilities"):
        SegmentationResult({"a": np.ones(SHAPE, bool)}, _affine(), probabilities={"b": np.ones(SHAPE)})
    assert issubclass(ResultError, SegVolFastError)


def test_save_directory_round_trip(tmp_path):
    r = _result(probabilities=True)
    out = r.save(tmp_path / "out")
    assert sorted(os.listdir(out)) == [
        "label_map.nii.gz",
        "left_kidney.nii.gz",
        "left_kidney_prob.nii.gz",
        "liver.nii.gz",
        "liver_prob.nii.gz",
        "summary.json",
    ]
    for label, stem in (("liver", "liver"), ("left kidney", "left_kidney")):
        img = nib.load(out / f"{stem}.nii.gz")
        assert np.allclose(img.affine, r.affine)
        assert img.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(img.dataobj).astype(bool), r.masks[label])
        prob = nib.load(out / f"{stem}_prob.nii.gz")
        assert prob.get_data_dtype() == np.float32
        np.testing.assert_allclose(np.asarray(prob.dataobj), r.probabilities[label])
    s = json.loads((out / "summary.json").read_text())
    assert s["labels"] == ["liver", "left kidney"]
    assert s["files"] == {"liver": "liver.nii.gz", "left kidney": "left_kidney.nii.gz"}
    assert s["volumes_ml"]["liver"] == pytest.approx(10.0)
    assert s["timings_s"] == {"zoom_out": 0.5, "total": 1.25}
    assert s["peak_memory_bytes"] == 3 * 2**20 and s["mode"] == "fast"
    assert s["notes"] == ["random weights: masks are meaningless"]
    assert _no_tmp(out)


def test_save_single_label_map_later_prompts_win(tmp_path):
    r = _result()
    for name, side in (("seg.nii.gz", "seg.json"), ("seg2.nii", "seg2.json")):
        p = r.save(tmp_path / name)
        img = nib.load(p)
        assert np.allclose(img.affine, r.affine) and img.get_data_dtype() == np.uint8
        lab = np.asarray(img.dataobj)
        expected = np.zeros(SHAPE, np.uint8)
        expected[r.masks["liver"]] = 1
        expected[r.masks["left kidney"]] = 2  # overlap goes to the later prompt
        np.testing.assert_array_equal(lab, expected)
        meta = json.loads((tmp_path / side).read_text())
        assert meta["labels"] == {"1": "liver", "2": "left kidney"}
        assert meta["volumes_ml"]["liver"] == pytest.approx(10.0)
    assert _no_tmp(tmp_path)


def test_save_refuses_a_file_as_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    # an unusable output path is an OutputError (an OSError), like every other output problem
    with pytest.raises(OutputError, match="is a file"):
        _result().save(tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x" and os.listdir(tmp_path) == ["f"]


def test_safe_and_unique_file_names(tmp_path):
    assert safe_label("left kidney") == "left_kidney"
    assert safe_label("../../etc/passwd") == "etc_passwd"
    assert safe_label("...") == "mask"
    m = np.zeros(SHAPE, bool)
    r = SegmentationResult({"a b": m, "a_b": m, "A/B": m}, _affine())
    out = r.save(tmp_path / "o")
    files = json.loads((out / "summary.json").read_text())["files"]
    assert files == {"a b": "a_b.nii.gz", "a_b": "a_b_2.nii.gz", "A/B": "A_B_3.nii.gz"}


def test_write_bytes_atomic_leaves_nothing_on_failure(tmp_path, monkeypatch):
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(result_files.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_bytes_atomic(tmp_path / "x.json", b"{}")
    assert os.listdir(tmp_path) == []


def _expected_size(n_tiles, tw, th, n_labels):
    cols = min(n_tiles, MAX_COLS)
    rows = math.ceil(n_tiles / cols)
    return (cols * tw + (cols + 1) * PAD_PX, rows * th + (rows + 1) * PAD_PX + n_labels * LEGEND_ROW_PX + PAD_PX)


def test_preview_png_size_and_overlay(tmp_path):
    from PIL import Image

    r = _result()
    vol = np.random.default_rng(0).normal(0, 100, SHAPE).astype(np.int16)
    p = r.preview(tmp_path / "p.png", vol, n_slices=6)
    img = Image.open(p)
    # X*2 mm = 40 mm wide, Y*2 mm = 32 mm tall -> 256 x 205 tiles; masks span k = 1..10
    assert img.mode == "RGB" and img.size == _expected_size(6, TILE_PX, round(TILE_PX * 32 / 40), 2)
    px = np.asarray(img)
    red = (px[..., 0] > 200) & (px[..., 1] < 60) & (px[..., 2] < 100)  # the first mask's outline colour
    assert red.any()
    assert _no_tmp(tmp_path)


def test_preview_fewer_slices_than_asked_and_no_volume(tmp_path):
    from PIL import Image

    m = np.zeros(SHAPE, bool)
    m[5:10, 5:10, 3:5] = True  # only two slices hold the mask
    r = SegmentationResult({"x": m}, np.diag([1.0, 1.0, 1.0, 1.0]))
    img = Image.open(r.preview(tmp_path / "p.png", None, n_slices=6))
    assert img.size == _expected_size(2, TILE_PX, round(TILE_PX * 16 / 20), 1)
    with pytest.raises(ResultError, match="shape"):
        r.preview(tmp_path / "q.png", np.zeros((3, 3, 3)))


def test_repr_lists_labels_volumes_timings():
    text = repr(_result())
    assert "liver" in text and "10.0 mL" in text and "left kidney" in text
    assert "total 1.25 s" in text and "meaningless" in text and "3 MiB" in text


def test_folder_holds_a_label_map_with_its_legend(tmp_path):
    r = _result()
    out = r.save(tmp_path / "lm")
    lm = np.asarray(nib.load(out / "label_map.nii.gz").dataobj)
    legend = json.loads((out / "summary.json").read_text())["label_map"]
    assert legend["file"] == "label_map.nii.gz" and legend["labels"] == {"1": "liver", "2": "left kidney"}
    for i, label in ((1, "liver"), (2, "left kidney")):
        assert ((lm == i) <= r.masks[label]).all()  # a later prompt may take overlapping voxels
    np.testing.assert_array_equal(lm > 0, r.masks["liver"] | r.masks["left kidney"])
    named = SegmentationResult(masks={"label map": r.masks["liver"]}, affine=r.affine)
    out2 = named.save(tmp_path / "named")
    assert json.loads((out2 / "summary.json").read_text())["files"] == {"label map": "label_map_2.nii.gz"}
