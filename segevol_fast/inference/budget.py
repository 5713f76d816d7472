"""Memory budget of `segment()`: parse a limit, then choose a plan (fast mode) or check the one the
official algorithm fixes (exact mode) against the call's estimated peak (`cost_model.py`, which
documents every item of the estimate).

`plan_fast` picks, within the limit,

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

`mode="exact"` has no choices to make: the official algorithm fixes its memory (one prompt at a
time, window batch 1, float32 sums on the host). `plan_exact` estimates it and refuses a limit
below it up front.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from ..errors import BudgetError, MemorySpecError
from ..geometry.sliding_window import global_grid
from ..model.network import model_device
from .approximations import Approximations
from .cost_model import (
    band_voxels,
    decoder_bytes,
    encoder_bytes,
    encoder_window_bytes,
    estimate,
    estimate_exact,
    measured_baseline,
    same_device,
)
from .memory import current_rss

__all__ = [
    "MAX_WINDOW_BATCH",
    "Plan",
    "band_voxels",
    "decoder_bytes",
    "encoder_bytes",
    "encoder_window_bytes",
    "estimate",
    "estimate_exact",
    "format_bytes",
    "parse_memory",
    "plan_exact",
    "plan_fast",
    "same_device",
]

MAX_WINDOW_BATCH = 8
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
    estimated_peak_bytes, breakdown: the cost model's figure for this plan (`cost_model.py`).
    max_memory:         the limit planned against (bytes), None when none was known.
    approximations:     what the zoom-in may leave out (`approximations.py`); default none, the
                        official zoom-in. The estimate assumes whole windows, an upper bound.
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
    approximations: Approximations = field(default_factory=Approximations.none)

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
            "approximations": self.approximations.summary(),
        }

    def __post_init__(self):
        object.__setattr__(self, "device", torch.device(self.device))
        stitch = self.device if self.stitch_device is None else torch.device(self.stitch_device)
        object.__setattr__(self, "stitch_device", stitch)
        if self.accumulator_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"accumulator_dtype must be float32 or float16, got {self.accumulator_dtype}")
        if min(self.window_batch, self.decode_batch, self.prompt_group) < 1 or self.cache_windows < 0:
            raise ValueError("window_batch, decode_batch and prompt_group must be >= 1, cache_windows >= 0")


# ------------------------------------------------------------------------------ what the planner measures
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


def _num_windows(crop_shape: Sequence[int], window: Sequence[int], overlap: float = 0.5) -> int:
    return math.prod(len(s) for s in global_grid(crop_shape, window, overlap))


# ------------------------------------------------------------------------------ the planners
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
    approximations: Optional[Approximations] = None,
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
        approximations: what the zoom-in may leave out; None: nothing (the official zoom-in).
            Windows are costed whole (an upper bound when tokens are left out).

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
    base = measured_baseline(dev, model) if baseline_bytes is None else int(baseline_bytes)
    approx = approximations if approximations is not None else Approximations.none()
    n_windows = _num_windows(crop_shape, model.config.spatial_size, approx.overlap)

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
    return Plan(device=dev, estimated_peak_bytes=total, breakdown=items, max_memory=limit, approximations=approx, **kw)


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
