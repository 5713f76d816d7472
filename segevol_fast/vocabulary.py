"""Structure names SegVol is known to have been trained on, and warnings for prompts outside them.

SegVol's text prompts are CLIP embeddings of "A computerized tomography of a {name}.", and the
model only learned the names its training datasets used, spelled as they spelled them (text
prompting is sensitive to wording: "gallbladder" and "gall bladder" are different prompts).

Source: docs/official-pipeline.md §8 ("Categories"). SegVol ships no master list;
the names below are every name that section lists or quotes (the AbdomenCT-12organ defaults of
`train_data_process.py`, `config/config_demo.json`, and the per-dataset examples of M3D-Seg's
`dataset_info.py`), normalised to lower case. This is the KNOWN SUBSET, not the full list of 222
unique training names, which the reference does not contain. A name outside it may still work;
`check_names` therefore warns (`VocabularyWarning`), it never refuses.
"""

from __future__ import annotations

import difflib
import re
import warnings
from typing import Iterable, Optional

from .errors import VocabularyWarning

# source (as the reference names it) -> names, in the reference's order and spelling (lower-cased)
SOURCES: dict[str, tuple[str, ...]] = {
    "AbdomenCT-12organ (train_data_process.py defaults)": (
        "liver",
        "right kidney",
        "spleen",
        "pancreas",
        "aorta",
        "inferior vena cava",
        "right adrenal gland",
        "left adrenal gland",
        "gallbladder",
        "esophagus",
        "stomach",
        "duodenum",
        "left kidney",
    ),
    "config/config_demo.json": ("liver", "kidney", "spleen", "pancreas"),
    "CHAOS": ("liver",),
    "HaN-Seg (examples)": ("optic chiasm", "parotid gland left"),
    "AMOS22 (examples)": ("postcava", "prostate or uterus"),
    "AbdomenCT-1K": ("liver", "kidney", "spleen", "pancreas"),
    "KiTS23": ("kidney", "kidney tumor", "kidney cyst"),
    "KiPA22": ("renal vein", "kidney", "renal artery", "tumor"),
    "3D-IRCADb (examples)": ("liver kyste", "liver tumor 03"),
    "TotalSegmentator (examples)": ("vertebrae l3", "rib left 7", "heart myocardium"),
    "VerSe19/20 (examples)": ("lumbar spine l4",),
    "QUBIQ": ("kidney", "pancreas", "pancreatic lesion"),
    "MSD (examples)": ("colon cancer", "hepatic vessels", "tumour", "lung tumours"),
    "LUNA16": ("left lung", "right lung", "trachea"),
    "spelling variants quoted in §8": ("gall bladder", "gallbladder", "kidney left", "left kidney", "tumour", "tumor"),
}

NAMES: frozenset[str] = frozenset(n for names in SOURCES.values() for n in names)


def normalize(name: str) -> str:
    """Lower case, surrounding and repeated whitespace removed: the form NAMES is stored in."""
    return re.sub(r"\s+", " ", str(name).strip().lower())


def is_known(name: str) -> bool:
    return normalize(name) in NAMES


def suggestions(name: str, n: int = 3) -> list[str]:
    """Known names closest to `name` ("kidney_left" -> "kidney left", ...)."""
    key = normalize(name).replace("_", " ").replace("-", " ")
    return difflib.get_close_matches(key, sorted(NAMES), n=n, cutoff=0.6)


def check_names(names: Optional[Iterable[str]], stacklevel: int = 2) -> list[str]:
    """Warn (VocabularyWarning) once per call about every text prompt outside NAMES; return them.

    Non-string entries are ignored here: argument checking reports them with a typed error.
    """
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in dict.fromkeys(names) if isinstance(n, str) and not is_known(n)]
    if unknown:
        parts = []
        for n in unknown:
            close = suggestions(n)
            parts.append(f"{n!r}" + (f" (closest known: {', '.join(map(repr, close))})" if close else ""))
        warnings.warn(
            f"text prompt(s) {'; '.join(parts)} not among the {len(NAMES)} structure names known from SegVol's "
            "training data (this list is a known subset; see `segevol-fast vocabulary`). SegVol is sensitive to "
            "the exact wording: the mask may be poor. Prefer a listed name, or add a box or points.",
            VocabularyWarning,
            stacklevel=stacklevel + 1,
        )
    return unknown


def format_vocabulary() -> str:
    """The list, grouped by source, for `segevol-fast vocabulary`."""
    lines = [
        f"{len(NAMES)} structure names known from SegVol's training data (a known subset of its 222; "
        "source: docs/official-pipeline.md §8). Other names may work, with a warning.",
        "",
    ]
    lines += [f"{src}:\n  " + ", ".join(names) for src, names in SOURCES.items()]
    lines += ["", "all, sorted:", "  " + "\n  ".join(sorted(NAMES))]
    return "\n".join(lines)
