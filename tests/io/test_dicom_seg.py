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


# ---------------------------------------------------------------------- which series a SEG references
SLICES = 6  # of the shared series, enough for a 3-D grid and a quick segment()


def _copy_series(data_dir, folder, n, prefix="", new_uid=None):
    """The first `n` slices of the shared series into `folder`; with `new_uid`, as a series of that
    SeriesInstanceUID with fresh instance UIDs. Returns the SOPInstanceUIDs written."""
    from pydicom.uid import generate_uid

    uids = set()
    for f in sorted((data_dir / "ct_abdomen_dicom").iterdir())[:n]:
        ds = pydicom.dcmread(f)
        if new_uid is not None:
            ds.SeriesInstanceUID = new_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SeriesDescription = "second"
        uids.add(str(ds.SOPInstanceUID))
        ds.save_as(folder / f"{prefix}{f.name}")
    return uids


@pytest.fixture(params=["same geometry", "other geometry"])
def series_and_copy(request, data_dir, tmp_path):
    """A folder holding the shared series and a second series copied from it (new UIDs) whose files
    sort after the first's: with the same grid, or with fewer slices. Returns (folder, second
    series' UID, its SOPInstanceUIDs)."""
    folder = tmp_path / "two_series"
    folder.mkdir()
    _copy_series(data_dir, folder, SLICES)
    uid = "1.2.826.0.1.3680043.8.498.77"
    n = SLICES if request.param == "same geometry" else SLICES - 2
    return folder, uid, _copy_series(data_dir, folder, n, prefix="z_", new_uid=uid)


def _referenced(seg_path) -> set:
    seg = hd.seg.segread(seg_path)
    return {sop for _study, _series, sop in seg.get_source_image_uids()}


def test_dicom_seg_references_the_series_segmented(tiny_model, series_and_copy, tmp_path):
    folder, uid, wanted = series_and_copy
    res = segment(tiny_model, folder, series=uid, box=[100, 100, 1, 300, 300, 3], zoom_in=False, progress=False)
    out = res.save(tmp_path / "out")
    referenced = _referenced(out / "segmentation.dcm")
    assert referenced == wanted  # every slice of the chosen series, and none of the other
    assert res.series == uid and res.summary()["series"] == uid
    seg = hd.seg.segread(out / "segmentation.dcm")
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[s.SOPInstanceUID for s in sorted_source_images(folder, uid)], segment_numbers=[1]
    )
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), frames(res.masks["box 0"]))


def test_dicom_seg_refuses_to_guess_among_series(series_and_copy):
    from segevol_fast.errors import DicomSeriesError

    folder, uid, _ = series_and_copy
    with pytest.raises(DicomSeriesError, match="holds 2 series"):
        sorted_source_images(folder)
    with pytest.raises(DicomSeriesError, match="9.9, the one the masks were computed on, is no longer in"):
        sorted_source_images(folder, "9.9")


# ---------------------------------------------------------------------- source gone at save time
def test_dicom_seg_not_written_when_the_source_is_gone_says_so(tiny_model, data_dir, tmp_path):
    import json
    import shutil

    from segevol_fast.errors import OutputWarning

    folder = tmp_path / "scan"
    folder.mkdir()
    _copy_series(data_dir, folder, SLICES)
    res = segment(tiny_model, folder, box=[100, 100, 1, 300, 300, 3], zoom_in=False, progress=False)
    shutil.rmtree(folder)
    with pytest.warns(OutputWarning, match=r"segmentation.dcm \(DICOM-SEG\) was not written: .*scan is gone"):
        out = res.save(tmp_path / "out")
    assert (out / "box_0.nii.gz").is_file() and (out / "label_map.nii.gz").is_file()
    assert not (out / "segmentation.dcm").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dicom_seg"] is None and str(folder) in summary["dicom_seg_not_written"]
    assert summary["dicom_seg_not_written"] in summary["notes"]
    assert res.notes == []  # saving records it in the output, not in the result
