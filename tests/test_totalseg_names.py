"""TotalSegmentator `total` names in our legends: the table against TS v2's published ids, the prompt
spellings that must (and must not) map, and the legend of a written label map."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segevol_fast.inference.result import SegmentationResult
from segevol_fast.totalseg_names import TOTAL_V2, totalseg_id, totalseg_legend, totalseg_name


def test_table_has_the_117_total_classes_at_their_ids():
    assert len(TOTAL_V2) == 117 and len(set(TOTAL_V2)) == 117
    # spot checks across every run of the table (ids as TotalSegmentator v2 numbers them)
    known = {
        "spleen": 1,
        "kidney_left": 3,
        "liver": 5,
        "esophagus": 15,
        "urinary_bladder": 21,
        "prostate": 22,
        "sacrum": 25,
        "vertebrae_S1": 26,
        "vertebrae_L5": 27,
        "vertebrae_L1": 31,
        "vertebrae_T12": 32,
        "vertebrae_C1": 50,
        "heart": 51,
        "aorta": 52,
        "inferior_vena_cava": 63,
        "iliac_vena_right": 68,
        "spinal_cord": 79,
        "brain": 90,
        "skull": 91,
        "rib_left_1": 92,
        "rib_left_12": 103,
        "rib_right_1": 104,
        "rib_right_12": 115,
        "sternum": 116,
        "costal_cartilages": 117,
    }
    assert {name: totalseg_id(name) for name in known} == known
    with pytest.raises(KeyError):
        totalseg_id("heart_myocardium")  # a TS v1 class, not in v2 `total`


def test_every_ts_name_maps_to_itself_and_from_plain_english():
    for name in TOTAL_V2:
        assert totalseg_name(name) == name
        assert totalseg_name(name.upper().replace("_", " ")) == name
        words = name.split("_")
        if words[-1] in ("left", "right") and words[0] != "rib":  # "left kidney" word order
            assert totalseg_name(" ".join([words[-1], *words[:-1]])) == name


@pytest.mark.parametrize(
    "label, expected",
    [
        ("left kidney", "kidney_left"),
        ("Right Adrenal Gland", "adrenal_gland_right"),
        ("postcava", "inferior_vena_cava"),
        ("gall bladder", "gallbladder"),
        ("bladder", "urinary_bladder"),
        ("vertebrae L3", "vertebrae_L3"),
        ("lumbar spine L4", "vertebrae_L4"),
        ("rib left 7", "rib_left_7"),
        ("left 7th rib", "rib_left_7"),
        ("right iliac vein", "iliac_vena_right"),
        ("left clavicle", "clavicula_left"),
        ("costal cartilage", "costal_cartilages"),
        ("left lung upper lobe", "lung_upper_lobe_left"),
        # no such `total` class, or not one structure: no entry rather than a near miss
        ("kidney", None),
        ("kidney tumor", None),
        ("heart myocardium", None),
        ("prostate or uterus", None),
        ("left right kidney", None),
        ("rib 7", None),
        ("box 0", None),
        ("liver tumor 03", None),
    ],
)
def test_prompt_spellings(label, expected):
    assert totalseg_name(label) == expected


def test_written_legend_names_ts_classes_where_a_label_matches(tmp_path):
    shape = (6, 5, 4)
    masks = {}
    for i, label in enumerate(["left kidney", "kidney tumor", "liver"]):
        m = np.zeros(shape, bool)
        m[i * 2 : i * 2 + 2] = True
        masks[label] = m
    r = SegmentationResult(masks, np.eye(4))
    expected = {"1": {"name": "kidney_left", "id": 3}, "3": {"name": "liver", "id": 5}}
    r.save(tmp_path / "seg.nii.gz")
    assert json.loads((tmp_path / "seg.json").read_text())["totalsegmentator_total"] == expected
    out = r.save(tmp_path / "folder")
    legend = json.loads((out / "summary.json").read_text())["label_map"]
    assert legend["labels"] == {"1": "left kidney", "2": "kidney tumor", "3": "liver"}
    assert legend["totalsegmentator_total"] == expected
    assert totalseg_legend(legend["labels"]) == expected
