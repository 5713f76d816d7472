"""Crop readers: a lazily normalised crop reads exactly what the stored crop holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segevol_fast.crop import NormalizedCrop, StoredCrop
from segevol_fast.errors import ShapeError
from segevol_fast.preprocess import Preprocessed, preprocess, zoom_out_crop, zoom_out_resize


def _volume(kind: str, shape, rng) -> np.ndarray:
    """A CT-like int16 volume (air border, tissue inside), or the same as float32 / float64 MRI-like data."""
    x = rng.normal(-900, 30, size=shape)
    inner = tuple(slice(2, n - 3) for n in shape)
    x[inner] = rng.normal(60, 200, size=x[inner].shape)
    if kind == "int16":
        return x.round().astype(np.int16)
    return x.astype(np.float32 if kind == "float32" else np.float64) / 100


def _pair(kind, shape):
    vol = _volume(kind, shape, np.random.default_rng(int(torch.randint(0, 2**31, ()))))
    return preprocess(vol), preprocess(vol, lazy=True)


@pytest.mark.parametrize("kind", ["int16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(37, 29, 11), (64, 48, 40)])
def test_lazy_reads_are_bit_identical_to_the_stored_crop(kind, shape):
    stored, lazy = _pair(kind, shape)
    assert not stored.lazy and lazy.lazy and isinstance(lazy.crop, NormalizedCrop)
    assert lazy.crop.shape == stored.crop.shape == stored.crop_shape
    assert (stored.start, stored.end, stored.stats) == (lazy.start, lazy.end, lazy.stats)
    assert torch.equal(lazy.image, stored.image)
    full = stored.crop.full()
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for _ in range(5):  # random boxes, empty ones included
        lo = [int(torch.randint(0, n, (), generator=g)) for n in full.shape]
        hi = [int(torch.randint(a, n + 1, (), generator=g)) for a, n in zip(lo, full.shape)]
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        assert torch.equal(lazy.crop.block(lo, hi), full[box])
        assert torch.equal(stored.crop.block(lo, hi), full[box])
    idx = [torch.randint(0, n, (7,), generator=g) for n in full.shape]
    ref = full[idx[0]][:, idx[1]][:, :, idx[2]]
    assert torch.equal(lazy.crop.take(idx), ref) and torch.equal(stored.crop.take(idx), ref)


@pytest.mark.parametrize("shape", [(40, 300, 260), (9, 100, 70), (32, 256, 256), (61, 17, 300)])
def test_zoom_out_of_a_reader_equals_the_resize_of_the_whole_crop(shape):
    # (D', H', W') smaller and larger than (32, 256, 256) on each axis, and equal to it
    src = torch.randint(-1000, 1000, shape[::-1], dtype=torch.int16)  # (X, Y, Z) source
    crop = NormalizedCrop(src.permute(2, 1, 0), -800.0, 700.0, 1 / 1500)
    ref = zoom_out_resize(crop.full()[None, None])
    assert torch.equal(zoom_out_crop(crop), ref)
    assert torch.equal(zoom_out_crop(StoredCrop(crop.full())), ref)
    assert zoom_out_crop(crop, (8, 32, 32)).shape == (1, 1, 8, 32, 32)


def test_the_lazy_crop_reads_the_scan_without_copying_it():
    vol = _volume("int16", (30, 20, 12), np.random.default_rng(0))
    prep = preprocess(vol, lazy=True)
    assert np.shares_memory(prep.crop.source.numpy(), vol)


def test_blocks_outside_the_crop_and_bad_readers_are_refused():
    crop = StoredCrop(torch.rand(4, 5, 6))
    for lo, hi in [((0, 0, 0), (5, 5, 6)), ((-1, 0, 0), (2, 2, 2)), ((3, 0, 0), (2, 5, 6)), ((0, 0), (1, 1))]:
        with pytest.raises(ShapeError, match="not inside the crop"):
            crop.block(lo, hi)
    with pytest.raises(ShapeError):
        StoredCrop(torch.rand(1, 4, 5, 6))
    with pytest.raises(ShapeError):
        NormalizedCrop(torch.zeros(4, 5, 6, dtype=torch.bool), 0, 1, 1)
    with pytest.raises(ShapeError, match=r"\(1, 1, D', H', W'\)"):
        Preprocessed(torch.rand(2, 1, 4, 5, 6), (0, 0, 0), (4, 5, 6), (6, 5, 4), None)
    with pytest.raises(ShapeError, match="CropReader"):
        Preprocessed(np.zeros((1, 1, 4, 5, 6)), (0, 0, 0), (4, 5, 6), (6, 5, 4), None)
    image = torch.rand(1, 1, 4, 5, 6)
    prep = Preprocessed(image, (0, 0, 0), (4, 5, 6), (6, 5, 4), None)
    assert prep.image.data_ptr() == image.data_ptr()  # a stored crop is handed back, not copied
