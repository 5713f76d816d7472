"""bench/fast_agreement.py: its pipeline at --quick size on tiny models (the real run takes about
half an hour; the results decide fast mode's default approximations), the ten-window resampling and
the defaults verdict."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import fast_agreement, fast_agreement_report
from segevol_fast import SegVol, SegVolConfig
from segevol_fast.io import Volume

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_run_records_every_variant_and_none_encodes_the_official_zoom_in(tmp_path, data_dir):
    SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer").save_pretrained(tmp_path / "small" / "model")
    out = tmp_path / "agreement.json"
    argv = ["--quick", "--cases", "ct10", "--models", "full", "small", "--small-model", str(tmp_path / "small")]
    assert fast_agreement.main(argv + ["--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["model"], r["seed"]) for r in result["runs"]] == [("small", None), ("full", 0)]
    for run in result["runs"]:
        part = run["cases"]["ct10"]
        assert part["shape"] == [15, 16, 41]  # ten tiny windows along z, one in-plane
        records = {r["variant"]: r for r in part["variants"]}
        assert list(records) == list(fast_agreement.VARIANTS)
        exact, none = records["exact"], records["none"]
        assert exact["mode"] == "exact" and exact["speed_ratio"] == 1.0
        assert set(exact["dice_vs_exact"].values()) == {1.0} and set(none["dice_vs_none"].values()) == {1.0}
        assert exact["dice_vs_none"] == none["dice_vs_exact"]
        assert none["windows_encoded"] == none["windows_official"] > 0
        assert none["tokens_encoded"] == none["tokens_official"] > 0
        assert none["approximations"]["overlap"] == 0.5 and not none["approximations"]["skip_empty"]
        assert records["overlap 0"]["approximations"]["overlap"] == 0.0
        assert not records["overlap 0"]["approximations"]["token_subset"]
        for r in records.values():
            assert r["windows_encoded"] <= r["windows_official"] and r["seconds"] > 0
            assert 0 <= min(r["dice_vs_exact"].values()) <= 1 and r["prob_abs_diff_max"]["liver"] >= 0
    assert len(result["table"]) == 2 * len(fast_agreement.VARIANTS)
    assert set(result["verdict"]) == set(fast_agreement.ALONE)
    md = out.with_suffix(".md").read_text()
    assert "| small (trained) | ct10 | none |" in md and "Defaults verdict" in md


def test_a_chosen_variant_runs_with_exact_and_none_only(tmp_path):
    out = tmp_path / "agreement.json"
    argv = ["--quick", "--cases", "ct", "--models", "full", "--variants", "overlap 0", "--out", str(out)]
    assert fast_agreement.main(argv) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert [r["variant"] for r in run["cases"]["ct"]["variants"]] == ["exact", "none", "overlap 0"]


def test_resampling_keeps_the_field_of_view():
    rng = np.random.default_rng()
    affine = np.eye(4)
    affine[:3, :3] = np.diag(rng.uniform(0.5, 3.0, 3)) @ np.linalg.qr(rng.normal(size=(3, 3)))[0]
    affine[:3, 3] = rng.normal(scale=50, size=3)
    volume = Volume(rng.normal(size=(12, 10, 9)).astype(np.float32), affine)
    new = fast_agreement.resampled(volume, (7, 15, 20))
    assert new.array.shape == (7, 15, 20)
    for old_corner, new_corner in (([-0.5] * 3, [-0.5] * 3), ([11.5, 9.5, 8.5], [6.5, 14.5, 19.5])):
        assert np.allclose(affine @ [*old_corner, 1], new.affine @ [*new_corner, 1])
    assert fast_agreement.window_scaled(fast_agreement.TEN_WINDOWS, SegVolConfig().spatial_size) == (120, 126, 164)


def _record(variant: str, dice: float) -> dict:
    return {"variant": variant, "dice_vs_exact": {"liver": 1.0, "spleen": dice}, "dice_vs_none": {"liver": 0.5}}


@pytest.mark.parametrize(
    "trained, random, on",
    [(0.995, 0.985, True), (0.985, 0.999, False), (0.999, 0.975, False), (0.99, 0.98, True)],
)
def test_an_approximation_is_on_by_default_only_within_both_bounds(trained, random, on):
    def run(model, dice):
        return {"model": model, "cases": {"ct": {"variants": [_record("skip empty", dice), _record("none", 0.1)]}}}

    out = {"alone": ["skip empty"], "runs": [run("small", trained), run("full", random), run("full", 1.0)]}
    least = {"trained": trained, "random": random, "trained_vs_none": 0.5, "random_vs_none": 0.5}
    assert fast_agreement_report.verdict(out) == {"skip empty": {**least, "on": on}}
    assert fast_agreement_report.verdict({**out, "runs": out["runs"][1:]})["skip empty"]["on"] == (random >= 0.98)


def test_box_prompts_are_the_labels_bounding_boxes_and_results_are_scored_against_the_labels():
    truth = fast_agreement.case_labels("ct", ("liver", "spleen"))
    (box_liver, box_spleen) = fast_agreement.case_prompts("ct", ("liver", "spleen"), "box")["box"]
    for mask, box in zip(truth, (box_liver, box_spleen)):
        lo, hi = box[:3].astype(int), box[3:].astype(int)
        inside = mask[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
        assert inside.sum() == mask.sum() > 0  # the box holds the whole organ...
        for axis in range(3):  # ...and touches it on every side
            assert inside.any(axis=tuple(a for a in range(3) if a != axis))[[0, -1]].all()
    assert fast_agreement.case_labels("ct10", ("liver",)) is None  # resampled: not the labels' grid

    class Res:
        masks = {"box 0": truth[0], "box 1": np.zeros_like(truth[1])}
        probabilities = {k: v.astype(np.float32) for k, v in masks.items()}

    scored = fast_agreement.agreement(Res, Res, Res, truth)
    assert scored["dice_vs_labels"] == {"box 0": 1.0, "box 1": 0.0}
