"""bench/adaptation_study.py at --quick size (the real run is ~37 min; docs/benchmarks.md): every
method attaches, trains, evaluates on CT, the adaptation MRI and the held-out MRI and lands in the
report; seeds are summarised per cell; the learned router's decisions and the real-inference
(segment) Dice of the held-out volumes are reported; a saved base is reused. Also the pieces on
their own: the brain hemispheres, the held-out split and the statistics over seeds."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from bench.study_data import brain_hemispheres, study_data
from bench.study_report import kept, over_seeds, spread
from tests.conftest import REPO

STUDY_FILES = (
    "mr_brain_mni152_t1.nii.gz",
    "mr_brain_mni152_gm.nii.gz",
    "mr_brain_mni152_wm.nii.gz",
    "mr_spine_t1.nii.gz",
    "mr_spine_t2_cord.nii.gz",
)
METHODS = {"lora", "bottleneck", "mixture_tag", "mixture_top1", "priors_additive", "priors_hermes", "lora_ct_mr"}
SETS = {"ct", "mr_fit", "mr_heldout"}


@pytest.fixture
def study_dir(data_dir):
    missing = [f for f in STUDY_FILES if not (data_dir / f).exists()]
    if missing:
        pytest.skip(f"the study's MRI volumes are missing from {data_dir}: {missing}")
    return data_dir


def _run(args, data_dir, out):
    cmd = [sys.executable, str(REPO / "bench" / "adaptation_study.py"), "--quick", "--out", str(out), "--results", ""]
    env = {"SEGEVOL_DATA": str(data_dir), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd + args + ["-q"], capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # ~2-3 min on 2 cores
def test_study_runs_every_method_then_seeds_router_and_segment(tmp_path, study_dir):
    out = tmp_path / "study"
    first = _run(["--no-segment-eval"], study_dir, out)
    assert "estimate: ~" in first.stdout and "base:" in first.stdout
    report = json.loads((out / "study.json").read_text())
    assert set(report["methods"]) == METHODS
    assert report["protocol"]["seeds"] == [0] and report["protocol"]["steps_per_method"] == 2
    assert report["args"]["threads"] == 1  # the shared 2-core VM: one thread is the fast setting
    assert report["methods"]["lora_ct_mr"]["trained_on"] == "ct+mr" and report["methods"]["lora"]["trained_on"] == "mr"
    for name, r in report["methods"].items():
        assert r["trainable_parameters"] > 0, name
        run = r["runs"]["0"]
        assert set(run["resized"]) == SETS and "segment" not in run
        for dice in run["resized"].values():
            assert set(dice) == {"text", "box", "jittered_box"}
            assert all(0.0 <= v <= 1.0 for v in dice.values())
        assert set(run["resized_per_organ"]["mr_heldout"]) == {"spinal cord", "gray matter", "white matter"}
        assert ("router" in run) == name.startswith("mixture"), name
    tag = report["methods"]["mixture_tag"]["runs"]["0"]["router"]
    assert tag["ct"]["ct"]["identity"] == 1.0 and tag["mr_heldout"]["mri"]["moa/mr"] == 1.0  # its tags
    assert (out / "base" / "config.json").exists()

    # the saved base is reused; two seeds are summarised per cell; the held-out volumes are segmented
    again = _run(["--seeds", "2", "--methods", "mixture_top1"], study_dir, out)
    assert "base:" not in again.stdout
    report = json.loads((out / "study.json").read_text())
    r = report["methods"]["mixture_top1"]
    assert set(r["runs"]) == {"0", "1"} and report["protocol"]["seeds"] == [0, 1]
    cell = r["summary"]["resized"]["mr_heldout"]["box"]
    assert cell["values"] == [r["runs"][s]["resized"]["mr_heldout"]["box"] for s in ("0", "1")]
    assert cell["min"] <= cell["mean"] <= cell["max"]
    assert set(report["base"]["segment"]["mr_heldout"]) == {"text", "box", "point"}
    assert set(r["summary"]["segment"]["mr_heldout"]) == {"text", "box", "point"}
    routed = r["runs"]["0"]["router"]
    for name, modality in (("ct", "ct"), ("mr_fit", "mri"), ("mr_heldout", "mri")):
        share = routed[name][modality]
        assert share["images"] >= 1
        assert math.isclose(share["identity"] + share["moa/a"] + share["moa/b"], 1.0)


def test_brain_hemispheres_split_at_the_midline(tmp_path, study_dir):
    (left, left_labels), (right, right_labels) = brain_hemispheres(study_dir, tmp_path)
    for image, labels, side in ((left, left_labels, -1), (right, right_labels, 1)):
        img, lab = nib.load(str(image)), nib.load(str(labels))
        assert img.shape == lab.shape and np.allclose(img.affine, lab.affine)
        assert np.allclose(np.abs(np.diag(img.affine)[:3]), 2.0)  # 2 mm voxels
        assert set(np.unique(np.asarray(lab.dataobj)).tolist()) == {0, 1, 2}
        # every voxel centre lies on its own side of x = 0 mm (RAS)
        xs = [img.affine[0] @ [i, 0, 0, 1] for i in (0, img.shape[0] - 1)]
        assert all(side * x > 0 for x in xs), (side, xs)


def test_the_held_out_volumes_are_not_adapted_on(tmp_path, study_dir):
    data = study_data(study_dir, tmp_path)
    adapt = {c.image.name for c in data.adapt}
    heldout = {c.image.name for c in data.heldout}
    assert heldout == {"mr_spine_t1.nii.gz", "mni152_right_2mm.nii.gz"}
    assert not adapt & heldout and "mr_abdomen_sm.nii.gz" in adapt
    assert all(c.modality == "ct" for c in data.ct) and all(c.modality == "mri" for c in data.adapt + data.heldout)


def test_statistics_over_seeds():
    cell = spread([0.2, 0.4, math.nan])
    assert cell["mean"] == pytest.approx(0.3) and cell["std"] == pytest.approx(0.1)
    assert (cell["min"], cell["max"]) == (0.2, 0.4) and len(cell["values"]) == 3
    nested = over_seeds([{"ct": {"box": 0.5}}, {"ct": {"box": 0.7}}])
    assert nested["ct"]["box"]["mean"] == pytest.approx(0.6)
    assert kept({"text": 0.1, "box": 0.2}, {"text": 0.2, "box": 0.4}) == pytest.approx(0.5)
    assert math.isnan(kept({"box": 0.2}, {"box": 0.0}))


@pytest.mark.slow  # ~30 s on 2 cores
def test_given_weights_every_method_starts_from_them_afresh(tmp_path, study_dir):
    _run(["--base-only"], study_dir, tmp_path / "trained")
    out = tmp_path / "given"
    args = ["--weights", str(tmp_path / "trained" / "base"), "--methods", "lora", "bottleneck", "--no-segment-eval"]
    proc = _run(args, study_dir, out)
    assert "base:" not in proc.stdout and not (out / "base").exists()  # loaded, not trained
    report = json.loads((out / "study.json").read_text())
    # each method holds its own adapter only: none stacked on the previous method's
    assert report["methods"]["bottleneck"]["trainable_parameters"] < report["methods"]["lora"]["trainable_parameters"]
