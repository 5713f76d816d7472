"""Where the benchmarks find the shared real volumes, and the abdominal structures they prompt.

The data folder comes from SEGEVOL_DATA, default ../shared/data beside the repository, as for the
tests. The structure names are TotalSegmentator's for the shared abdominal CT, in the order the
benchmarks take them (the first N for an N-organ case), so every benchmark prompts the same organs.
"""

from __future__ import annotations

import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("SEGEVOL_DATA", REPO.parent / "shared" / "data"))
ABDOMINAL_ORGANS = [
    "liver",
    "spleen",
    "left kidney",
    "right kidney",
    "stomach",
    "pancreas",
    "gallbladder",
    "aorta",
    "inferior vena cava",
    "esophagus",
    "duodenum",
    "colon",
    "urinary bladder",
    "left adrenal gland",
    "right adrenal gland",
]
