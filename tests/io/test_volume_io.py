"""Volume loading / saving on the shared real CT, MRI and DICOM data, plus arrays and error cases."""

from __future__ import annotations

import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from segevol_fast.errors import (
    DicomSeriesError,
    MissingDependencyError,
    SegVolFastError,
    ShapeError,
    VolumeError,
    VolumeFileError,
)
from segevol_fast.io import (
    Volume,
    load_dicom,
    load_volume,
    save_nifti,
)

pydicom = pytest.importorskip("pydicom")


# ----------------------------------------------------------------------------------- NIfTI
@pytest.mark.parametrize(
    "name, shape, dtype",
    [
        ("ct_abdomen_sm.nii.gz", (122, 101, 30), np.int16),
        ("mr_abdomen_sm.nii.gz", (117, 91, 20), np.int16),  # LPS on disk: must not be reoriented
        ("mr_brain_mni152_t1.nii.gz", (197, 233, 189), np.uint8),
    ],
)
def test_nifti_is_the_stored_voxel_array(data_dir, name, shape, dtype):
    img = nib.load(data_dir / name)
    vol = load_volume(data_dir / name)
    assert vol.shape == shape and vol.array.dtype == dtype
    np.testing.assert_array_equal(vol.array, np.asarray(img.dataobj))
    np.testing.assert_array_equal(vol.affine, img.affine)
    np.testing.assert_allclose(vol.spacing, img.header.get_zooms()[:3], rtol=1e-6)
    assert vol.source == str(data_dir / name) and vol.modality is None
    assert load_volume(str(data_dir / name), modality="MR").modality == "mri"


def test_voxel_world_round_trip(data_dir):
    vol = load_volume(data_dir / "mr_abdomen_sm.nii.gz")
    vox = np.array([[0, 0, 0], [116, 90, 19], [10.5, 3.25, 7.0]])
    world = vol.voxel_to_world(vox)
    np.testing.assert_allclose(world[0], vol.affine[:3, 3])
    np.testing.assert_allclose(vol.world_to_voxel(world), vox, atol=1e-9)
    assert vol.world_to_voxel(world[1]).shape == (3,)
    with pytest.raises(ShapeError):
        vol.world_to_voxel(np.zeros((4, 2)))


def test_nifti_scaling_and_4d(tmp_path):
    raw = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(1, -1024)
    nib.save(img, tmp_path / "int.nii.gz")
    vol = load_volume(tmp_path / "int.nii.gz")
    assert vol.array.dtype == np.int16  # integral scaling stays integral
    np.testing.assert_array_equal(vol.array, raw.astype(np.int32) - 1024)

    img.header.set_slope_inter(0.5, 1)
    nib.save(img, tmp_path / "float.nii")
    vol = load_volume(tmp_path / "float.nii")
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array, raw * 0.5 + 1)

    nib.save(nib.Nifti1Image(raw[..., None], np.eye(4)), tmp_path / "x1.nii.gz")
    assert load_volume(tmp_path / "x1.nii.gz").shape == (2, 3, 4)
    nib.save(nib.Nifti1Image(np.stack([raw, raw], -1), np.eye(4)), tmp_path / "x2.nii.gz")
    with pytest.raises(ShapeError):
        load_volume(tmp_path / "x2.nii.gz")
    nan = raw.astype(np.float32)
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(VolumeError):
        load_volume(tmp_path / "nan.nii.gz")


# ------------------------------------------------------------------------------------ save
def test_save_round_trip_is_atomic(tmp_path, monkeypatch):
    aff = np.array([[-0.8, 0, 0, 10], [0, 0.8, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    arr = np.asfortranarray(np.random.default_rng(0).integers(0, 5, (7, 6, 5)).astype(np.uint8))
    path = save_nifti(tmp_path / "sub" / "mask.nii.gz", arr, aff)
    vol = load_volume(path)
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-6)
    assert os.listdir(tmp_path / "sub") == ["mask.nii.gz"]  # no temporary left behind

    save_nifti(tmp_path / "b.nii", torch.ones(2, 3, 4, dtype=torch.bool), np.eye(4))
    assert load_volume(tmp_path / "b.nii").array.dtype == np.uint8

    # a failing write leaves the old file untouched and no temporary behind
    def broken_save(img, filename):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError):
        save_nifti(path, arr + 1, aff)
    monkeypatch.undo()
    np.testing.assert_array_equal(load_volume(path).array, arr)
    assert os.listdir(tmp_path / "sub") == ["mask.nii.gz"]

    with pytest.raises(VolumeFileError):
        save_nifti(tmp_path / "mask.nrrd", arr, aff)
    with pytest.raises(ShapeError):
        save_nifti(tmp_path / "m.nii", arr[0], aff)


# ----------------------------------------------------------------------------------- DICOM
def _dicom_dir(data_dir):
    return data_dir / "ct_abdomen_dicom"


def test_dicom_series_matches_converted_nifti_grid(data_dir):
    d = _dicom_dir(data_dir)
    labels = nib.load(data_dir / "ct_abdomen_dicom_labels.nii.gz")
    vol = load_volume(d)
    assert vol.shape == labels.shape == (512, 512, 20)
    np.testing.assert_allclose(vol.affine, labels.affine, atol=1e-3)
    assert vol.modality == "ct" and vol.array.dtype == np.int16
    assert vol.array.min() == -1024
    # orientation check through anatomy: contrast-filled aorta (52) is bright, liver (5) soft tissue
    lab = np.asarray(labels.dataobj)
    assert vol.array[lab == 52].mean() > 120
    assert 20 < vol.array[lab == 5].mean() < 150
    assert vol.array[:, ::-1][lab == 5].mean() < 0  # the unflipped row order would miss the liver
    # world position of voxel (0, rows-1, k) is slice k's ImagePositionPatient (LPS -> RAS)
    files = sorted(d.glob("*.dcm"))
    ipp = sorted(
        (np.array(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient, float) for f in files),
        key=lambda p: p[2],
    )
    for k in (0, 7, 19):
        np.testing.assert_allclose(vol.voxel_to_world([0, 511, k]), ipp[k] * [-1, -1, 1], atol=1e-4)
    # one file of the series loads the whole series
    one = load_volume(files[3])
    np.testing.assert_array_equal(one.array, vol.array)


def _copy_series(src, dst, files=None, relabel=None):
    dst.mkdir()
    for i, f in enumerate(sorted(src.glob("*.dcm"))):
        if files is not None and i not in files:
            continue
        if relabel is not None and i in relabel:
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = "1.2.3.4.5"
            ds.save_as(dst / f.name)
        else:
            shutil.copy(f, dst / f.name)


def test_dicom_several_series(data_dir, tmp_path):
    src = _dicom_dir(data_dir)
    _copy_series(src, tmp_path / "two", files=range(6), relabel={3, 4, 5})
    (tmp_path / "two" / "README.txt").write_text("not dicom")  # ignored like converters do
    with pytest.raises(DicomSeriesError, match="1.2.3.4.5"):
        load_volume(tmp_path / "two")
    vol = load_dicom(tmp_path / "two", series="1.2.3.4.5")
    assert vol.shape == (512, 512, 3)


def test_dicom_gap_and_missing_decoder(data_dir, tmp_path, monkeypatch):
    src = _dicom_dir(data_dir)
    _copy_series(src, tmp_path / "gap", files={0, 1, 2, 4, 5})
    with pytest.raises(DicomSeriesError, match="unevenly"):
        load_volume(tmp_path / "gap")

    import pydicom.pixels

    class NoDecoder:
        is_available = False

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: NoDecoder())
    with pytest.raises(MissingDependencyError, match=r"segevol_fast\[dicom\]"):
        load_volume(src)


def _without_uid(src, dst, uid_for=lambda i: None, n=6):
    """The first n slices of src copied to dst, slice i with SeriesInstanceUID uid_for(i) (None: no
    such element at all)."""
    dst.mkdir()
    for i, f in enumerate(sorted(src.glob("*.dcm"))[:n]):
        ds = pydicom.dcmread(f)
        if "SeriesInstanceUID" in ds:
            del ds.SeriesInstanceUID
        if uid_for(i) is not None:
            ds.SeriesInstanceUID = uid_for(i)
        ds.save_as(dst / f.name)
    return sorted(dst.glob("*.dcm"))


def test_a_series_without_uid_has_a_name_to_pick_it_by(data_dir, tmp_path):
    from segevol_fast.io import list_series
    from segevol_fast.io.dicom import NO_UID_SERIES

    files = _without_uid(_dicom_dir(data_dir), tmp_path / "mixed", uid_for=lambda i: "1.2.3.4" if i < 3 else None)
    infos = list_series(tmp_path / "mixed")
    assert [(i.name, i.uid, i.slices) for i in infos] == [("1.2.3.4", "1.2.3.4", 3), (NO_UID_SERIES, "", 3)]
    assert NO_UID_SERIES == "no-series-uid" and str(infos[1]).startswith("no-series-uid  (3 slices")
    with pytest.raises(DicomSeriesError) as info:
        load_volume(tmp_path / "mixed")
    assert "\n  no-series-uid  (3 slices, CT" in str(info.value) and "no SeriesInstanceUID" in str(info.value)
    by_name = load_volume(tmp_path / "mixed", series="no-series-uid")
    by_empty = load_volume(tmp_path / "mixed", series="")
    by_file = load_volume(files[4])  # a file of that series picks it, not "several series"
    assert by_name.shape == (512, 512, 3) and by_name.series == ""  # the real (empty) UID, for DICOM-SEG
    np.testing.assert_array_equal(by_name.array, by_empty.array)
    np.testing.assert_array_equal(by_name.array, by_file.array)
    assert not np.array_equal(load_volume(tmp_path / "mixed", series="1.2.3.4").array, by_name.array)
    _without_uid(_dicom_dir(data_dir), tmp_path / "uids", uid_for=lambda i: "1.2.3.4")
    with pytest.raises(DicomSeriesError, match="series no-series-uid is not in"):
        load_volume(tmp_path / "uids", series="no-series-uid")


def test_a_uidless_series_is_named_in_its_own_errors(data_dir, tmp_path):
    files = _without_uid(_dicom_dir(data_dir), tmp_path / "gap")
    files[2].unlink()
    with pytest.raises(DicomSeriesError, match="slices of series no-series-uid are unevenly spaced"):
        load_volume(tmp_path / "gap")


def test_a_folder_of_nifti_files_points_to_cohorts(data_dir, tmp_path):
    shutil.copy(data_dir / "ct_abdomen_sm.nii.gz", tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / "b.nii")
    with pytest.raises(VolumeFileError) as info:
        load_volume(tmp_path)
    msg = str(info.value)
    assert "holds 2 NIfTI files" in msg and "take one scan" in msg and f"segevol-fast segment {tmp_path}" in msg
    assert "segevol_fast.inference.cohort.segment_cohort" in msg and "cohort_items(" in msg
    from segevol_fast.inference import cohort  # the names the message gives exist

    assert callable(cohort.segment_cohort) and callable(cohort.cohort_items)
    assert cohort.is_cohort_input(str(tmp_path))  # and the command line runs it as a cohort
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeFileError, match="holds no DICOM image files"):
        load_volume(tmp_path / "empty")


@pytest.mark.parametrize(
    "make", [np.zeros, torch.zeros, lambda s: Volume(np.zeros(s), np.eye(4))], ids=["array", "tensor", "Volume"]
)
def test_an_empty_axis_is_named(make):
    with pytest.raises(ShapeError, match=r"axis 1 is empty \(shape \(5, 0, 3\)\)"):
        load_volume(make((5, 0, 3)))
    with pytest.raises(ShapeError, match=r"axes 0, 2 are empty \(shape \(0, 4, 0\)\)"):
        load_volume(make((0, 4, 0)))


@pytest.mark.parametrize("shape", [(5, 0, 3), (5, 0, 3, 1)])
def test_an_empty_axis_in_a_nifti_file_is_named(tmp_path, shape):
    from segevol_fast.preprocess import preprocess

    path = tmp_path / "empty_axis.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), path)  # nibabel reads it back as (0,)
    with pytest.raises(ShapeError, match=r"empty_axis.nii.gz: axis 1 is empty \(shape \(5, 0, 3\)\)"):
        load_volume(path)
    with pytest.raises(ShapeError, match=r"axis 1 is empty \(shape \(5, 0, 3\)\)"):
        preprocess(np.zeros((5, 0, 3), np.float32))


# ---------------------------------------------------------------------------------- arrays
def test_arrays_and_tensors():
    a = np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32)
    v = load_volume(a)
    assert v.shape == (5, 6, 7) and v.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(v.affine, np.eye(4))
    assert np.shares_memory(v.array, a)
    v = load_volume(a, spacing=(0.5, 0.5, 2.0), modality="ct")
    np.testing.assert_array_equal(v.affine, np.diag([0.5, 0.5, 2.0, 1.0]))
    assert v.modality == "ct"
    aff = np.diag([-1.0, -1.0, 3.0, 1.0])
    assert load_volume(a, affine=aff, spacing=(1, 1, 3)).spacing == (1.0, 1.0, 3.0)
    with pytest.raises(VolumeError):
        load_volume(a, affine=aff, spacing=(1, 1, 1))

    t = torch.from_numpy(a)[None, None]  # (1, 1, X, Y, Z)
    v = load_volume(t, affine=torch.from_numpy(aff))
    assert v.shape == (5, 6, 7) and v.array.dtype == np.float32
    np.testing.assert_array_equal(v.affine, aff)
    assert load_volume(t[0].bfloat16()).array.dtype == np.float32
    assert load_volume(torch.ones(2, 2, 2, dtype=torch.bool)).array.dtype == np.uint8

    assert load_volume(v) is v
    relabelled = load_volume(v, modality="mri")
    assert relabelled.modality == "mri" and relabelled.array is v.array


@pytest.mark.parametrize(
    "bad, err",
    [
        (np.zeros((4, 4)), ShapeError),
        (np.zeros((2, 4, 4, 4)), ShapeError),
        (torch.zeros(1, 2, 4, 4, 4), ShapeError),
        (np.full((3, 3, 3), np.nan, np.float32), VolumeError),
        (torch.tensor([np.inf]).expand(2, 2, 2), VolumeError),
        (np.zeros((3, 3, 3), np.complex64), VolumeError),
        ([[[1.0]]], VolumeError),
    ],
)
def test_bad_inputs(bad, err):
    with pytest.raises(err):
        load_volume(bad)


def test_bad_paths_and_args(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(VolumeFileError):
        load_volume(tmp_path / "notes.txt")
    with pytest.raises(VolumeFileError):
        load_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeFileError):
        load_volume(tmp_path / "empty")
    with pytest.raises(VolumeError):
        load_volume(np.zeros((2, 2, 2)), modality="pet")
    with pytest.raises(VolumeError):
        load_volume(tmp_path / "notes.txt", spacing=(1, 1, 1))
    with pytest.raises(VolumeError):
        Volume(np.zeros((2, 2, 2)), np.zeros((4, 4)))
    assert issubclass(VolumeFileError, SegVolFastError) and issubclass(MissingDependencyError, ImportError)


def test_metatensor_affine():
    monai_data = pytest.importorskip("monai.data")
    aff = torch.tensor([[-2.0, 0, 0, 5], [0, -2.0, 0, 6], [0, 0, 4.0, 7], [0, 0, 0, 1]], dtype=torch.float64)
    mt = monai_data.MetaTensor(torch.arange(60, dtype=torch.float32).reshape(1, 3, 4, 5), affine=aff)
    v = load_volume(mt, modality="ct")
    assert v.shape == (3, 4, 5) and v.spacing == (2.0, 2.0, 4.0) and v.source == "MetaTensor"
    np.testing.assert_array_equal(v.affine, aff.numpy())
    np.testing.assert_array_equal(v.array, np.arange(60, dtype=np.float32).reshape(3, 4, 5))


# ----------------------------------------------------------------------------------- spacing
@pytest.mark.parametrize("spacing", [(3000.0, 1.0, 1.0), (0.001, 0.001, 0.001), (1.0, 1.0, 60.0)])
def test_implausible_spacing_warns_once_naming_it_and_the_file(tmp_path, spacing):
    import warnings

    from segevol_fast.errors import SpacingWarning

    path = save_nifti(tmp_path / "odd.nii.gz", np.zeros((4, 4, 4), np.int16), np.diag([*spacing, 1.0]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = load_volume(path)
        load_volume(vol)  # the Volume as is: no second warning
    spacing_warnings = [w for w in caught if issubclass(w.category, SpacingWarning)]
    assert len(spacing_warnings) == 1, [str(w.message) for w in caught]
    msg = str(spacing_warnings[0].message)
    assert f"{spacing[0]:.4g}" in msg and str(path) in msg and "mL" in msg
    with pytest.warns(SpacingWarning, match="of array is implausible"):
        load_volume(np.zeros((4, 4, 4)), spacing=spacing)


def test_plausible_spacings_do_not_warn(data_dir):
    import warnings

    from segevol_fast.errors import SpacingWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", SpacingWarning)
        for spacing in [(0.01, 0.01, 0.01), (0.5, 0.5, 5.0), (1.0, 1.0, 50.0)]:
            load_volume(np.zeros((4, 4, 4)), spacing=spacing)
        load_volume(np.zeros((4, 4, 4)))  # no geometry: 1 mm
        load_volume(data_dir / "ct_abdomen_sm.nii.gz")
