"""napari's reader hook on the shared scans: which paths it takes, and that the layer it returns puts
each voxel where the file's own geometry says (nibabel's affine for NIfTI, the slices' DICOM
ImagePositionPatient for the series), the mirrored DICOM x axis, a scan stored along permuted axes
and an oblique one included."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from segevol_fast.io import Volume
from segevol_fast.viewer.coords import image_transform
from segevol_fast.viewer.reader import VOLUME_KEY, napari_get_reader

from .test_coords import napari_world, random_affine


def read(path) -> tuple[np.ndarray, dict, str]:
    reader = napari_get_reader(path)
    assert callable(reader)
    (layer,) = reader(path)
    return layer


def random_voxels(rng: np.random.Generator, shape, n: int = 50) -> np.ndarray:
    corners = np.array([[a, b, c] for a in (0, shape[0] - 1) for b in (0, shape[1] - 1) for c in (0, shape[2] - 1)])
    return np.concatenate([corners, rng.uniform(0, np.asarray(shape) - 1, size=(n, 3))])


def test_a_nifti_layer_sits_where_nibabel_puts_it(data_dir, fresh_seed):
    path = data_dir / "ct_abdomen_sm.nii.gz"
    array, kwargs, kind = read(str(path))
    image = nib.load(path)
    assert kind == "image" and kwargs["name"] == "ct_abdomen_sm"
    np.testing.assert_array_equal(array, np.asanyarray(image.dataobj))
    volume = kwargs["metadata"][VOLUME_KEY]
    assert isinstance(volume, Volume) and volume.array is array and kwargs["metadata"]["path"] == str(path)
    assert "affine" not in kwargs  # an RAS scan: scale and translate alone
    voxels = random_voxels(np.random.default_rng(fresh_seed), array.shape)
    np.testing.assert_allclose(napari_world(voxels, kwargs), nib.affines.apply_affine(image.affine, voxels), atol=1e-4)


@pytest.mark.parametrize("kind", ["oblique", "permuted"])
def test_oblique_and_permuted_niftis_sit_where_nibabel_puts_them(tmp_path, fresh_seed, kind):
    rng = np.random.default_rng(fresh_seed)
    path = tmp_path / f"{kind}.nii"
    data = rng.integers(0, 100, size=(9, 7, 5)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, random_affine(rng, kind)), path)
    array, kwargs, _ = read(path)
    stored = nib.load(path).affine  # as the header keeps it (float32 sform)
    assert ("affine" in kwargs) == (kind == "oblique")
    axes = image_transform(kwargs["metadata"][VOLUME_KEY]).axes
    voxels = random_voxels(rng, data.shape).round().astype(int)
    layer_points = voxels[:, list(axes)]  # the layer's axes are the stored ones, reordered
    np.testing.assert_array_equal(array[tuple(layer_points.T)], data[tuple(voxels.T)])
    np.testing.assert_allclose(napari_world(layer_points, kwargs), nib.affines.apply_affine(stored, voxels), atol=1e-6)


@pytest.fixture(scope="module")
def dicom_layer(data_dir):
    return read(str(data_dir / "ct_abdomen_dicom"))


def test_a_dicom_layer_puts_each_slice_at_its_image_position(data_dir, dicom_layer):
    """Pixel (row r, column c) of a slice lies at IPP + c * column spacing * row direction + r * row
    spacing * column direction (LPS); the array stores rows bottom-up (j = rows - 1 - r)."""
    pydicom = pytest.importorskip("pydicom")
    array, kwargs, _ = dicom_layer
    assert kwargs["name"] == "ct_abdomen_dicom" and "affine" not in kwargs
    assert kwargs["scale"][0] < 0  # stored left to right: the world's x runs the other way
    slices = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted((data_dir / "ct_abdomen_dicom").iterdir())]
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    rows = int(slices[0].Rows)
    assert array.shape == (int(slices[0].Columns), rows, len(slices))
    to_ras = np.array([-1.0, -1.0, 1.0])
    for k, ds in enumerate(slices):
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        for r, c in [(0, 0), (rows - 1, 0), (17, 300), (rows - 1, int(ds.Columns) - 1)]:
            lps = np.asarray(ds.ImagePositionPatient, dtype=float) + c * dc * iop[:3] + r * dr * iop[3:]
            world = napari_world(np.array([[c, rows - 1 - r, k]], dtype=float), kwargs)[0]
            np.testing.assert_allclose(world, lps * to_ras, atol=1e-3)


def test_one_dicom_file_or_several_open_their_series_once(data_dir, dicom_layer):
    files = sorted(str(f) for f in (data_dir / "ct_abdomen_dicom").iterdir())
    reader = napari_get_reader(files[:3] + [str(data_dir / "ct_abdomen_dicom")])
    (layer,) = reader(files[:3])
    array, kwargs, _ = layer
    np.testing.assert_array_equal(array, dicom_layer[0])
    assert kwargs["name"] == "ct_abdomen_dicom" and kwargs["scale"] == dicom_layer[1]["scale"]


def test_two_scans_give_two_layers(data_dir):
    paths = [str(data_dir / "ct_abdomen_sm.nii.gz"), str(data_dir / "mr_abdomen_sm.nii.gz")]
    layers = napari_get_reader(paths)(paths)
    assert [kwargs["name"] for _, kwargs, _ in layers] == ["ct_abdomen_sm", "mr_abdomen_sm"]
    assert [kwargs["metadata"]["path"] for _, kwargs, _ in layers] == paths


def test_other_paths_are_left_to_other_readers(data_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("not a scan")
    (tmp_path / "empty").mkdir()
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    for path in ["notes.txt", "empty", "image.png", "missing.nii.gz"]:
        assert napari_get_reader(str(tmp_path / path)) is None, path
    assert napari_get_reader(str(tmp_path)) is None  # a folder of files that are no DICOM
    assert napari_get_reader([str(data_dir / "ct_abdomen_sm.nii.gz"), str(tmp_path / "notes.txt")]) is None
    assert napari_get_reader([]) is None
