"""TotalSegmentator's `total` class names, and which prompt label means which of them.

Viewers, pipelines and papers that already use TotalSegmentator (TS) address structures by its v2
`total` task names ("kidney_left", "vertebrae_L3", id 1..117). Our label maps keep ids in prompt
order (a prompt set is not a fixed class list), so the legend adds, for every label that names a TS
`total` class, that class's name and id; a label that matches none gets no entry, never a guess.

Matching is by normalised words, not by fuzzy similarity: lower case, "-"/"_" as spaces, a side word
("left"/"right") anywhere moved to where TS puts it, a few spelling aliases (SegVol's training sets
say "postcava", "gall bladder", "lumbar spine L4"; TS says "inferior_vena_cava", "gallbladder",
"vertebrae_L4"), and singular/plural of the last word. "kidney tumor" or "prostate or uterus" match
nothing. The table is TotalSegmentator v2's `total` task (117 classes, ids in this order).
"""

from __future__ import annotations

import re
from typing import Optional


def _total_v2() -> tuple[str, ...]:
    # ids 1..117 in order; the long runs (vertebrae, ribs) are spelled out by loops
    names = [
        "spleen",
        "kidney_right",
        "kidney_left",
        "gallbladder",
        "liver",
        "stomach",
        "pancreas",
        "adrenal_gland_right",
        "adrenal_gland_left",
        "lung_upper_lobe_left",
        "lung_lower_lobe_left",
        "lung_upper_lobe_right",
        "lung_middle_lobe_right",
        "lung_lower_lobe_right",
        "esophagus",
        "trachea",
        "thyroid_gland",
        "small_bowel",
        "duodenum",
        "colon",
        "urinary_bladder",
        "prostate",
        "kidney_cyst_left",
        "kidney_cyst_right",
        "sacrum",
        "vertebrae_S1",
    ]
    names += [f"vertebrae_L{i}" for i in range(5, 0, -1)]
    names += [f"vertebrae_T{i}" for i in range(12, 0, -1)]
    names += [f"vertebrae_C{i}" for i in range(7, 0, -1)]
    names += [
        "heart",
        "aorta",
        "pulmonary_vein",
        "brachiocephalic_trunk",
        "subclavian_artery_right",
        "subclavian_artery_left",
        "common_carotid_artery_right",
        "common_carotid_artery_left",
        "brachiocephalic_vein_left",
        "brachiocephalic_vein_right",
        "atrial_appendage_left",
        "superior_vena_cava",
        "inferior_vena_cava",
        "portal_vein_and_splenic_vein",
        "iliac_artery_left",
        "iliac_artery_right",
        "iliac_vena_left",
        "iliac_vena_right",
        "humerus_left",
        "humerus_right",
        "scapula_left",
        "scapula_right",
        "clavicula_left",
        "clavicula_right",
        "femur_left",
        "femur_right",
        "hip_left",
        "hip_right",
        "spinal_cord",
        "gluteus_maximus_left",
        "gluteus_maximus_right",
        "gluteus_medius_left",
        "gluteus_medius_right",
        "gluteus_minimus_left",
        "gluteus_minimus_right",
        "autochthon_left",
        "autochthon_right",
        "iliopsoas_left",
        "iliopsoas_right",
        "brain",
        "skull",
    ]
    names += [f"rib_{side}_{i}" for side in ("left", "right") for i in range(1, 13)]
    names += ["sternum", "costal_cartilages"]
    return tuple(names)


TOTAL_V2: tuple[str, ...] = _total_v2()
"""TotalSegmentator v2 `total` class names; the class id is the index + 1."""

_BY_KEY = {name.lower(): name for name in TOTAL_V2}
_SIDES = ("left", "right")
# whole-phrase spellings used by SegVol's training sets (or common usage) -> TS's words
_ALIASES = {
    "postcava": "inferior vena cava",
    "ivc": "inferior vena cava",
    "gall bladder": "gallbladder",
    "bladder": "urinary bladder",
    "small intestine": "small bowel",
    "thyroid": "thyroid gland",
    "oesophagus": "esophagus",
    "whole heart": "heart",
    "adrenal": "adrenal gland",
}
# single words TS spells differently
_WORDS = {"clavicle": "clavicula", "iliac vein": "iliac vena", "hip bone": "hip"}
_SPINE = re.compile(r"^(?:lumbar|thoracic|cervical|sacral) (?:spine|vertebrae?) ([lstc]\d{1,2})$")
_VERTEBRA = re.compile(r"^vertebrae? ([lstc]\d{1,2})$|^([lstc]\d{1,2}) vertebrae?$")
_RIB = re.compile(r"^(?:(\d{1,2})(?:st|nd|rd|th)? )?rib(?: (\d{1,2})(?:st|nd|rd|th)?)?$")


def _words(label: str) -> str:
    text = re.sub(r"[\s_\-]+", " ", label.strip().lower())
    return _ALIASES.get(text, text)


def _candidates(text: str) -> list[str]:
    """TS-style keys `text` may stand for, most literal first."""
    words = text.split()
    sides = [w for w in words if w in _SIDES]
    rest = " ".join(w for w in words if w not in _SIDES)
    rest = _ALIASES.get(rest, rest)
    if len(sides) > 1:
        return []  # "left right kidney" names no one structure
    side = sides[0] if sides else None
    m = _SPINE.match(rest) or _VERTEBRA.match(rest)
    if m and side is None:
        return ["vertebrae_" + next(g for g in m.groups() if g)]
    m = _RIB.match(rest)
    if m and side is not None and (m.group(1) or m.group(2)) and not (m.group(1) and m.group(2)):
        return [f"rib_{side}_{int(m.group(1) or m.group(2))}"]
    for word, ts in _WORDS.items():
        rest = re.sub(rf"\b{word}\b", ts, rest)
    stems = [rest]
    if rest.endswith("s"):
        stems.append(rest[:-1])
    else:
        stems.append(rest + "s")
    keys = []
    for stem in stems:
        key = stem.replace(" ", "_")
        keys.append(f"{key}_{side}" if side else key)
    return keys


def totalseg_name(label: str) -> Optional[str]:
    """The TotalSegmentator `total` class `label` names ("left kidney" -> "kidney_left"), or None."""
    if not isinstance(label, str):
        return None
    for key in _candidates(_words(label)):
        name = _BY_KEY.get(key.lower())
        if name is not None:
            return name
    return None


def totalseg_id(name: str) -> int:
    """The `total` class id (1..117) of a TS class name; KeyError for a name not in the table."""
    return TOTAL_V2.index(_BY_KEY[name.lower()]) + 1


def totalseg_legend(labels: dict[str, str]) -> dict[str, dict]:
    """{id: {"name": TS name, "id": TS id}} for the legend's ids whose label names a TS `total`
    class (`labels` is the legend's {id: label}); ids whose label matches none are left out."""
    out = {}
    for key, label in labels.items():
        name = totalseg_name(label)
        if name is not None:
            out[key] = {"name": name, "id": totalseg_id(name)}
    return out
