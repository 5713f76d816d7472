"""DICOM-SEG output: a DICOM input's result folder holds segmentation.dcm, which highdicom and
pydicom read back as the same masks on the source slices."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("highdicom")

import highdicom as hd  # noqa: E402
import pydicom  # noqa: E402

from segevol_fast.inference import segment  # noqa: E402
from segevol_fast.io.dicom_seg import frames, sorted_source_images  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dicom_input_gets_a_dicom_seg_that_reads_back(tiny_model, data_dir, tmp_path):
    src = data_dir / "ct_abdomen_dicom"
    res = segment(tiny_model, src, text=["liver", "spleen"], zoom_in=False, progress=False)
    out = res.save(tmp_path / "out")
    assert res.summary()  # and the folder's summary names the file
    import json

    assert json.loads((out / "summary.json").read_text())["dicom_seg"] == "segmentation.dcm"
    ds = pydicom.dcmread(out / "segmentation.dcm")
    assert ds.Modality == "SEG" and [s.SegmentLabel for s in ds.SegmentSequence] == ["liver", "spleen"]
    seg = hd.seg.segread(out / "segmentation.dcm")
    uids = [s.SOPInstanceUID for s in sorted_source_images(src)]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2])
    for i, label in enumerate(["liver", "spleen"]):
        np.testing.assert_array_equal(pixels[..., i].astype(bool), frames(res.masks[label]))
        assert res.masks[label].any()


def test_nifti_input_gets_no_dicom_seg(tiny_model, ct, tmp_path):
    res = segment(tiny_model, ct, text="liver", zoom_in=False, progress=False)
    out = res.save(tmp_path / "out")
    assert not (out / "segmentation.dcm").exists()
