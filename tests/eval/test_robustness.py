"""The robustness evaluation (`segevol_fast.eval.robustness`) on a tiny random model and two tiny
phantom cases: the rows it produces, the prompts it draws, resume, TTA and the plot."""

from __future__ import annotations

import json
import pathlib
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.errors import AdapterError, ArgumentTypeError, InvalidArgumentError, MissingDependencyError
from segevol_fast.eval import PUBLISHED, RobustnessReport, Rotation, robustness, rotate_probabilities, rotate_scan
from segevol_fast.eval.tta import rotate_box, rotate_points, segment_with_tta
from segevol_fast.io import Volume
from segevol_fast.train.cases import cases_from_files
from segevol_fast.train.metrics import dice
from segevol_fast.train.validation import organ_box
from tests.inference.test_cohort import save_test_lora

robustness_module = sys.modules["segevol_fast.eval.robustness"]

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:model weights are random")]

ORGANS = {1: "liver", 2: "spleen"}
AFFINE = np.diag([1.5, 1.2, 3.0, 1.0])  # anisotropic: rotations are in millimetres, not voxels
PROMPTS = ("text", "box", "points", "text+box", "text+points")
FAST = dict(zoom_in=False, progress=False)


def write_blob_cases(folder: pathlib.Path, shape=(32, 28, 10), shift: int = 3) -> list:
    """Two CT-like NIfTI cases (a body ellipse with two brighter blobs, labelled 1 and 2), the
    second with its blobs moved by `shift` voxels; and their `Case`s."""
    folder.mkdir(parents=True, exist_ok=True)
    g = np.indices(shape).astype(float)
    pairs = []
    for n, d in enumerate((0, shift)):
        image = np.full(shape, -1000, np.int16)
        labels = np.zeros(shape, np.int16)
        image[((g[0] - 16) / 15) ** 2 + ((g[1] - 14) / 13) ** 2 < 1] = 0
        first = ((g[0] - 9 - d) / 4) ** 2 + ((g[1] - 14) / 4) ** 2 + ((g[2] - 5) / 3) ** 2 < 1
        second = ((g[0] - 22 + d) / 4) ** 2 + ((g[1] - 13 - d) / 5) ** 2 + ((g[2] - 5) / 3) ** 2 < 1
        image[first], image[second] = 60, 150
        labels[first], labels[second] = 1, 2
        paths = (folder / f"case{n}.nii.gz", folder / f"case{n}_labels.nii.gz")
        nib.save(nib.Nifti1Image(image, AFFINE), paths[0])
        nib.save(nib.Nifti1Image(labels, AFFINE), paths[1])
        pairs.append(paths)
    return cases_from_files(pairs, ORGANS, "ct", folder.name)


def tiny_model(tokenizer) -> SegVol:
    """The random tiny SegVol of seed 0 (what `--random-weights --config tiny` builds)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return SegVol(SegVolConfig.tiny(), tokenizer=tokenizer).eval()


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return write_blob_cases(tmp_path_factory.mktemp("blobs"))


@pytest.fixture(scope="module")
def model(data_dir):
    return tiny_model(data_dir / "clip_tokenizer")


@pytest.fixture
def opened(model, monkeypatch) -> list:
    """The scans a session is opened on, in order (the model's session() is wrapped)."""
    scans = []
    real = model.session

    def session(volume, **kwargs):
        scans.append(volume)
        return real(volume, **kwargs)

    monkeypatch.setattr(model, "session", session)
    return scans


def _z(deg: float) -> Rotation:
    return Rotation(f"z{deg:+g}", (0.0, 0.0, deg))


# ---------------------------------------------------------------------------------- rows
def test_rows_cover_every_prompt_type_and_perturbation(model, cases, opened):
    rotations = [PUBLISHED, _z(30)]
    report = robustness(model, cases, rotations=rotations, box_jitter=(3,), point_jitter=(2,), **FAST)
    kinds = {(r["perturbation"], r["setting"], r["prompt"]) for r in report.rows}
    expected = {("none", "none", p) for p in PROMPTS} | {("rotation", r.name, p) for r in rotations for p in PROMPTS}
    expected |= {("box_jitter", "3", p) for p in ("box", "text+box")}
    expected |= {("point_jitter", "2", p) for p in ("points", "text+points")}
    assert kinds == expected
    assert not report.skipped  # the blobs lie well inside the grid
    assert len(report.rows) == len(cases) * len(ORGANS) * len(expected)
    assert {(r["case"], r["organ"]) for r in report.rows} == {(c.case_id, o) for c in cases for o in ORGANS.values()}
    assert all(0.0 <= r["dice"] <= 1.0 for r in report.rows)
    published = next(r for r in report.rows if r["setting"] == "published")
    z30 = next(r for r in report.rows if r["setting"] == "z+30")
    jitter = next(r for r in report.rows if r["perturbation"] == "box_jitter")
    assert (published["axis"], published["angle_deg"], published["voxels"]) == ("xyz", None, None)
    assert (z30["axis"], z30["angle_deg"], z30["voxels"]) == ("z", 30.0, None)
    assert (jitter["axis"], jitter["angle_deg"], jitter["voxels"]) == (None, None, 3)
    # one session per (case, rotation): the unperturbed one also serves both jitters
    assert len(opened) == len(cases) * (1 + len(rotations))
    for s in report.summary:
        if s["perturbation"] == "none":
            assert s["drop"] == 0.0
        assert s["n"] == len(cases) * len(ORGANS)


def test_a_row_scores_what_segment_returns(model, cases):
    report = robustness(model, cases[:1], rotations=(), box_jitter=(), point_jitter=(), prompts=["box"], **FAST)
    labels = np.asarray(nib.load(cases[0].label).dataobj)
    for row in report.rows:
        truth = labels == {v: k for k, v in ORGANS.items()}[row["organ"]]
        mask = model.segment(str(cases[0].image), box=organ_box(truth), zoom_in=False, progress=False).masks["box 0"]
        assert row["dice"] == dice(mask, truth)


def test_a_summary_drop_is_paired_with_the_unperturbed_rows():
    rows = [
        {"case": "a", "organ": "liver", "perturbation": "none", "setting": "none", "prompt": "text", "dice": 0.9},
        {"case": "a", "organ": "spleen", "perturbation": "none", "setting": "none", "prompt": "text", "dice": 0.3},
        {"case": "a", "organ": "liver", "perturbation": "rotation", "setting": "z+90", "prompt": "text", "dice": 0.8},
    ]
    for r in rows:
        r.update(axis=None, angle_deg=None, voxels=None)
    rotated = next(s for s in RobustnessReport(rows).summary if s["setting"] == "z+90")
    assert rotated["n"] == 1 and rotated["dice"] == 0.8
    assert rotated["drop"] == pytest.approx(0.1)  # the spleen it lost is no part of the drop


def test_an_organ_the_rotation_carries_off_the_grid_is_skipped_and_counted(model, tmp_path):
    # a grid long in x and short in y: the blob at large x turned by 90 degrees about z leaves it
    shape = (40, 12, 6)
    g = np.indices(shape).astype(float)
    far = ((g[0] - 34) / 3) ** 2 + ((g[1] - 6) / 3) ** 2 + ((g[2] - 3) / 2) ** 2 < 1
    near = ((g[0] - 20) / 3) ** 2 + ((g[1] - 6) / 3) ** 2 + ((g[2] - 3) / 2) ** 2 < 1
    image = (20 * g[0] + np.where(far, 300, 0) + np.where(near, 600, 0)).astype(np.int16)
    labels = (1 * far + 2 * near).astype(np.int16)
    for name, arr in (("image", image), ("labels", labels)):
        nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / f"{name}.nii.gz")
    case = cases_from_files([(tmp_path / "image.nii.gz", tmp_path / "labels.nii.gz")], ORGANS, "ct", "long")
    report = robustness(model, case, rotations=[_z(90)], box_jitter=(), point_jitter=(), prompts=["box"], **FAST)
    assert report.skipped == [{"case": "image", "organ": "liver", "setting": "z+90"}]
    assert report.skipped_counts() == {"z+90": 1}
    assert {(r["setting"], r["organ"]) for r in report.rows} == {
        ("none", "liver"),
        ("none", "spleen"),
        ("z+90", "spleen"),
    }
    assert "skipped" in report.table()


def test_a_rotation_by_zero_degrees_equals_none_for_text(model, cases):
    report = robustness(model, cases, rotations=[_z(0)], box_jitter=(), point_jitter=(), prompts=["text"], **FAST)
    by = {(r["case"], r["organ"], r["setting"]): r["dice"] for r in report.rows}
    assert len(by) == 2 * len(cases) * len(ORGANS)
    for c in cases:
        for organ in ORGANS.values():
            assert by[(c.case_id, organ, "z+0")] == by[(c.case_id, organ, "none")]


# ---------------------------------------------------------------------------------- prompts
def test_jitter_draws_are_seeded_and_reproducible(model, cases, monkeypatch):
    drawn: list = []

    def spy(real):
        def wrapped(value, voxels, rng, shape):
            out = real(value, voxels, rng, shape)
            drawn.append((real.__name__, voxels, np.asarray(value).tolist(), out.tolist()))
            return out

        return wrapped

    monkeypatch.setattr(robustness_module, "jitter_box", spy(robustness_module.jitter_box))
    monkeypatch.setattr(robustness_module, "jitter_points", spy(robustness_module.jitter_points))
    settings = dict(rotations=(), box_jitter=(4,), point_jitter=(3,), prompts=["box", "points", "text+box"], **FAST)

    def run(seed):
        drawn.clear()
        rows = robustness(model, cases, seed=seed, **settings).rows
        return rows, list(drawn)

    rows, draws = run(0)
    again, same = run(0)
    assert rows == again and draws == same
    assert {d[0] for d in draws} == {"jitter_box", "jitter_points"}
    boxes = [d for d in draws if d[0] == "jitter_box"]
    assert len(boxes) == len(cases) * len(ORGANS)  # one draw per organ: "box" and "text+box" share it
    assert any(d[2] != d[3] for d in draws)  # the jitter moves something
    assert all(np.abs(np.subtract(d[3], d[2])).max() <= d[1] for d in draws)
    _, other = run(1)
    for kind in ("jitter_box", "jitter_points"):  # each jitter follows the seed
        assert [d[3] for d in other if d[0] == kind] != [d[3] for d in draws if d[0] == kind]


def test_prompts_follow_the_rotated_labels(model, cases, monkeypatch):
    boxes: list = []
    real = robustness_module.RotatedViews.segment

    def segment(self, text=None, box=None, **kwargs):
        if box is not None:
            boxes.append((self.image, np.asarray(box)))
        return real(self, text=text, box=box, **kwargs)

    monkeypatch.setattr(robustness_module.RotatedViews, "segment", segment)
    rotation = _z(30)
    robustness(model, cases[:1], rotations=[rotation], box_jitter=(), point_jitter=(), prompts=["box"], **FAST)
    (stored, plain), (turned, rotated) = boxes
    labels = np.asarray(nib.load(cases[0].label).dataobj)
    image = np.asarray(nib.load(cases[0].image).dataobj)
    affine = nib.load(cases[0].image).affine  # AFFINE as the header stores it, in float32
    expected_image, expected_labels = rotate_scan(image, affine, rotation, labels)
    assert np.array_equal(turned, expected_image)
    assert rotated.tolist() == [organ_box(expected_labels == i).tolist() for i in ORGANS]
    assert plain.tolist() == [organ_box(labels == i).tolist() for i in ORGANS]


# ---------------------------------------------------------------------------------- resume
def test_resume_skips_finished_cases_and_refuses_changed_settings(model, cases, opened, tmp_path):
    settings = dict(rotations=[_z(30)], box_jitter=(2,), point_jitter=(), prompts=["text", "box"], **FAST)
    out = tmp_path / "out"
    first = robustness(model, cases, out_dir=out, **settings)
    assert sorted(p.name for p in (out / "cases").iterdir()) == [f"{c.case_id}.json" for c in cases]
    assert len(opened) == 2 * len(cases)

    # a run stopped during the second case: only the second runs again
    (out / "cases" / f"{cases[1].case_id}.json").unlink()
    kept = (out / "cases" / f"{cases[0].case_id}.json").stat().st_mtime_ns
    opened.clear()
    resumed = robustness(model, cases, out_dir=out, **settings)
    second = np.asarray(nib.load(cases[1].image).dataobj)
    assert len(opened) == 2 and np.array_equal(opened[0].array, second)  # its scan as stored, then rotated
    assert (out / "cases" / f"{cases[0].case_id}.json").stat().st_mtime_ns == kept
    assert resumed.rows == first.rows
    assert (out / "robustness.csv").read_text().count("\n") == len(first.rows) + 1

    opened.clear()
    with pytest.raises(InvalidArgumentError, match="box_jitter.*restart=True"):
        robustness(model, cases, out_dir=out, **{**settings, "box_jitter": (3,)})
    assert not opened  # refused before any case ran
    again = robustness(model, cases, out_dir=out, restart=True, **{**settings, "box_jitter": (3,)})
    assert len(opened) == 2 * len(cases)
    assert {r["setting"] for r in again.rows if r["perturbation"] == "box_jitter"} == {"3"}
    saved = json.loads((out / "robustness.json").read_text())
    assert saved["settings"]["box_jitter"] == [3] and len(saved["rows"]) == len(again.rows)


def test_a_reordered_case_list_is_refused(model, cases, tmp_path):
    settings = dict(rotations=(), box_jitter=(), point_jitter=(), prompts=["box"], out_dir=tmp_path, **FAST)
    robustness(model, cases, **settings)
    with pytest.raises(InvalidArgumentError, match="case list changed"):
        robustness(model, cases[::-1], **settings)


# ---------------------------------------------------------------------------------- TTA
def test_tta_of_one_view_equals_no_tta(model, cases):
    settings = dict(rotations=[_z(30)], box_jitter=(2,), point_jitter=(), prompts=["text", "box"], **FAST)
    assert robustness(model, cases[:1], tta=1, **settings).rows == robustness(model, cases[:1], **settings).rows


def test_tta_opens_a_session_per_view_and_scores_every_prompt(model, cases, opened):
    settings = dict(rotations=[_z(30)], box_jitter=(2,), point_jitter=(2,), prompts=["box", "text+points"], **FAST)
    report = robustness(model, cases[:1], tta=3, **settings)
    assert len(opened) == 3 * 2  # three views of the scan as stored, three of the rotated one
    assert len(report.rows) == len(ORGANS) * (2 + 2 + 1 + 1) and all(0 <= r["dice"] <= 1 for r in report.rows)
    assert report.settings["tta"] == 3


def test_tta_averages_the_views_turned_back(model, cases):
    image = np.asarray(nib.load(cases[0].image).dataobj)
    fused = segment_with_tta(model, image, AFFINE, text=["liver", "spleen"], k=2, zoom_in=False, modality="ct")
    half = _z(180)
    probs = []
    for rotation in (_z(0), half):
        scan = rotate_scan(image, AFFINE, rotation)[0] if rotation is half else image
        res = model.session(Volume(scan, AFFINE, modality="ct")).segment(
            text=["liver", "spleen"], zoom_in=False, return_probabilities=True
        )
        p = np.stack([res.probabilities[n] for n in ("liver", "spleen")])
        probs.append(rotate_probabilities(p, AFFINE, half.matrix().T) if rotation is half else p)
    expected = (probs[0] + probs[1]) / 2 > 0.5
    assert list(fused) == ["liver", "spleen"]
    assert np.array_equal(np.stack(list(fused.values())), expected)


def test_tta_rotates_points_and_boxes_with_the_content(fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    shape = (30, 26, 12)
    centre = rng.integers((11, 9, 4), (19, 17, 8))
    g = np.indices(shape).astype(float)
    blob = sum(((g[a] - centre[a]) * AFFINE[a, a] / 4.5) ** 2 for a in range(3)) < 1
    rotation = Rotation("r", tuple(rng.uniform(-40, 40, size=3)))
    _, turned = rotate_scan(np.zeros(shape, np.float32), AFFINE, rotation, blob)
    assert turned.any()
    moved = rotate_points([centre], AFFINE, shape, rotation)[0]
    assert np.abs(moved - np.argwhere(turned).mean(axis=0)).max() < 1.0  # the blob's centre goes where its voxels go
    box = rotate_box(organ_box(blob), AFFINE, shape, rotation)
    inside = np.argwhere(turned)
    assert (inside >= np.floor(box[:3]) - 1).all() and (inside <= np.ceil(box[3:]) + 1).all()


# ---------------------------------------------------------------------------------- outputs
def test_the_plot_is_a_png_and_needs_matplotlib(model, cases, tmp_path, monkeypatch):
    report = robustness(
        model,
        cases[:1],
        rotations=[PUBLISHED, _z(-15), _z(15)],
        box_jitter=(1, 3),
        point_jitter=(2,),
        prompts=["box", "points"],
        **FAST,
    )
    report.plot(tmp_path / "r.png")
    png = (tmp_path / "r.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(tmp_path / "r.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
    report.to_csv(tmp_path / "r.csv")
    header, *lines = (tmp_path / "r.csv").read_text().splitlines()
    assert header == "case,organ,perturbation,setting,axis,angle_deg,voxels,prompt,dice" and len(lines) == len(
        report.rows
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(MissingDependencyError, match="pip install"):
        report.plot(tmp_path / "again.png")
    with pytest.raises(MissingDependencyError, match="pip install"):  # before any case runs
        robustness(model, cases, out_dir=tmp_path / "out", **FAST)
    assert not (tmp_path / "again.png").exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(prompts=["text", "lasso"]), InvalidArgumentError, "'lasso' is not one"),
        (dict(prompts=["box", "box"]), InvalidArgumentError, "distinct"),
        (dict(box_jitter=(5, -1)), InvalidArgumentError, "box_jitter must be >= 0"),
        (dict(point_jitter=(1.5,)), ArgumentTypeError, "point_jitter must be whole numbers"),
        (dict(cases=[]), InvalidArgumentError, "cases is empty"),
        (dict(cases="case0"), ArgumentTypeError, "list of Case"),
        (dict(points=0), InvalidArgumentError, "points must be an int >= 1"),
        (dict(tta=0), InvalidArgumentError, "tta must be >= 1"),
        (dict(rotations=[_z(5), _z(5)]), InvalidArgumentError, "distinct"),
        (dict(rotations=["z+5"]), ArgumentTypeError, "Rotation objects"),
        (dict(seed=-1), InvalidArgumentError, "seed must be an int >= 0"),
        (dict(precision="fp8"), InvalidArgumentError, "precision must be one of"),
        (dict(adapter="nowhere"), AdapterError, "no adapter named 'nowhere'"),
    ],
)
def test_bad_arguments_fail_before_any_case_runs(model, cases, opened, change, error, words):
    kwargs = {"cases": cases, **FAST, **change}
    with pytest.raises(error, match=words):
        robustness(model, **kwargs)
    assert not opened


def test_text_prompts_need_a_tokenizer(cases):
    with pytest.raises(InvalidArgumentError, match="tokenizer"):
        robustness(tiny_model(None), cases, prompts=["box", "text+box"], **FAST)


def test_an_adapter_file_runs_for_the_evaluation_and_is_detached_after(data_dir, cases, tmp_path):
    model = tiny_model(data_dir / "clip_tokenizer")
    path = save_test_lora(model, tmp_path / "lora.safetensors")
    settings = dict(rotations=(), box_jitter=(), point_jitter=(), prompts=["box"], **FAST)
    with_file = robustness(model, cases[:1], adapter=str(path), **settings)
    assert adapters.adapter_names(model) == []
    assert with_file.settings["adapter"]["sha256"] and with_file.rows != robustness(model, cases[:1], **settings).rows
    name = adapters.load_adapter(model, path, activate=False)
    assert robustness(model, cases[:1], adapter=name, **settings).rows == with_file.rows
