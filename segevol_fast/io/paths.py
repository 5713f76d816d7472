"""What kind of file a path names, by its name alone: shared by the readers and the output checks."""

from __future__ import annotations

import os
from typing import Union

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: Union[str, os.PathLike]) -> bool:
    """True when the name ends in .nii or .nii.gz (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)
