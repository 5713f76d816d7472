"""Memory budget of `segment()`: parse a limit, estimate a call's peak, choose a plan (fast mode)
or check the one the official algorithm fixes (exact mode).

The peak is bounded where it matters: device memory on CUDA (what `torch.cuda.max_memory_allocated`
counts), process memory (RSS) on the CPU. `plan_fast` picks, within the limit,

    1. float32 accumulators, else float16, because a budget should change speed, not results,
       wherever it can (window and decode batches do not change results);
    2. on CUDA, stitching on the device, else on the CPU (there the row sums and coarse results
       leave the device budget, so on CUDA float16 is never needed: a CPU-only fallback);
    3. the biggest window batch (1..8, at most the number of windows of the crop);
    4. how many prompts stitch at once (their row sums are alive together), up to all;
    5. how many prompts one decoder call takes, up to that group;
    6. how many window embeddings stay cached, from what is left (up to every window of the crop),
       when there is more than one prompt group (within a group each window is encoded once);

and raises `BudgetError` before anything runs when even the smallest plan does not fit.

Cost model (bytes; every item is summed as if all were alive at once, although the zoom-out and
zoom-in stages follow each other, so the figure is an upper bound; the one exception is the
encoder and the decoder, which never run at the same time: only the larger of the two counts).
With C = hidden, S = tokens per window, M = MLP width, V = voxels per window, Vc = voxels of the
crop, Vo = voxels of the input grid, N = prompts, a = 4 (fp32) or 2 (reduced precision) bytes for
matmul outputs, q = accumulator bytes, band = min(D', window depth)·H'·W' (the most D-rows of
sums one prompt keeps, fast.py), b = window_batch on CUDA and min(b, 4) + max(0, b - 4)/3 on the
CPU (below):

    weights           sum of parameter and buffer bytes (+ half of it for autocast's weight copies)
    baseline          CUDA: memory_allocated() minus the weights; CPU: current RSS minus the weights
                      (the scan itself is in here: fast mode reads windows from it, no crop copy)
    zoom_out          V·4 on the CPU, 2·V·4 on CUDA (the resized image, and its device copy)
    encoder           b · [2·V·4 + S·patch·4 + S·(4C·4 + a·(4C + 2M)) + C·S·4]
                      (window input and its padded copy, patch rows, per block the residual, q/k/v
                      and attention output at fp32 plus the MLP's in/out at matmul precision, the
                      embedding): 132 MB a window at fp32. No S×S term: SDPA keeps no score matrix
                      (flash / memory-efficient kernels on CUDA, a blocked kernel on the CPU).
                      On the CPU, windows beyond the 4th count a third: measured (fp32, torch 2.13,
                      fresh process, `bench/calibrate_memory.py`) 147 / 248 / 450 / 443 / 582 MB at
                      batch 1 / 2 / 4 / 6 / 8 (from 6 windows on, the big tensors are mmap'd and
                      returned to the system when freed; smaller ones stay in the heap), modelled
                      132 / 264 / 528 / 616 / 704 MB.
    embedding_cache   cache_windows · C·S·4
    decoder           15·S·C·4 + decode_batch · (3·S·C·4 + 2·V·4): a fixed part (the first call's
                      workspaces and the two-way transformer's image side, which the prompts share
                      through broadcasting) and per prompt three image-side S·C copies plus the
                      low-res and upsampled logits: 130 / 237 / 380 MB for 1 / 4 / 8 prompts;
                      measured likewise: 113 / 268 / 327 MB (not linear: allocator reuse; the
                      slack covers the gap at 4)
    not_concurrent    -min(encoder, decoder): encode_image returns (its activations freed) before
                      the decoder runs, so the peak holds the larger of the two, not their sum
    coarse            N·V·6 (zoom-out logits float32, two bool masks: sigmoid > 0.5 and logits > 0)
    accumulators      prompt_group · band·q: the row sums of the prompts stitched together
    masks / logits    N·Vc (bool) and, with return_logits, N·Vc·q: crop-frame results, host memory,
                      so counted on the CPU only
    output            N·Vo, and with return_logits N·Vo·4 more: the masks (and probabilities) on
                      the input grid, host memory, CPU only
    slack             10% of the transient items (allocator rounding and fragmentation) + 128 MiB
                      (the text tower, Python objects, small tensors, and the whole calls' run-to-run
                      spread of about ±40 MB on the CPU)

`mode="exact"` has no choices to make: the official algorithm fixes its memory (one prompt at a
time, window batch 1, float32 sums on the host, the crop held whole in float32, which `preprocess`
made before planning, so it is in the baseline). `plan_exact` estimates it and refuses a limit
below it up front. With Vp = voxels of the crop padded to at least a window per axis (the
zoom-in ROI's padded size can reach it), the items besides weights, baseline, encoder (batch 1)
and decoder (1 prompt), of which again only the larger counts (not_concurrent), are

    zoom_out          3·V·4 (the resized crop, the window or zoom-out prompt map, one window's
                      logits) on the CPU; on CUDA V·4 (the input's device copy)
    zoom_in           Vp·40 + Vc·13 with zoom_in, else Vc·8: the padded ROI image (4), its
                      global_preds and their padded copy (int64, 8 + 8), the prompt map and its
                      gather (4 + 4), the sums, counts and mean (4 + 4 + 4) over Vp; the coarse
                      logits, their copy, the sigmoid and its mask (4 + 4 + 4 + 1) over Vc.
                      Host memory: CPU only
    results           N·Vc·4: every prompt's float32 logits are kept until the end (CPU only)
    masks / output    N·Vc + Vc·4 (the masks and one sigmoid) and N·Vo (+ N·Vo·4 probabilities
                      with return_logits), as in fast mode (CPU only)
    slack             as above
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from ..errors import BudgetError, MemorySpecError
from ..geometry.sliding_window import global_grid, padded_size
from ..model.network import model_device
from .memory import current_rss

MAX_WINDOW_BATCH = 8
_FIXED_SLACK = 128 << 20  # Python objects, tqdm, cuBLAS workspace, the text tower, small tensors
_SLACK_FRACTION = 0.10
# Decimal prefixes for "KB/MB/GB/TB" (and bare "K/M/G/T"), binary for "KiB/MiB/GiB/TiB": the SI
# meaning, as disk vendors, `accelerate` and most CLIs use it. 2GB = 2e9 bytes, 2GiB = 2**31.
_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _UNITS[_p] = _UNITS[_p + "b"] = 1000**_i
    _UNITS[_p + "ib"] = 1024**_i
# a sign is read, so that "-1GB" is answered as a negative size rather than as unreadable
_SPEC = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_memory(spec: Union[int, float, str]) -> int:
    """A memory size -> bytes. Accepts ints/floats (bytes) and strings such as "2GB" (2·10⁹),
    "512MiB" (512·2²⁰), "1.5G" (1.5·10⁹), "800 mb", "1e9"; units are case-insensitive."""
    if isinstance(spec, bool):
        raise MemorySpecError(f"memory size must be a number of bytes or a string like '2GB', got {spec!r}")
    if isinstance(spec, (int, float)):
        value = float(spec)
    elif isinstance(spec, str):
        m = _SPEC.match(spec)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise MemorySpecError(
                f"cannot read memory size {spec!r}: use bytes or a number with a unit, e.g. '2GB' (10⁹), "
                "'512MiB' (2²⁰), '1.5G'"
            )
        value = float(m.group(1)) * _UNITS[unit]
    else:
        raise MemorySpecError(f"memory size must be an int or a string like '2GB', got {type(spec).__name__}")
    if not math.isfinite(value) or value < 1:
        raise MemorySpecError(f"memory size must be a positive, finite number of bytes, got {spec!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """Bytes -> '1.23 GB' / '45.6 MB' / '789 kB' (decimal, like parse_memory's 'GB')."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Plan:
    """How `run_fast` spends memory.

    device:             where the model runs (the model's device).
    window_batch:       zoom-in windows encoded per encoder call (1..8).
    accumulator_dtype:  torch.float32 or torch.float16 sums of window logits.
    stitch_device:      where the zoom-in row sums and the coarse results live (the finished
                        masks always go to host memory).
    cache_windows:      window embeddings kept for reuse by later prompt groups (LRU).
    decode_batch:       prompts per decoder call against one embedding.
    prompt_group:       prompts stitched together; groups share the window cache. Prompts are
                        admitted by row-sum voxels: prompt_group · band(crop) in total.
    estimated_peak_bytes, breakdown: the cost model's figure for this plan (see module docstring).
    max_memory:         the limit planned against (bytes), None when none was known.
    """

    device: torch.device
    window_batch: int = 1
    accumulator_dtype: torch.dtype = torch.float32
    stitch_device: Optional[torch.device] = None
    cache_windows: int = 0
    decode_batch: int = 1
    prompt_group: int = 1
    estimated_peak_bytes: int = 0
    breakdown: dict[str, int] = field(default_factory=dict)
    max_memory: Optional[int] = None

    def summary(self) -> dict:
        """JSON-ready description (dtypes and devices as strings, bytes as ints)."""
        return {
            "device": str(self.device),
            "window_batch": self.window_batch,
            "accumulator_dtype": str(self.accumulator_dtype).replace("torch.", ""),
            "stitch_device": str(self.stitch_device),
            "cache_windows": self.cache_windows,
            "decode_batch": self.decode_batch,
            "prompt_group": self.prompt_group,
            "estimated_peak_bytes": int(self.estimated_peak_bytes),
            "max_memory": self.max_memory,
            "breakdown": {k: int(v) for k, v in self.breakdown.items()},
        }

    def __post_init__(self):
        object.__setattr__(self, "device", torch.device(self.device))
        stitch = self.device if self.stitch_device is None else torch.device(self.stitch_device)
        object.__setattr__(self, "stitch_device", stitch)
        if self.accumulator_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"accumulator_dtype must be float32 or float16, got {self.accumulator_dtype}")
        if min(self.window_batch, self.decode_batch, self.prompt_group) < 1 or self.cache_windows < 0:
            raise ValueError("window_batch, decode_batch and prompt_group must be >= 1, cache_windows >= 0")


# ------------------------------------------------------------------------------ measurements
def _weight_bytes(model) -> int:
    """Bytes of all parameters and buffers (works on the meta device too)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _encoder_side_bytes(model) -> int:
    """Bytes of everything but the text tower: what autocast copies to 16 bits per call."""
    text = getattr(model, "text_encoder", None)
    return _weight_bytes(model) - (_weight_bytes(text) if text is not None else 0)


def same_device(a: Union[str, torch.device], b: Union[str, torch.device]) -> bool:
    """Device equality that treats "cuda" and "cuda:<current>" (any unindexed form) as equal."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _baseline(device: torch.device, model) -> int:
    """Memory already held that the call's peak sits on top of (bytes, weights excluded)."""
    weights = _weight_bytes(model) if same_device(model_device(model), device) else 0
    if device.type == "cuda":
        return max(0, torch.cuda.memory_allocated(device) - weights)
    return max(0, current_rss() - weights)


def _available(device: torch.device) -> Optional[int]:
    """What the call could use at most when no limit is given: free device memory plus our own
    cached blocks on CUDA, MemAvailable plus our RSS on the CPU; None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 + current_rss()
    except OSError:
        pass
    return None


def band_voxels(shape: Sequence[int], window: Sequence[int]) -> int:
    """Voxels of the row sums one prompt's zoom-in keeps alive at once over a region `shape`
    (D, H, W): at most one window depth of its D-rows (see fast.py's stitching)."""
    return min(int(shape[0]), int(window[0])) * int(shape[1]) * int(shape[2])


def _num_windows(crop_shape: Sequence[int], window: Sequence[int]) -> int:
    return math.prod(len(s) for s in global_grid(crop_shape, window))


# ------------------------------------------------------------------------------ the cost model
def encoder_window_bytes(cfg, a: int = 4) -> int:
    """Activation bytes of one window in `encode_image` (module docstring, item "encoder")."""
    C, S, M, V = cfg.hidden_size, cfg.num_patches, cfg.mlp_dim, math.prod(cfg.spatial_size)
    return 2 * V * 4 + S * cfg.patch_dim * 4 + S * (4 * C * 4 + a * (4 * C + 2 * M)) + C * S * 4


def encoder_bytes(cfg, window_batch: int, a: int = 4, on_cpu: bool = True) -> int:
    """Activation bytes of one `encode_image` of window_batch windows (docstring, "encoder")."""
    b = int(window_batch)
    windows = min(b, 4) + max(0, b - 4) / 3 if on_cpu else b  # CPU: big batches are mmap'd (docstring)
    return int(windows * encoder_window_bytes(cfg, a))


def decoder_bytes(cfg, decode_batch: int) -> int:
    """Activation bytes of one `decode` call of decode_batch prompts (module docstring, "decoder")."""
    C, S, V = cfg.hidden_size, cfg.num_patches, math.prod(cfg.spatial_size)
    return 15 * S * C * 4 + int(decode_batch) * (3 * S * C * 4 + 2 * V * 4)


def estimate(
    model,
    crop_shape: Sequence[int],
    n_prompts: int,
    *,
    window_batch: int = 1,
    accumulator_dtype: torch.dtype = torch.float16,
    device: Union[str, torch.device, None] = None,
    stitch_device: Union[str, torch.device, None] = None,
    cache_windows: int = 0,
    decode_batch: int = 1,
    prompt_group: int = 1,
    return_logits: bool = False,
    baseline_bytes: Optional[int] = None,
    output_voxels: Optional[int] = None,
) -> tuple[int, dict[str, int]]:
    """Peak memory of one `run_fast` call under the cost model in the module docstring.

    Args:
        model: a `SegVol` (may live on the meta device: only sizes are read).
        crop_shape: (D', H', W') of the preprocessed crop.
        n_prompts: number of prompts (masks).
        device: where the model runs (default: the model's device).
        baseline_bytes: override the measured baseline (other memory already held), e.g. in tests.
        output_voxels: voxels of the input grid the masks are pasted onto (default: the crop's).
        The other arguments are `Plan` fields.

    Returns:
        (total bytes, breakdown item -> bytes). Items that do not apply are 0.
    """
    cfg = model.config
    dev = torch.device(device) if device is not None else model_device(model)
    stitch = torch.device(stitch_device) if stitch_device is not None else dev
    on_cpu = dev.type == "cpu"
    C, S = cfg.hidden_size, cfg.num_patches
    V, Vc, N = math.prod(cfg.spatial_size), math.prod(crop_shape), int(n_prompts)
    Vo = Vc if output_voxels is None else int(output_voxels)
    reduced = getattr(model, "precision", "fp32") != "fp32"
    a = 2 if reduced else 4
    q = torch.tensor([], dtype=accumulator_dtype).element_size()
    on_dev = same_device(stitch, dev)  # stitching (and the crop) on the model's device

    weights = _weight_bytes(model)
    items = {
        "weights": weights,
        "baseline": _baseline(dev, model) if baseline_bytes is None else int(baseline_bytes),
        "autocast_weights": _encoder_side_bytes(model) // 2 if reduced else 0,
        "zoom_out": (1 if on_cpu else 2) * V * 4,
    }
    items["encoder"] = encoder_bytes(cfg, window_batch, a, on_cpu)
    items["embedding_cache"] = cache_windows * C * S * 4
    items["decoder"] = decoder_bytes(cfg, decode_batch)
    stitched_here = on_dev or on_cpu  # items that live on the stitch device count when it is budgeted
    items["coarse"] = N * V * 6 if stitched_here else 0
    items["accumulators"] = prompt_group * band_voxels(crop_shape, cfg.spatial_size) * q if stitched_here else 0
    items["masks"] = N * Vc if on_cpu else 0
    items["logits"] = N * Vc * q if (on_cpu and return_logits) else 0
    items["output"] = N * Vo * (1 + (4 if return_logits else 0)) if on_cpu else 0
    items["not_concurrent"] = -min(items["encoder"], items["decoder"])
    transient = sum(v for k, v in items.items() if k not in ("weights", "baseline"))
    items["slack"] = int(_SLACK_FRACTION * transient) + _FIXED_SLACK
    return sum(items.values()), items


def estimate_exact(
    model,
    crop_shape: Sequence[int],
    n_prompts: int,
    *,
    zoom_in: bool = True,
    device: Union[str, torch.device, None] = None,
    return_logits: bool = False,
    baseline_bytes: Optional[int] = None,
    output_voxels: Optional[int] = None,
) -> tuple[int, dict[str, int]]:
    """Peak memory of one `run_exact` call and its paste-back (module docstring, exact mode).

    Same arguments and return value as `estimate`; the crop is assumed materialised already
    (the baseline holds it), as `segment()` does before planning.
    """
    cfg = model.config
    dev = torch.device(device) if device is not None else model_device(model)
    on_cpu = dev.type == "cpu"
    V, Vc, N = math.prod(cfg.spatial_size), math.prod(crop_shape), max(1, int(n_prompts))
    Vp = math.prod(padded_size(crop_shape, cfg.spatial_size))
    Vo = Vc if output_voxels is None else int(output_voxels)
    a = 2 if getattr(model, "precision", "fp32") != "fp32" else 4
    items = {
        "weights": _weight_bytes(model),
        "baseline": _baseline(dev, model) if baseline_bytes is None else int(baseline_bytes),
        "autocast_weights": _encoder_side_bytes(model) // 2 if a == 2 else 0,
        "zoom_out": (3 if on_cpu else 1) * V * 4,
        "encoder": encoder_window_bytes(cfg, a),
        "decoder": decoder_bytes(cfg, 1),
        "not_concurrent": -min(encoder_window_bytes(cfg, a), decoder_bytes(cfg, 1)),
        "zoom_in": (Vp * 40 + Vc * 13 if zoom_in else Vc * 8) if on_cpu else 0,
        "results": N * Vc * 4 if on_cpu else 0,
        "masks": N * Vc + Vc * 4 if on_cpu else 0,
        "output": N * Vo * (1 + (4 if return_logits else 0)) if on_cpu else 0,
    }
    transient = sum(v for k, v in items.items() if k not in ("weights", "baseline"))
    items["slack"] = int(_SLACK_FRACTION * transient) + _FIXED_SLACK
    return sum(items.values()), items


def plan_exact(
    model,
    crop_shape: Sequence[int],
    n_prompts: int,
    max_memory: Union[int, str, None] = None,
    device: Union[str, torch.device, None] = None,
    *,
    zoom_in: bool = True,
    return_logits: bool = False,
    baseline_bytes: Optional[int] = None,
    output_voxels: Optional[int] = None,
) -> Plan:
    """The (only) `Plan` of `mode="exact"`: window batch 1, one prompt at a time, float32 sums on
    the host, no cache; with its estimate. Raises `BudgetError` when max_memory is below it."""
    dev = torch.device(device) if device is not None else model_device(model)
    total, items = estimate_exact(
        model,
        crop_shape,
        n_prompts,
        zoom_in=zoom_in,
        device=dev,
        return_logits=return_logits,
        baseline_bytes=baseline_bytes,
        output_voxels=output_voxels,
    )
    limit = parse_memory(max_memory) if max_memory is not None else None
    if limit is not None and total > limit:
        raise BudgetError(_budget_message(limit, total, items, dev, mode="exact"), total, limit, items)
    return Plan(
        device=dev,
        stitch_device="cpu",
        accumulator_dtype=torch.float32,
        estimated_peak_bytes=total,
        breakdown=items,
        max_memory=limit,
    )


# ------------------------------------------------------------------------------ the planner
def _largest(lo: int, hi: int, fits: Callable[[int], bool]) -> int:
    """Largest v in [lo, hi] with fits(v), for fits monotone decreasing; lo is assumed to fit."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_fast(
    model,
    crop_shape: Sequence[int],
    n_prompts: int,
    max_memory: Union[int, str, None] = None,
    device: Union[str, torch.device, None] = None,
    *,
    return_logits: bool = False,
    baseline_bytes: Optional[int] = None,
    output_voxels: Optional[int] = None,
) -> Plan:
    """Choose a `Plan` for `run_fast` that keeps the estimated peak under `max_memory`.

    Args:
        model: a `SegVol`.
        crop_shape: (D', H', W') of the preprocessed crop.
        n_prompts: number of prompts.
        max_memory: limit (bytes or "2GB"); None plans against what the machine has free and never
            raises (the guess may be wrong; the smallest plan is used when nothing fits).
        device: where the model runs (default: the model's device).
        return_logits: the caller will ask run_fast for crop-frame logits too.
        baseline_bytes: override the measured baseline (tests).
        output_voxels: voxels of the input grid the masks go back onto (default: the crop's).

    Raises:
        BudgetError: max_memory is below what the smallest plan needs; the message names that
            minimum and the biggest items.
    """
    dev = torch.device(device) if device is not None else model_device(model)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    explicit = max_memory is not None
    limit = parse_memory(max_memory) if explicit else (_available(dev) if baseline_bytes is None else None)
    n = max(1, int(n_prompts))
    base = _baseline(dev, model) if baseline_bytes is None else int(baseline_bytes)
    n_windows = _num_windows(crop_shape, model.config.spatial_size)

    def cost(**kw) -> tuple[int, dict[str, int]]:
        return estimate(
            model,
            crop_shape,
            n,
            device=dev,
            return_logits=return_logits,
            baseline_bytes=base,
            output_voxels=output_voxels,
            **kw,
        )

    def fits(**kw) -> bool:
        return limit is None or cost(**kw)[0] <= limit

    stitches = [dev] if dev.type == "cpu" else [dev, torch.device("cpu")]
    choice = next(
        (
            (dt, st)
            for dt in (torch.float32, torch.float16)
            for st in stitches
            if fits(accumulator_dtype=dt, stitch_device=st)
        ),
        None,
    )
    if choice is None:
        smallest = dict(accumulator_dtype=torch.float16, stitch_device=stitches[-1])
        if explicit:
            total, items = cost(**smallest)
            raise BudgetError(_budget_message(limit, total, items, dev), total, limit, items)
        choice = (smallest["accumulator_dtype"], smallest["stitch_device"])
        limit = None  # nothing fits the guess: run the smallest plan and let the allocator decide
    kw = dict(accumulator_dtype=choice[0], stitch_device=choice[1])
    kw["window_batch"] = _largest(1, min(MAX_WINDOW_BATCH, n_windows), lambda b: fits(**kw, window_batch=b))
    kw["prompt_group"] = _largest(1, n, lambda g: fits(**kw, prompt_group=g))
    kw["decode_batch"] = _largest(1, kw["prompt_group"], lambda d: fits(**kw, decode_batch=d))
    # the cache only serves later prompt groups: with every prompt in one group it would never hit
    kw["cache_windows"] = (
        0 if kw["prompt_group"] >= n else _largest(0, n_windows, lambda c: fits(**kw, cache_windows=c))
    )
    total, items = cost(**kw)
    return Plan(device=dev, estimated_peak_bytes=total, breakdown=items, max_memory=limit, **kw)


def _budget_message(limit: int, total: int, items: dict[str, int], device: torch.device, mode: str = "fast") -> str:
    where = "device memory" if device.type == "cuda" else "process memory (RSS)"
    top = sorted(((v, k) for k, v in items.items() if v > 0), reverse=True)[:3]
    biggest = ", ".join(f"{k} {format_bytes(v)}" for v, k in top)
    if mode == "fast":
        smallest = "window batch 1, float16 accumulators, one prompt at a time"
        advice = "segment fewer prompts per call"
    else:  # the official algorithm has nothing to trade for memory
        smallest = "the official algorithm: one prompt and one window at a time, float32"
        advice = "use mode='fast' (it plans within the limit), segment fewer prompts per call"
    return (
        f"max_memory={format_bytes(limit)} cannot be met on {device}: mode={mode!r} needs at least "
        f"{format_bytes(total)} of {where} here ({smallest}). Biggest items: {biggest}. Raise max_memory, "
        f"{advice}, or free memory held elsewhere (the baseline counts what this process already holds)."
    )
