"""SegVol's official preprocessing (docs/official-pipeline.md §5.1), its inverse, and the zoom-out resizes (§5.3).

    x (X, Y, Z)  --foreground = x > mean(x)
                 --clip whole volume to the foreground's 0.05th / 99.95th percentiles
                 --z-score with the foreground mean / population std
                 --swap axes -> (Z, Y, X) = model (D, H, W)
                 --min-max to [0, 1]
                 --crop the box of voxels > 0          -> image (1, 1, D', H', W') float32

`preprocess_ref` does exactly those steps in numpy, literally (float32 data, as MONAI's LoadImage
hands it over). `preprocess` gets the same result in about two passes over the data:

* After clipping, the volume's min and max are the two percentiles, so z-score followed by min-max
  is (clip(x) - lower) / (upper - lower): the z-score cancels (the 1e-8 floors are kept).
* Integer volumes (CT is int16) are summarised by one histogram: mean, foreground, percentiles,
  foreground mean and std all come from the bin counts, exactly.
* The crop box is where x > lower; per-axis max projections, taken in the same pass as the
  histogram, give it without another scan. Only the cropped block is then transposed and scaled,
  in small cache-sized slabs, or not at all: `preprocess(..., lazy=True)` leaves the crop as a
  reader that normalises the scan's voxels as they are read (`crop.py`), so inference never holds
  a float32 copy of the crop.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .crop import CropReader, NormalizedCrop, StoredCrop
from .errors import PreprocessError, ShapeError
from .io.volume import check_3d_shape

PERCENTILES = (0.05, 99.95)
ZOOM_OUT_SIZE = (32, 256, 256)
_EPS = 1e-8  # the official floors on std and on the min-max range
_MAX_BINS = 1 << 22  # integer volumes with a wider value range take the float path
_SLAB = 1 << 20  # elements per slab: a few MB, stays in L2/L3 while it is worked on
_WIDEN = {  # unsigned dtypes torch supports only partly -> a signed dtype that holds them
    getattr(torch, n): w
    for n, w in (("uint16", torch.int32), ("uint32", torch.int64), ("uint64", torch.int64))
    if hasattr(torch, n)
}


@dataclass(frozen=True)
class ForegroundStats:
    """Statistics of the foreground (voxels strictly above the volume mean), float64."""

    threshold: float  # mean of all voxels
    count: int  # foreground voxels
    lower: float  # 0.05th percentile of the foreground (numpy 'linear')
    upper: float  # 99.95th percentile
    mean: float
    std: float  # population std (ddof 0)


@dataclass
class Preprocessed:
    """Model input plus what is needed to map results back.

    crop:           the preprocessed foreground crop (D', H', W') float32 in [0, 1], D, H, W = Z, Y, X,
                    as a `CropReader`: stored (`StoredCrop`) or normalised from the scan on each read
                    (`NormalizedCrop`, `preprocess(..., lazy=True)`). A (1, 1, D', H', W') tensor given
                    here is stored as it is.
    start, end:     crop box in the full (D, H, W) frame, end exclusive (MONAI's
                    foreground_start_coord / foreground_end_coord).
    original_shape: (X, Y, Z) of the input array.
    stats:          the foreground statistics used.
    """

    crop: CropReader
    start: Tuple[int, int, int]
    end: Tuple[int, int, int]
    original_shape: Tuple[int, int, int]
    stats: ForegroundStats

    def __post_init__(self):
        if isinstance(self.crop, Tensor):
            if self.crop.dim() != 5 or tuple(self.crop.shape[:2]) != (1, 1):
                raise ShapeError(f"the crop image must be (1, 1, D', H', W'), got {tuple(self.crop.shape)}")
            self.crop = StoredCrop(self.crop[0, 0])
        if not isinstance(self.crop, CropReader):
            raise ShapeError(
                f"crop must be a CropReader or a (1, 1, D', H', W') tensor, got {type(self.crop).__name__}"
            )

    @property
    def image(self) -> Tensor:
        """(1, 1, D', H', W') float32. A stored crop is returned as it is (no copy); a lazy one is
        normalised into a new tensor on every access (D'·H'·W'·4 bytes: keep the result)."""
        return self.crop.full()[None, None]

    @property
    def lazy(self) -> bool:
        """True when the crop is read from the scan on demand (no float32 copy is held)."""
        return not isinstance(self.crop, StoredCrop)

    @property
    def crop_shape(self) -> Tuple[int, int, int]:
        """(D', H', W') of the crop."""
        return tuple(e - s for s, e in zip(self.start, self.end))

    @property
    def full_shape(self) -> Tuple[int, int, int]:
        """(D, H, W) = (Z, Y, X) before cropping."""
        return tuple(reversed(self.original_shape))


# ------------------------------------------------------------------------------------ inputs
def _as_tensor(src) -> Tensor:
    """Volume / numpy / torch (X, Y, Z) -> torch tensor sharing memory where possible."""
    arr = getattr(src, "array", src)  # a Volume: avoid importing io (same layer, no need)
    if isinstance(arr, np.ndarray):
        if any(s < 0 for s in arr.strides):
            # copy(), not ascontiguousarray: that returns a (1, ...) reversed view as it is, since
            # numpy calls it contiguous, and torch refuses its negative stride
            arr = arr.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only arrays: we never write to them
            t = torch.from_numpy(arr)
    elif isinstance(arr, Tensor):
        t = arr.detach()
    else:
        raise ShapeError(f"preprocess takes a Volume, numpy array or tensor, got {type(src).__name__}")
    if t.dim() != 3:
        raise ShapeError(f"preprocess expects one 3-D volume (X, Y, Z), got shape {tuple(t.shape)}")
    check_3d_shape(t.shape, "the volume")
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    elif t.is_complex():
        raise PreprocessError(f"complex data ({t.dtype}) is not an image")
    elif t.is_floating_point() and t.dtype != torch.float32:
        t = t.float()  # MONAI's LoadImage hands the official code float32
    elif t.dtype in _WIDEN:
        t = t.to(_WIDEN[t.dtype])
    return t


def _slabs(t: Tensor):
    """Yield (axis, start, stop, slab) along the axis outermost in memory, ~_SLAB elements each."""
    axis = max(range(3), key=lambda a: t.stride(a))
    per = max(1, t.numel() // t.shape[axis])
    step = max(1, _SLAB // per)
    for s in range(0, t.shape[axis], step):
        e = min(s + step, t.shape[axis])
        yield axis, s, e, t.narrow(axis, s, e - s)


def _flat(c: Tensor) -> Tensor:
    """All elements of a slab as 1-D, in memory order (a view when the slab is dense)."""
    order = sorted(range(c.dim()), key=lambda a: -c.stride(a))
    return c.permute(order).reshape(-1)


def _scan(t: Tensor, fn):
    """One pass: call fn(flat_slab) per slab and collect per-axis max projections (3 1-D tensors)."""
    proj = [None, None, None]
    parts = []
    for axis, s, e, c in _slabs(t):
        fn(_flat(c))
        others = [a for a in range(3) if a != axis]
        parts.append(c.amax(dim=others))
        for a in others:
            m = c.amax(dim=[b for b in range(3) if b != a])
            proj[a] = m if proj[a] is None else torch.maximum(proj[a], m)
    proj[axis] = torch.cat(parts)
    return proj


# ------------------------------------------------------------------------------- statistics
def _lerp_percentile(order_stat, n: int, q: float) -> float:
    """numpy.percentile(..., method='linear') from an order-statistic lookup, bit for bit in float64."""
    vi = (n - 1) * (q / 100.0)  # numpy: (n - 1) * true_divide(q, 100)
    prev = math.floor(vi)
    nxt = min(prev + 1, n - 1)
    g = vi - prev
    a, b = float(order_stat(prev)), float(order_stat(nxt))
    diff = b - a
    return b - diff * (1 - g) if g >= 0.5 else a + diff * g  # numpy's _lerp, both branches


def _int_stats(t: Tensor, scan: bool = True):
    """Whole-number volume: everything from one histogram pass. Returns (stats, projections | None),
    or None when the value range is too wide for a histogram."""
    vmin, vmax = (int(v) for v in torch.aminmax(_flat(t)))
    nbins = vmax - vmin + 1
    n = t.numel()
    if nbins > _MAX_BINS or max(abs(vmin), abs(vmax)) * n >= 1 << 62:
        return None
    counts = torch.zeros(nbins, dtype=torch.int64, device=t.device)

    def add(flat):
        # shift to 0..nbins-1 before narrowing (wide dtypes with a narrow range cannot wrap); never
        # in place on the caller's data: .to() returns the input itself when it is int32 already
        if flat.dtype in (torch.int32, torch.int64):
            idx = (flat - vmin).to(torch.int32)
        else:
            idx = flat.to(torch.int32).sub_(vmin)
        counts.add_(torch.bincount(idx, minlength=nbins))

    if scan:
        proj = _scan(t, add)
    else:  # the projections are known already: only the histogram
        proj = None
        for *_, c in _slabs(t):
            add(_flat(c))
    c = counts.cpu().numpy()
    vals = np.arange(vmin, vmax + 1, dtype=np.int64)
    total = int((c * vals).sum())  # exact: |vals| * n < 2**62 was checked
    fg = vals * n > total  # v > total / n, decided in exact integer arithmetic
    cf, vf = c[fg], vals[fg]
    n_fg = int(cf.sum())
    if n_fg == 0:
        raise PreprocessError("the volume is constant: no voxel lies above its mean, nothing to segment")
    cum = np.cumsum(cf)

    def order_stat(r):
        return vf[np.searchsorted(cum, r, side="right")]

    lower, upper = (_lerp_percentile(order_stat, n_fg, q) for q in PERCENTILES)
    mean = float((cf * vf).sum()) / n_fg
    var = float((cf * (vf - mean) ** 2).sum()) / n_fg
    stats = ForegroundStats(total / n, n_fg, lower, upper, mean, math.sqrt(var))
    return stats, proj


def _float_stats(t: Tensor):
    """Float (or wide-range integer) volume: two passes plus one partition of a copy.

    Float volumes holding only whole numbers (CT saved as float32) go to the histogram path.
    """
    if t.dtype != torch.float32:
        t = t.float()
    vmin, vmax = (float(v) for v in torch.aminmax(_flat(t)))
    if not (math.isfinite(vmin) and math.isfinite(vmax)):
        raise PreprocessError("the volume has NaN or infinite voxels; fix or mask them first")
    n = t.numel()
    acc = [0.0, True]  # sum (float64 across slabs), all values whole numbers

    def add(f):
        acc[0] += float(f.sum())
        acc[1] = acc[1] and not bool(torch.frac(f).any())

    proj = _scan(t, add)
    if acc[1] and max(-vmin, vmax) < 2**24:  # whole numbers, exact in float32 and in int32
        res = _int_stats(t, scan=False)
        if res is not None:
            return res[0], proj
    thr = acc[0] / n
    # float32 threshold with exactly the same foreground: the largest float32 <= thr
    t32 = np.float32(thr)
    if float(t32) > thr:
        t32 = np.nextafter(t32, np.float32(-np.inf))
    # foreground moments around the threshold (shifted sums: no catastrophic cancellation)
    n_fg, s1, s2 = 0, 0.0, 0.0
    for *_, c in _slabs(t):
        d = (_flat(c) - float(t32)).clamp_min_(0)  # background voxels add nothing; x > t32 gives d > 0
        n_fg += int(torch.count_nonzero(d))
        d = d.double()  # float32 dot products lose ~1e-6 of the std over a million terms
        s1 += float(d.sum())
        s2 += float(torch.dot(d, d))
    thr = float(t32)
    if n_fg == 0:
        raise PreprocessError("the volume is constant: no voxel lies above its mean, nothing to segment")
    m1, m2 = s1 / n_fg, s2 / n_fg
    n_bg = n - n_fg
    # the foreground's r-th smallest is the whole volume's (n_bg + r)-th: no masked copy needed
    ranks = set()
    for q in PERCENTILES:
        vi = (n_fg - 1) * (q / 100.0)
        ranks.update({n_bg + math.floor(vi), n_bg + min(math.floor(vi) + 1, n_fg - 1)})
    ranks = sorted(ranks)
    flat = np.partition(t.reshape(-1).cpu().numpy(), ranks)
    lower, upper = (_lerp_percentile(lambda r: flat[n_bg + r], n_fg, q) for q in PERCENTILES)
    stats = ForegroundStats(thr, n_fg, lower, upper, thr + m1, math.sqrt(max(m2 - m1 * m1, 0.0)))
    return stats, proj


def foreground_stats(volume) -> ForegroundStats:
    """Foreground statistics of a (X, Y, Z) volume as the official normalisation defines them."""
    t = _as_tensor(volume)
    res = _int_stats(t) if not t.is_floating_point() else None
    return (res or _float_stats(t))[0]


# ----------------------------------------------------------------------------- preprocessing
def _top_at_most_one(scale: float, lo: float, hi: float) -> float:
    """The float32 scale the crop is multiplied by, stepped down where float32 rounding would put
    the top voxel, (hi - lo) * scale, at 1 + 1 ulp (e.g. int16 -32768..32767): the crop stays in
    [0, 1] as documented. At most an ulp of change, far inside the 1e-6 agreement with the reference."""
    s32, top = np.float32(scale), np.float32(hi) - np.float32(lo)  # float32, as the crop computes it
    while s32 > 0 and top * s32 > 1:
        s32 = np.nextafter(s32, np.float32(0))
    return float(s32)


def preprocess(volume, lazy: bool = False) -> Preprocessed:
    """Official SegVol preprocessing, fast. volume: Volume / numpy / torch (X, Y, Z), any real dtype.

    Args:
        lazy: keep no float32 copy of the crop: `Preprocessed.crop` normalises the scan's voxels as
            they are read (a `NormalizedCrop` holding a view of the input). Values read are
            bit-identical to the stored crop's; the input must not be modified while it is used.

    Returns `Preprocessed` whose crop reads (D', H', W') float32 in [0, 1] on the input's device.
    Equal to `preprocess_ref` up to float32 rounding (~1e-6); the crop box is identical. Limits
    (tests/property/test_preprocess_props.py), where a voxel is decided exactly here and with
    float32 rounding by the official code, so it can fall on the other side: a voxel value within
    float32 rounding of the mean (|v - mean| < ~1e-7·|mean|, any dtype: foreground and percentiles
    differ), or above the lower percentile by < ~1e-7 of the clip range (float data only: crop box
    differs). Beyond ~1e18 the official float32 std overflows; the float64 moments here stay right.
    """
    t = _as_tensor(volume)
    res = _int_stats(t) if not t.is_floating_point() else None
    stats, proj = res or _float_stats(t)
    # clip bounds in float32, as the official float32 pipeline holds them
    lo, hi = float(np.float32(stats.lower)), float(np.float32(stats.upper))
    s = max(stats.std, _EPS)
    z_range = (hi - lo) / s  # = max - min of the z-scored, clipped volume
    if z_range <= 0:
        raise PreprocessError(
            "the foreground's 0.05th and 99.95th percentiles are equal: the image is (nearly) constant, "
            "nothing to segment"
        )
    scale = _top_at_most_one(1.0 / (s * max(z_range, _EPS)), lo, hi)
    box = []
    for p in proj:  # voxels > lo are exactly those > 0 after min-max
        idx = torch.nonzero(p.double() > lo).flatten()
        box.append((int(idx[0]), int(idx[-1]) + 1))
    (x0, x1), (y0, y1), (z0, z1) = box
    crop = NormalizedCrop(t[x0:x1, y0:y1, z0:z1].permute(2, 1, 0), lo, hi, scale)  # (D', H', W') view
    return Preprocessed(
        crop=crop if lazy else StoredCrop(crop.full()),
        start=(z0, y0, x0),
        end=(z1, y1, x1),
        original_shape=tuple(int(v) for v in t.shape),
        stats=stats,
    )


def preprocess_ref(volume) -> Preprocessed:
    """The official steps, literally, in numpy float32 (slow; defines what correct means)."""
    arr = getattr(volume, "array", volume)
    if isinstance(arr, Tensor):
        arr = arr.detach().cpu().float().numpy()
    x = np.asarray(arr, dtype=np.float32)  # MONAI LoadImage's default dtype
    if x.ndim != 3:
        raise ShapeError(f"preprocess_ref expects (X, Y, Z), got shape {x.shape}")
    flat = x.copy().flatten()
    thr = np.mean(flat)
    fg = flat[flat > thr]
    if fg.size == 0:
        raise PreprocessError("the volume is constant: no voxel lies above its mean, nothing to segment")
    upper = np.percentile(fg, PERCENTILES[1])
    lower = np.percentile(fg, PERCENTILES[0])
    mean, std = np.mean(fg), np.std(fg)
    x = np.clip(x, lower, upper)
    x = (x - mean) / max(std, _EPS)
    x = np.swapaxes(x[None], -1, -3)  # (1, Z, Y, X)
    x = x - x.min()
    x = x / np.clip(x.max(), a_min=_EPS, a_max=None)
    nz = np.nonzero(x[0] > 0)  # CropForeground: select > 0, margin 0
    if nz[0].size == 0:
        raise PreprocessError(
            "the foreground's 0.05th and 99.95th percentiles are equal: the image is (nearly) constant, "
            "nothing to segment"
        )
    start = tuple(int(a.min()) for a in nz)
    end = tuple(int(a.max()) + 1 for a in nz)
    crop = x[0, start[0] : end[0], start[1] : end[1], start[2] : end[2]]
    stats = ForegroundStats(float(thr), int(fg.size), float(lower), float(upper), float(mean), float(std))
    return Preprocessed(
        crop=torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None, None],
        start=start,
        end=end,
        original_shape=tuple(int(v) for v in arr.shape),
        stats=stats,
    )


# ------------------------------------------------------------------------------- inverses
def paste_back(x: Union[Tensor, np.ndarray], prep: Preprocessed, fill: float = 0) -> Union[Tensor, np.ndarray]:
    """Put a result on the crop (..., D', H', W') back on the original grid (..., X, Y, Z).

    Works for masks and logits, torch or numpy (returned as the same kind, dtype and device).
    Voxels outside the crop get `fill`; 0 is what the official HF `save_preds` writes (a zero logit
    is background after sigmoid > 0.5).
    """
    if tuple(x.shape[-3:]) != prep.crop_shape:
        raise ShapeError(f"expected (..., {prep.crop_shape}) on the crop, got shape {tuple(x.shape)}")
    lead = tuple(x.shape[:-3])
    (z0, y0, x0), (z1, y1, x1) = prep.start, prep.end
    if isinstance(x, Tensor):
        out = torch.full(lead + prep.original_shape, fill, dtype=x.dtype, device=x.device)
        out[..., x0:x1, y0:y1, z0:z1] = x.transpose(-1, -3)
    else:
        out = np.full(lead + prep.original_shape, fill, dtype=x.dtype)
        out[..., x0:x1, y0:y1, z0:z1] = np.swapaxes(x, -1, -3)
    return out


def _interp(x: Tensor, size: Sequence[int], mode: str) -> Tensor:
    if x.dim() not in (3, 4, 5):
        raise ShapeError(f"expected (D, H, W), (C, D, H, W) or (B, C, D, H, W), got shape {tuple(x.shape)}")
    lead = x.dim()
    while x.dim() < 5:
        x = x[None]
    y = F.interpolate(x, size=tuple(int(s) for s in size), mode=mode)
    return y.reshape(y.shape[5 - lead :])


def index_map(n_in: int, n_out: int, mode: str) -> Tensor:
    """Source index (n_out,) int64 that torch's `mode` resize reads for each output voxel of one axis.

    Taken from F.interpolate itself (on an arange): its float32 index arithmetic differs from
    exact rational arithmetic for some sizes, and results must match it. A 3-D nearest resize
    is separable, so three of these describe it completely.
    """
    ramp = torch.arange(n_in, dtype=torch.float32).view(1, 1, n_in)
    return F.interpolate(ramp, size=int(n_out), mode=mode).view(-1).round().long()


def zoom_out_crop(crop: CropReader, size: Sequence[int] = ZOOM_OUT_SIZE) -> Tensor:
    """`zoom_out_resize` of a crop reader: (1, 1, *size) float32, reading only the voxels the
    'nearest-exact' resize keeps (a lazy crop is never materialised). Equal to
    zoom_out_resize(crop.full()) bit for bit."""
    idx = [index_map(n, s, "nearest-exact") for n, s in zip(crop.shape, size)]
    return crop.take(idx)[None, None]


def zoom_out_resize(x: Tensor, size: Sequence[int] = ZOOM_OUT_SIZE) -> Tensor:
    """The zoom-out image: resize (.., D, H, W) to `size` with torch 'nearest-exact' (MONAI Resized).

    Same rank and dtype out as in: (D,H,W), (C,D,H,W) or (B,C,D,H,W). Anisotropic, no aspect kept.
    """
    return _interp(x, size, "nearest-exact")


def resize_logits_back(logits: Tensor, shape: Sequence[int]) -> Tensor:
    """Zoom-out logits (.., 32, 256, 256) -> (.., *shape) with legacy torch 'nearest' (docs/official-pipeline.md §5.3)."""
    return _interp(logits, shape, "nearest")
