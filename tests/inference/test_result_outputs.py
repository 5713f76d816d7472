"""What a saved result says about itself: label-map overlaps and probabilities, provenance, random-weight
flags in every file, the preview drawn on the scan; and the CLI's output checks before any work."""

from __future__ import annotations

import json
import os
import pathlib

import nibabel as nib
import numpy as np
import pytest
import torch

from segevol_fast import cli
from segevol_fast.cli import demo as cli_demo
from segevol_fast.cli import segment as cli_segment
from segevol_fast.errors import OutputError, ResultError
from segevol_fast.inference import result_files
from segevol_fast.inference.result import OVERLAP_RULE, SegmentationResult
from segevol_fast.inference.result_files import describe_prompts
from segevol_fast.io.preview import BANNER_PX, BANNER_RGB, PAD_PX

SHAPE = (18, 15, 10)


def _three_overlapping(probabilities=False, **kw):
    a = np.zeros(SHAPE, bool)
    a[2:10, 2:10, 2:8] = True
    b = np.zeros(SHAPE, bool)
    b[6:14, 4:12, 3:9] = True  # overlaps a
    c = np.zeros(SHAPE, bool)
    c[8:16, 1:6, 0:5] = True  # overlaps a and b (a voxel region in all three)
    d = np.zeros(SHAPE, bool)  # an empty mask: id present, zero voxels
    masks = {"a": a, "b": b, "c": c, "d": d}
    probs = None
    if probabilities:
        rng = np.random.default_rng(3)
        probs = {k: rng.random(SHAPE).astype(np.float32) for k in masks}
    return SegmentationResult(masks, np.diag([2.0, 2.0, 3.0, 1.0]), probabilities=probs, **kw)


def test_label_map_sidecar_matches_the_map_exactly(tmp_path):
    r = _three_overlapping()
    r.save(tmp_path / "seg.nii.gz")
    lab = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
    side = json.loads((tmp_path / "seg.json").read_text())
    assert side["overlap_rule"] == OVERLAP_RULE and "later" in OVERLAP_RULE
    ids = {label: int(i) for i, label in side["labels"].items()}
    assert ids == {"a": 1, "b": 2, "c": 3, "d": 4}
    for label, i in ids.items():
        assert side["map_voxels"][label] == int(np.count_nonzero(lab == i))  # the sidecar describes this map
        later = np.zeros(SHAPE, bool)
        for other, j in ids.items():
            if j > i:
                later |= r.masks[other]
        # what the map lost of each mask is exactly what later prompts covered
        assert side["voxels"][label] - side["map_voxels"][label] == int(np.count_nonzero(r.masks[label] & later))
    assert sum(side["map_voxels"].values()) == int(np.count_nonzero(lab))
    expected = [
        {"labels": [x, y], "voxels": int(np.count_nonzero(r.masks[x] & r.masks[y]))}
        for x, y in (("a", "b"), ("a", "c"), ("b", "c"))
    ]
    assert all(e["voxels"] > 0 for e in expected)
    assert side["overlaps"] == expected  # pairs with no shared voxel (anything with "d") are not listed
    assert side["files"] == {"label_map": "seg.nii.gz", "sidecar": "seg.json", "probabilities": None, "preview": None}


def test_label_map_keeps_probabilities_and_a_rerun_removes_stale_files(tmp_path):
    r = _three_overlapping(probabilities=True)
    r.save(tmp_path / "seg.nii.gz", preview=True)
    assert sorted(os.listdir(tmp_path)) == ["seg.json", "seg.nii.gz", "seg.png", "seg_prob.nii.gz"]
    prob = nib.load(tmp_path / "seg_prob.nii.gz")
    assert prob.shape == SHAPE + (4,) and prob.get_data_dtype() == np.float32
    data = np.asarray(prob.dataobj)
    for i, label in json.loads((tmp_path / "seg.json").read_text())["labels"].items():
        np.testing.assert_array_equal(data[..., int(i) - 1], r.probabilities[label])  # 4th axis = id - 1
    np.testing.assert_allclose(prob.affine, r.affine)
    # a rerun without probabilities or preview: their old files must not stay next to the new map
    SegmentationResult({"x": r.masks["a"]}, r.affine).save(tmp_path / "seg.nii.gz")
    assert sorted(os.listdir(tmp_path)) == ["seg.json", "seg.nii.gz"]
    assert json.loads((tmp_path / "seg.json").read_text())["labels"] == {"1": "x"}


def test_label_map_and_sidecar_are_written_together_or_not_at_all(tmp_path, monkeypatch):
    r = _three_overlapping(probabilities=True)
    r.save(tmp_path / "seg.nii.gz")
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}

    def boom(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(result_files, "_save_probabilities_4d", boom)  # after the map, before the sidecar
    with pytest.raises(KeyboardInterrupt):
        _three_overlapping(probabilities=True, random_weights=True).save(tmp_path / "seg.nii.gz")
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before


def test_label_map_refuses_a_foreign_sidecar(tmp_path):
    (tmp_path / "seg.json").write_text('{"mine": true}')
    with pytest.raises(OutputError, match="seg.json exists and was not written by segevol_fast"):
        _three_overlapping().save(tmp_path / "seg.nii.gz")
    assert os.listdir(tmp_path) == ["seg.json"]


@pytest.mark.parametrize("random", [True, False])
def test_provenance_in_summary_and_nifti_headers(tmp_path, random):
    prompts = describe_prompts(
        ["liver"], np.array([[1, 2, 3, 4, 5, 6]]), torch.tensor([[2.0, 3.0, 4.0]]), np.array([1]), "voxel"
    )
    r = _three_overlapping(
        probabilities=True,
        source="/data/ct.nii.gz",
        prompts=prompts,
        weights_source=None if random else "/w/SegVol",
        random_weights=random,
    )
    out = r.save(tmp_path / "out")
    s = json.loads((out / "summary.json").read_text())
    assert s["writer"] == "segevol_fast" and s["package_version"] == __import__("segevol_fast").__version__
    assert s["source"] == "/data/ct.nii.gz" and s["random_weights"] is random
    assert s["weights_source"] == (None if random else "/w/SegVol")
    assert s["prompts"] == {
        "text": ["liver"],
        "box": [[1, 2, 3, 4, 5, 6]],
        "points": [[2.0, 3.0, 4.0]],
        "point_labels": [1],
        "coords": "voxel",
    }
    r.save(tmp_path / "lm.nii.gz")
    for f in ("a.nii.gz", "a_prob.nii.gz"):
        descrip = nib.load(out / f).header["descrip"].item().decode()
        assert descrip.startswith("segevol_fast ") and ("RANDOM WEIGHTS" in descrip) is random
    for f in ("lm.nii.gz", "lm_prob.nii.gz"):
        assert ("RANDOM WEIGHTS" in nib.load(tmp_path / f).header["descrip"].item().decode()) is random
    assert json.loads((tmp_path / "lm.json").read_text())["random_weights"] is random
    assert ("RANDOM WEIGHTS" in repr(r)) is random


def _banner_red(img):
    px = np.asarray(img)[:BANNER_PX]
    return np.all(px == np.asarray(BANNER_RGB, np.uint8), axis=-1).mean()


def test_preview_banner_for_random_weights_and_scan_background(tmp_path):
    from PIL import Image

    scan = np.random.default_rng(0).normal(0, 100, SHAPE).astype(np.int16)
    rnd = _three_overlapping(random_weights=True, volume=scan)
    real = _three_overlapping(random_weights=False, volume=scan)
    assert rnd.volume is scan  # a reference, not a copy
    img_r = Image.open(rnd.preview(tmp_path / "r.png"))
    img_k = Image.open(real.preview(tmp_path / "k.png"))
    assert img_r.size[1] == img_k.size[1] + BANNER_PX
    assert _banner_red(img_r) > 0.5 and _banner_red(img_k) < 0.05  # the banner, and only when random

    # the default background is the scan kept in the result; volume=False draws on black
    def grey_levels(img):  # distinct grey values in the first tile (overlays are coloured, text is white)
        px = np.asarray(img)[PAD_PX + 20 : PAD_PX + 150, PAD_PX : PAD_PX + 200].astype(int)  # below the "k=" text
        grey = (px[..., 0] == px[..., 1]) & (px[..., 1] == px[..., 2])
        return set(np.unique(px[..., 0][grey]).tolist())

    assert len(grey_levels(img_k)) > 20  # the scan
    assert grey_levels(Image.open(real.preview(tmp_path / "b.png", volume=False))) == {0}
    np.testing.assert_array_equal(
        np.asarray(Image.open(real.preview(tmp_path / "e.png", volume=scan))), np.asarray(img_k)
    )
    with pytest.raises(ResultError, match="shape"):
        _three_overlapping(volume=np.zeros((2, 2, 2)))
    assert "volume" not in real.summary() and "scan" not in repr(real).lower()


def test_segment_records_provenance_and_keeps_the_scan(data_dir, one_thread):
    from segevol_fast import SegVol, SegVolConfig, Volume, segment

    torch.manual_seed(0)
    model = SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer").eval()
    arr = np.random.default_rng(0).normal(0, 200, (40, 36, 20)).astype(np.float32)
    vol = Volume(arr, np.eye(4))
    with pytest.warns(UserWarning, match="meaningless"):
        res = segment(model, vol, box=[4, 4, 2, 20, 20, 10], zoom_in=False, progress=False)
    assert res.volume is vol.array and res.random_weights is True and res.weights_source is None
    assert res.source == "array" and res.prompts["box"] == [4, 4, 2, 20, 20, 10]
    assert res.prompts["text"] is None and res.prompts["coords"] == "voxel"
    model.weights_source = "/w/SegVol"
    res = segment(model, vol, box=[4, 4, 2, 20, 20, 10], zoom_in=False, progress=False)
    assert res.random_weights is False and res.weights_source == "/w/SegVol"


# ---------------------------------------------------------------------- CLI
@pytest.fixture
def nothing_slow(monkeypatch):
    """Fail the test if the CLI loads a volume, looks for weights or builds a model."""

    def never(*a, **kw):
        raise AssertionError("the output path must be checked before any slow step")

    monkeypatch.setattr(cli_segment, "build_model", never)
    monkeypatch.setattr(cli_demo, "build_model", never)
    monkeypatch.setattr(cli_demo, "demo_input", never)
    monkeypatch.setattr("segevol_fast.io.load_volume", never)
    monkeypatch.setattr("segevol_fast.model.weights.find_weights", never)


@pytest.mark.parametrize("command", ["segment", "demo"])
@pytest.mark.parametrize("where", ["below a file", "/proc"])
def test_cli_unwritable_out_fails_first(tmp_path, nothing_slow, capsys, command, where):
    (tmp_path / "afile").write_text("x")
    out = str(tmp_path / "afile" / "out") if where == "below a file" else "/proc/segevol_out"
    argv = [command, "--out", out, "--random-weights", "-q"]
    if command == "segment":
        argv[1:1] = [str(tmp_path / "scan.nii.gz"), "--box", "1", "1", "1", "3", "3", "3"]
    assert cli.main(argv) == cli.EXIT_FAILED  # before any slow step: `nothing_slow` fails the test otherwise
    err = capsys.readouterr().err
    assert "afile is a file" in err if where == "below a file" else "cannot write into /proc" in err
    assert os.listdir(tmp_path) == ["afile"]


def test_default_output_names(tmp_path, monkeypatch):
    (tmp_path / "series 7").mkdir()
    (tmp_path / "series 7" / "IM0001.dcm").write_bytes(b"")
    (tmp_path / "ct.NII.GZ").write_bytes(b"")
    assert cli_segment.input_stem(str(tmp_path / "ct.NII.GZ")) == "ct"
    assert cli_segment.input_stem(str(tmp_path / "series 7")) == "series_7"
    assert cli_segment.input_stem(str(tmp_path / "series 7" / "IM0001.dcm")) == "series_7"  # a file of the series
    monkeypatch.chdir(tmp_path / "series 7")
    assert cli_segment.input_stem(".") == "series_7"  # not '', which would make the output segevol_out itself


# ---------------------------------------------------------------------- output path forms
@pytest.mark.parametrize("name", ["x.png", "x.JPG", "x.json", "x.dcm", "x.tar.gz", "x.npy"])
def test_a_file_name_of_another_kind_is_refused_with_the_accepted_forms(tmp_path, name):
    with pytest.raises(OutputError) as info:
        _three_overlapping().save(tmp_path / name)
    msg = str(info.value)
    assert name in msg and "a folder" in msg and ".nii / .nii.gz path for one label map" in msg
    assert os.listdir(tmp_path) == []  # nothing made, no folder called x.png


def test_every_accepted_output_form_still_works(tmp_path):
    r = _three_overlapping()
    for folder in ("out", "run.v2", "2024.06"):  # a dot in a folder name that is no file kind
        assert (r.save(tmp_path / folder) / "summary.json").is_file()
    (tmp_path / "made.png").mkdir()  # an existing (empty) folder stays a folder whatever its name
    assert (r.save(tmp_path / "made.png") / "summary.json").is_file()
    for label_map in ("m.nii", "m2.nii.gz", "M3.NII.GZ"):
        r.save(tmp_path / label_map)
        assert (tmp_path / label_map).is_file()


# ---------------------------------------------------------------------- unwritable preview paths
def test_preview_into_an_unwritable_place_names_the_path_given(tmp_path):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_folder").mkdir()
    cases = [
        (tmp_path / "a_file" / "p.png", "a_file is a file, not a folder"),
        (tmp_path / "a_folder", "it is a folder; give a file name"),
    ]
    if os.path.isdir("/proc"):  # no file can be created there, not even by root
        cases.append((pathlib.Path("/proc/segevol_preview.png"), "no file can be created in the folder /proc"))
    for path, why in cases:
        with pytest.raises(OutputError) as info:
            _three_overlapping().preview(path)
        msg = str(info.value)
        assert msg.startswith(f"cannot write {path}: ") and why in msg and ".tmp" not in msg, msg
    assert sorted(os.listdir(tmp_path)) == ["a_file", "a_folder"] and os.listdir(tmp_path / "a_folder") == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_preview_into_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(OutputError, match=f"cannot write {ro / 'p.png'}: .*no file can be created in the folder"):
        _three_overlapping().preview(ro / "p.png")


# ---------------------------------------------------------------------- file modes
@pytest.fixture
def umask_007():
    old = os.umask(0o007)
    yield 0o666 & ~0o007
    os.umask(old)


def test_every_output_file_gets_a_normal_files_mode(tmp_path, umask_007, tiny_model):
    from segevol_fast import adapters
    from segevol_fast.adapters import LoraConfig
    from segevol_fast.model.checkpoint import save_safetensors

    r = _three_overlapping(probabilities=True)
    r.save(tmp_path / "folder", preview=True)
    r.save(tmp_path / "lm" / "seg.nii.gz", preview=True)
    tiny_model.save_pretrained(tmp_path / "pretrained")
    adapters.add_lora(tiny_model, "mr", LoraConfig(rank=2))
    adapters.save_adapter(tiny_model, "mr", tmp_path / "adapters" / "mr.safetensors")
    save_safetensors({"w": torch.zeros(3)}, tmp_path / "weights.safetensors")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {
        "a.nii.gz",
        "a_prob.nii.gz",
        "label_map.nii.gz",
        "summary.json",
        "preview.png",
        "seg.nii.gz",
        "seg.json",
        "seg_prob.nii.gz",
        "seg.png",
        "mr.safetensors",
        "weights.safetensors",
        "model.safetensors",
        "config.json",
        "tokenizer.json",
    } <= names
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(umask_007)}, modes
