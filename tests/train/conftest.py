"""Shared training-test material: the real abdominal CT and MR of the shared data as `Case` lists."""

from __future__ import annotations

import json

import pytest

from segevol_fast.train.cases import cases_from_files


@pytest.fixture(scope="session")
def abdomen_cases(data_dir) -> dict:
    """{"ct": [the CT case], "mr": [the MR case]}, each with its label map from labels.json."""
    maps = json.loads((data_dir / "labels.json").read_text())
    return {
        modality: cases_from_files(
            [(data_dir / f"{stem}.nii.gz", data_dir / f"{stem}_labels.nii.gz")], maps[key], modality, key + "_sm"
        )
        for modality, key, stem in (("ct", "ct", "ct_abdomen_sm"), ("mri", "mr", "mr_abdomen_sm"))
    }
