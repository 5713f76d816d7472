"""preprocess (fast) against preprocess_ref (literal official steps), percentiles against numpy,
crop / paste_back round trips, and the zoom-out resizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segevol_fast.errors import PreprocessError, ShapeError
from segevol_fast.io import load_volume
from segevol_fast.preprocess import (
    foreground_stats,
    paste_back,
    preprocess,
    preprocess_ref,
    resize_logits_back,
    zoom_out_resize,
)


def assert_same(fast, ref):
    """Same crop box; image equal up to float32 rounding of a differently ordered computation."""
    assert (fast.start, fast.end, fast.original_shape) == (ref.start, ref.end, ref.original_shape)
    assert fast.image.shape == ref.image.shape and fast.image.dtype == torch.float32
    err = (fast.image - ref.image).abs().max().item()
    assert err <= 1e-6, f"max |fast - ref| = {err:.3e}"
    assert fast.image.min() >= 0 and fast.image.max() == pytest.approx(1.0, abs=1e-6)
    for name in ("lower", "upper", "mean", "std"):  # ref computes these in float32
        a, b = getattr(fast.stats, name), getattr(ref.stats, name)
        assert a == pytest.approx(b, rel=2e-6, abs=1e-5), name
    assert fast.stats.count == ref.stats.count


def numpy_percentiles(x):
    x = np.asarray(x, dtype=np.float64)
    fg = x[x > x.mean()]
    return np.percentile(fg, 0.05), np.percentile(fg, 99.95), fg


@pytest.mark.parametrize("name", ["ct_abdomen_sm.nii.gz", "mr_abdomen_sm.nii.gz", "mr_brain_mni152_t1.nii.gz"])
def test_real_volumes(data_dir, name):
    vol = load_volume(data_dir / name)
    fast, ref = preprocess(vol), preprocess_ref(vol)
    assert_same(fast, ref)
    lo, hi, fg = numpy_percentiles(vol.array)
    st = fast.stats
    assert (st.lower, st.upper, st.count) == (lo, hi, fg.size)  # bit-equal to numpy (integer data)
    assert st.mean == pytest.approx(fg.mean(), rel=1e-12) and st.std == pytest.approx(fg.std(), rel=1e-12)


def test_dicom_ct(data_dir):
    vol = load_volume(data_dir / "ct_abdomen_dicom")  # F-ordered int16, like nibabel's arrays
    assert_same(preprocess(vol), preprocess_ref(vol))


@pytest.mark.parametrize("layout", ["C", "F", "strided"])
@pytest.mark.parametrize("kind", ["float32", "int16", "float64", "whole_float32"])
def test_random_odd_shapes(kind, layout):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ()).item()))  # follows the test seed
    shape = (37, 29, 23)
    x = rng.normal(0, 200, size=shape)
    x[5:30, 4:25, 3:20] += rng.normal(300, 150, size=(25, 21, 17))  # a "body" above the mean
    x = {
        "float32": x.astype(np.float32),
        "int16": x.astype(np.int16),
        "float64": x,
        "whole_float32": np.round(x).astype(np.float32),
    }[kind]
    if layout == "F":
        x = np.asfortranarray(x)
    elif layout == "strided":
        x = x[::2, :, ::-1]
    before = x.copy()
    fast, ref = preprocess(x), preprocess_ref(x)
    assert_same(fast, ref)
    np.testing.assert_array_equal(x, before)  # the input is never written to
    # percentiles: numpy's, from the same foreground (float32 data as the pipeline sees it)
    x32 = np.asarray(x, dtype=np.float32).astype(np.float64)
    fg = x32[x32 > fast.stats.threshold]
    assert fg.size == fast.stats.count
    assert fast.stats.lower == np.percentile(fg, 0.05) and fast.stats.upper == np.percentile(fg, 99.95)


def test_torch_input_and_stats():
    x = torch.randn(19, 17, 13) * 100
    x[3:15, 2:14, 1:12] += 500
    fast, ref = preprocess(x), preprocess_ref(x)
    assert_same(fast, ref)
    assert foreground_stats(x) == fast.stats


def test_paste_back_round_trip():
    rng = np.random.default_rng(3)
    x = np.full((40, 33, 21), -1000, np.int16)
    x[6:31, 5:27, 2:19] = rng.integers(-200, 900, size=(25, 22, 17))
    prep = preprocess(x)
    assert prep.start == (2, 5, 6) and prep.end == (19, 27, 31)  # (D, H, W) = (z, y, x)
    assert prep.crop_shape == tuple(prep.image.shape[2:]) and prep.full_shape == (21, 33, 40)

    # the image pasted back equals the whole normalised volume (zero outside the crop) on (X, Y, Z)
    lo, hi = prep.stats.lower, prep.stats.upper
    full = (np.clip(x.astype(np.float64), lo, hi) - lo) / (hi - lo)
    back = paste_back(prep.image[0, 0], prep)
    assert back.shape == x.shape and isinstance(back, torch.Tensor)
    np.testing.assert_allclose(back.numpy(), full, atol=1e-6)

    # masks / logits with leading dims, numpy and torch, and a fill value
    logits = rng.normal(size=(2,) + prep.crop_shape).astype(np.float32)
    out = paste_back(logits, prep, fill=-50.0)
    assert out.shape == (2,) + x.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 6:31, 5:27, 2:19], np.swapaxes(logits, -1, -3))
    assert (out[:, :6] == -50).all() and (out[:, :, :, 19:] == -50).all()
    mask = torch.from_numpy(logits[0] > 0)
    mb = paste_back(mask, prep)
    assert mb.dtype == torch.bool and mb.sum() == mask.sum()
    np.testing.assert_array_equal(mb[6:31, 5:27, 2:19].permute(2, 1, 0).numpy(), mask.numpy())
    with pytest.raises(ShapeError):
        paste_back(logits[:, :-1], prep)


def test_degenerate_volumes():
    with pytest.raises(PreprocessError):
        preprocess(np.full((4, 5, 6), 7, np.int16))
    with pytest.raises(PreprocessError):
        preprocess(np.full((4, 5, 6), 7.5, np.float32))
    with pytest.raises(PreprocessError):
        preprocess(np.zeros((4, 5, 6), bool) | (np.arange(6) > 2))  # two values: 0.05th == 99.95th
    with pytest.raises(PreprocessError):
        x = np.zeros((4, 5, 6), np.float32)
        x[1, 1, 1] = np.nan
        preprocess(x)
    with pytest.raises(ShapeError):
        preprocess(np.zeros((4, 5)))


def test_zoom_out_and_back():
    img = torch.rand(1, 1, 41, 300, 197)
    z = zoom_out_resize(img)
    assert z.shape == (1, 1, 32, 256, 256)
    torch.testing.assert_close(z, F.interpolate(img, size=(32, 256, 256), mode="nearest-exact"), rtol=0, atol=0)
    assert zoom_out_resize(img[0, 0]).shape == (32, 256, 256)
    assert zoom_out_resize(img[0], size=(8, 16, 16)).shape == (1, 8, 16, 16)

    logits = torch.randn(3, 1, 32, 256, 256)
    back = resize_logits_back(logits, (41, 300, 197))
    torch.testing.assert_close(back, F.interpolate(logits, size=(41, 300, 197), mode="nearest"), rtol=0, atol=0)
    with pytest.raises(ShapeError):
        zoom_out_resize(torch.rand(2, 2))
