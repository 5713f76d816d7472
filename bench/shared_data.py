"""Where the benchmarks find the shared real volumes, and the abdominal structures they prompt.

The data folder comes from SEGEVOL_DATA, default ../shared/data beside the repository, as for the
tests. The structure names are TotalSegmentator's for the shared abdominal CT, in the order the
benchmarks take them (the first N for an N-organ case), so every benchmark prompts the same organs.
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional

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


def resampled(volume, shape, dtype: Optional[str] = None):
    """`volume` (a `Volume`) resampled trilinearly to `shape` (X, Y, Z) voxels over the same field
    of view: its affine scaled, voxel centres where torch's align_corners=False puts them. The
    array is float32, or `dtype` (e.g. the stored int16, rounded toward zero as numpy casts)."""
    import numpy as np
    import torch

    from segevol_fast import Volume

    image = torch.from_numpy(np.asarray(volume.array, dtype=np.float32))[None, None]
    array = torch.nn.functional.interpolate(image, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0]
    array = array.numpy() if dtype is None else array.numpy().astype(dtype)
    scale = np.asarray(volume.array.shape, dtype=np.float64) / np.asarray(shape)
    to_old = np.diag([*scale, 1.0])
    to_old[:3, 3] = (scale - 1) / 2  # new voxel i sits at old (i + 0.5) * scale - 0.5
    return Volume(array, volume.affine @ to_old, modality=volume.modality, source=f"{volume.source} {tuple(shape)}")
