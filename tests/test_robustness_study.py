"""bench/small_model.py and bench/robustness_study.py: which structures the small model trains on,
its phases and report, and the robustness study's pipeline at --quick size on a tiny model (the
real runs take about an hour; docs/robustness.md, docs/benchmarks.md)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bench import robustness_study, small_model
from segevol_fast import SegVol, SegVolConfig


def test_small_model_keeps_exactly_the_structures_above_the_fraction(data_dir):
    names = json.loads((data_dir / "labels.json").read_text())
    cases = small_model.small_model_cases(data_dir)
    assert [c.case_id for c in cases] == ["ct_abdomen_sm", "ct_abdomen_dicom", "mr_abdomen_sm"]
    for case, (_, labels, _, key) in zip(cases, small_model.VOLUMES):
        ids, counts = np.unique(np.asarray(nib.load(str(data_dir / labels)).dataobj), return_counts=True)
        big = {int(i) for i, n in zip(ids, counts) if i and n >= small_model.MIN_FRACTION * counts.sum()}
        assert set(case.label_map) == big & {int(k) for k in names[key]}
        assert "liver" in case.label_map.values()
    # vertebra T12 covers 0.49% of the small CT: below the 0.5% kept, though present
    assert "vertebrae t12" not in cases[0].label_map.values()
    assert "vertebrae t12" in small_model.small_model_cases(data_dir, min_fraction=0.004)[0].label_map.values()


def test_phases_parse_and_bad_ones_are_refused():
    args = small_model.parse_args(["--phases", "10:1e-3", "5:5e-4", "--loo-phases", "3:2e-3"])
    assert args.phases == [(10, 1e-3), (5, 5e-4)] and args.loo_phases == [(3, 2e-3)]
    with pytest.raises(SystemExit):
        small_model.parse_args(["--phases", "10"])


@pytest.mark.parametrize(("flag", "trains"), ((None, True), ("trained", True), ("frozen", False)))
def test_the_random_text_tower_trains_unless_frozen(flag, trains):
    args = small_model.parse_args(["--quick"] + ([] if flag is None else ["--text-tower", flag]))
    model = small_model.untrained_model(args)
    small_model.set_trainable(model, args)
    tower = list(model.text_encoder.clip_text_model.parameters())
    assert tower and all(p.requires_grad == trains for p in tower)
    assert all(p.requires_grad for p in model.text_encoder.dim_align.parameters())
    assert all(p.requires_grad for p in model.image_encoder.parameters())


def test_training_record_reads_every_phase(tmp_path):
    for i, rows in ((1, ["250,0.1,0.0,0.2,0.1,26", "500,0.3,0.2,0.4,0.3,26"]), (2, ["250,0.5,0.4,0.6,0.5,26"])):
        (tmp_path / f"run_phase{i}").mkdir()
        (tmp_path / f"run_phase{i}" / "eval_log.csv").write_text(
            "step,dice,dice_text,dice_box,dice_jittered_box,labels\n" + "\n".join(rows) + "\n"
        )
        (tmp_path / f"phase{i}").mkdir()
        (tmp_path / f"phase{i}" / "train_seconds.txt").write_text(f"{100 * i}.0\n")
    record = small_model.training_record(tmp_path)
    assert list(record) == ["phase1", "phase2"]
    assert record["phase1"]["seconds"] == 100.0 and record["phase2"]["seconds"] == 200.0
    assert [r["step"] for r in record["phase1"]["curve"]] == [250.0, 500.0]
    assert record["phase2"]["curve"][0]["dice_text"] == 0.4
    small_model.curve_plot(record, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_the_report_scores_with_and_without_the_zoom_in(monkeypatch):
    seen = []

    def validation(model, cases, prompts, zoom_in):  # two structures, one of them a large organ
        seen.append(zoom_in)
        dice = 0.9 if zoom_in else 0.5
        rows = [
            {"case": "c", "label": "liver", "text": dice, "box": dice, "point": dice},
            {"case": "c", "label": "colon", "text": 0.1, "box": 0.1, "point": 0.1},
        ]
        return {"mean": {k: (dice + 0.1) / 2 for k in prompts}, "per_label": rows, "per_organ": {}}

    monkeypatch.setattr(small_model, "segment_validation", validation)
    report = small_model.scored(None, [])
    assert sorted(seen) == [False, True]
    assert report["large_organs"] == {"text": 0.9, "box": 0.9, "point": 0.9}
    assert report["zoom_out_only"]["large_organs"] == {"text": 0.5, "box": 0.5, "point": 0.5}
    assert report["per_case"]["c"]["colon"]["text"] == 0.1


def test_headline_separates_none_published_sweep_and_jitter():
    summary = [
        {"perturbation": "none", "setting": "none", "prompt": "text", "dice": 0.8},
        {"perturbation": "rotation", "setting": "published", "prompt": "text", "dice": 0.5},
        {"perturbation": "rotation", "setting": "z+45", "prompt": "text", "dice": 0.4},
        {"perturbation": "rotation", "setting": "z-45", "prompt": "text", "dice": 0.6},
        {"perturbation": "box_jitter", "setting": "10", "prompt": "box", "dice": 0.3},
    ]

    class Report:
        pass

    report = Report()
    report.summary = summary
    h = robustness_study.headline(report)
    assert h["none"] == {"text": 0.8} and h["published"] == {"text": 0.5}
    assert h["sweep"]["text"] == pytest.approx(0.5)
    assert h["box_jitter"] == {"10": {"box": 0.3}}


@pytest.mark.slow
def test_study_pipeline_at_quick_size_on_a_tiny_model(tmp_path, data_dir):
    model = SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer")
    model.save_pretrained(tmp_path / "small" / "model")
    out = tmp_path / "study"
    argv = ["--quick", "--model", str(tmp_path / "small"), "--out", str(out), "--results", "", "-q"]
    assert robustness_study.main(argv + ["--variants", "base", "tta", "branch_rot", "--tta", "2"]) == 0
    study = json.loads((out / "study.json").read_text())
    variants = study["variants"]
    assert list(variants) == ["base", "tta", "branch_rot"]
    for name, v in variants.items():
        jitter = set() if name == "tta" else {"box_jitter", "point_jitter"}  # TTA is scored on rotations only
        assert set(v["headline"]) == {"none", "published", "sweep"} | jitter, name
        assert (out / name / "robustness.csv").exists() and v["segment_seconds"] > 0
    assert variants["base"]["trainable_parameters"] == 0
    assert variants["branch_rot"]["trainable_parameters"] > 0
    assert (out / "branch_rot" / "adapter.safetensors").exists()
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun reuses the trained adapter and the finished cases: same costs, same Dice
    assert robustness_study.main(argv + ["--variants", "branch_rot"]) == 0
    again = json.loads((out / "study.json").read_text())["variants"]["branch_rot"]
    assert again["train_seconds"] == variants["branch_rot"]["train_seconds"]
    assert again["summary"] == variants["branch_rot"]["summary"]
