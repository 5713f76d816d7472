"""The synthetic abdominal CT: geometry, labels, intensities, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from segevol_fast.errors import ShapeError
from segevol_fast.phantom import KIDNEY_LEFT, KIDNEY_RIGHT, LIVER, SPINE_ID, SPLEEN, make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom()


def test_shapes_dtypes_geometry(phantom):
    vol, labels, names = phantom
    assert vol.shape == (160, 160, 64) and vol.array.dtype == np.int16
    assert labels.shape == vol.shape and labels.dtype == np.uint8
    assert vol.spacing == (1.5, 1.5, 3.0) and vol.modality == "ct"
    np.testing.assert_allclose(np.diag(vol.affine)[:3], (1.5, 1.5, 3.0))
    centre = vol.voxel_to_world((np.asarray(vol.shape) - 1) / 2)
    np.testing.assert_allclose(centre, 0.0, atol=1e-9)  # the field of view is centred on the origin
    assert names == {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", SPINE_ID: "spine"}
    assert set(np.unique(labels)) == {0, *names}


def test_intensities_are_plausible_hu(phantom):
    vol, labels, _ = phantom
    a = vol.array.astype(np.float64)
    assert a[0, 0, :].mean() == pytest.approx(-1000, abs=10)  # corner: air
    assert a[labels == LIVER].mean() == pytest.approx(60, abs=5)
    assert a[labels == SPLEEN].mean() == pytest.approx(50, abs=5)
    assert a[labels == SPINE_ID].mean() > 200
    kidney = a[labels == KIDNEY_LEFT]
    assert 30 < kidney.mean() < 150 and kidney.std() > 30  # medulla and brighter cortex
    assert 5 < a[labels == LIVER].std() < 20  # noise present


def test_anatomy_sides_in_ras(phantom):
    _, labels, _ = phantom

    def centroid(i):
        return np.argwhere(labels == i).mean(0)

    assert centroid(LIVER)[0] > 80 > centroid(SPLEEN)[0]  # liver on the patient's right (+x)
    assert centroid(KIDNEY_RIGHT)[0] > 80 > centroid(KIDNEY_LEFT)[0]
    assert centroid(SPINE_ID)[1] < centroid(LIVER)[1]  # spine posterior
    assert abs(centroid(KIDNEY_RIGHT)[1] - centroid(KIDNEY_LEFT)[1]) < 3


def test_seed_determinism_and_other_shapes():
    a, la, _ = make_phantom(shape=(40, 36, 20), spacing=(6.0, 6.6, 9.6), seed=3)
    b, lb, _ = make_phantom(shape=(40, 36, 20), spacing=(6.0, 6.6, 9.6), seed=3)
    c, _, _ = make_phantom(shape=(40, 36, 20), spacing=(6.0, 6.6, 9.6), seed=4)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a.array, c.array)
    assert {LIVER, SPLEEN, KIDNEY_LEFT, KIDNEY_RIGHT} <= set(np.unique(la))
    with pytest.raises(ShapeError):
        make_phantom(shape=(4, 4, 4))
