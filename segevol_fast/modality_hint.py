"""Warn when an input looks like MRI but text prompts would run with the CT template.

The modality only chooses the text template ("A computerized tomography of a {}." for CT). A DICOM
series says its modality (tag Modality, CT/MR) and `load_volume` already uses it; a NIfTI file says
nothing, so an MRI passed without `modality="mri"` (`--modality mri`) silently gets the CT template.
Its file name usually tells: "mr_abdomen.nii.gz", "sub-01_T1w.nii.gz", "case3_flair.nii.gz".
"""

from __future__ import annotations

import pathlib
import re
import warnings
from typing import Optional

from .errors import ModalityWarning

# whole name tokens (split on anything not a letter or digit) that mark a magnetic-resonance scan
MR_TOKENS = frozenset(
    {"mr", "mri", "mrt", "t1", "t2", "t1w", "t2w", "t1c", "t1ce", "t1gd", "flair", "dwi", "adc", "pdw", "swi"}
)


def mr_name_token(source: Optional[str]) -> Optional[str]:
    """The first MR token in the last component of `source` (a file or folder path), else None."""
    if not source:
        return None
    name = pathlib.PurePath(str(source)).name.lower()
    name = re.sub(r"\.nii(\.gz)?$", "", name)
    return next((t for t in re.split(r"[^a-z0-9]+", name) if t in MR_TOKENS), None)


def warn_if_mri(volume, requested: Optional[str], has_text: bool, stacklevel: int = 2) -> Optional[str]:
    """Warn (ModalityWarning) when text prompts will use the CT template for an input whose name says MR.

    Silent when the caller chose a modality, when the volume's header gave one (DICOM Modality is
    used as is), or when there are no text prompts (the modality changes nothing else).
    Returns the token that triggered the warning, or None.
    """
    if requested is not None or getattr(volume, "modality", None) is not None or not has_text:
        return None
    token = mr_name_token(getattr(volume, "source", None))
    if token is not None:
        warnings.warn(
            f"{volume.source} looks like an MRI (file name token {token!r}) but no modality was given: text prompts "
            "use the CT template ('A computerized tomography of a ...'). Pass modality='mri' (--modality mri) for "
            "the MRI template, or modality='ct' to keep CT and silence this warning.",
            ModalityWarning,
            stacklevel=stacklevel + 1,
        )
    return token
