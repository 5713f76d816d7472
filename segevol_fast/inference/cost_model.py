"""The memory cost model: one `segment()` call's peak, item by item, in both modes.

The peak is bounded where it matters: device memory on CUDA (what `torch.cuda.max_memory_allocated`
counts), process memory (RSS) on the CPU. `budget.py` plans within a limit from these estimates.

Cost model (bytes; every item is summed as if all were alive at once, although the zoom-out and
zoom-in stages follow each other, so the figure is an upper bound; the one exception is the
encoder and the decoder, which never run at the same time: only the larger of the two counts).
With C = hidden, S = tokens per window, M = MLP width, V = voxels per window, Vc = voxels of the
crop, Vo = voxels of the input grid, N = prompts, a = 4 (fp32) or 2 (reduced precision) bytes for
matmul outputs, q = accumulator bytes, band = min(D', window depth)·H'·W' (the most D-rows of
sums one prompt keeps, stitch.py), b = window_batch on CUDA and min(b, 4) + max(0, b - 4)/3 on the
CPU (below).

Items of both modes:

    weights           sum of parameter and buffer bytes (+ half of it for autocast's weight copies)
    baseline          CUDA: memory_allocated() minus the weights; CPU: current RSS minus the weights
                      (the scan itself is in here: fast mode reads windows from it, no crop copy)
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
    decoder           15·S·C·4 + decode_batch · (3·S·C·4 + 2·V·4): a fixed part (the first call's
                      workspaces and the two-way transformer's image side, which the prompts share
                      through broadcasting) and per prompt three image-side S·C copies plus the
                      low-res and upsampled logits: 130 / 237 / 380 MB for 1 / 4 / 8 prompts;
                      measured likewise: 113 / 268 / 327 MB (not linear: allocator reuse; the
                      slack covers the gap at 4)
    not_concurrent    -min(encoder, decoder): encode_image returns (its activations freed) before
                      the decoder runs, so the peak holds the larger of the two, not their sum
    masks             N·Vc (bool): crop-frame masks, host memory, so counted on the CPU only
    output            N·Vo, and with return_logits N·Vo·4 more: the masks (and probabilities) on
                      the input grid, host memory, CPU only
    slack             10% of the transient items (allocator rounding and fragmentation) + 128 MiB
                      (the text tower, Python objects, small tensors, and the whole calls' run-to-run
                      spread of about ±40 MB on the CPU)

`mode="fast"` (`estimate`) adds

    zoom_out          V·4 on the CPU, 2·V·4 on CUDA (the resized image, and its device copy)
    embedding_cache   cache_windows · C·S·4
    coarse            N·V·6 (zoom-out logits float32, two bool masks: sigmoid > 0.5 and logits > 0)
    accumulators      prompt_group · band·q: the row sums of the prompts stitched together
    logits            with return_logits, N·Vc·q: crop-frame logits, host memory, CPU only

`mode="exact"` (`estimate_exact`) runs the official algorithm: one prompt at a time, window batch
1, float32 sums on the host, the crop held whole in float32, which `preprocess` made before
planning, so it is in the baseline. With Vp = voxels of the crop padded to at least a window per
axis (the zoom-in ROI's padded size can reach it), it adds

    zoom_out          3·V·4 (the resized crop, the window or zoom-out prompt map, one window's
                      logits) on the CPU; on CUDA V·4 (the input's device copy)
    zoom_in           Vp·40 + Vc·13 with zoom_in, else Vc·8: the padded ROI image (4), its
                      global_preds and their padded copy (int64, 8 + 8), the prompt map and its
                      gather (4 + 4), the sums, counts and mean (4 + 4 + 4) over Vp; the coarse
                      logits, their copy, the sigmoid and its mask (4 + 4 + 4 + 1) over Vc.
                      Host memory: CPU only
    results           N·Vc·4: every prompt's float32 logits are kept until the end (CPU only)
    masks             Vc·4 more: one sigmoid (CPU only)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from ..geometry.sliding_window import padded_size
from ..model.network import model_device
from .memory import current_rss

FIXED_SLACK = 128 << 20  # Python objects, tqdm, cuBLAS workspace, the text tower, small tensors
SLACK_FRACTION = 0.10
# The breakdown's items in the order both modes report them (each mode has a subset).
ITEMS = (
    "weights",
    "baseline",
    "autocast_weights",
    "zoom_out",
    "encoder",
    "embedding_cache",
    "decoder",
    "zoom_in",
    "coarse",
    "accumulators",
    "results",
    "masks",
    "logits",
    "output",
    "not_concurrent",
    "slack",
)


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


def measured_baseline(device: torch.device, model) -> int:
    """Memory already held that the call's peak sits on top of (bytes, weights excluded)."""
    weights = _weight_bytes(model) if same_device(model_device(model), device) else 0
    if device.type == "cuda":
        return max(0, torch.cuda.memory_allocated(device) - weights)
    return max(0, current_rss() - weights)


def band_voxels(shape: Sequence[int], window: Sequence[int]) -> int:
    """Voxels of the row sums one prompt's zoom-in keeps alive at once over a region `shape`
    (D, H, W): at most one window depth of its D-rows (see stitch.py)."""
    return min(int(shape[0]), int(window[0])) * int(shape[1]) * int(shape[2])


# ------------------------------------------------------------------------------ network terms
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


# ------------------------------------------------------------------------------ both modes' items
@dataclass(frozen=True)
class _Call:
    """One call's sizes, in the module docstring's letters."""

    cfg: Any
    device: torch.device
    a: int  # bytes of a matmul output
    V: int
    Vc: int
    Vo: int
    N: int
    return_logits: bool

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"


def _call(model, crop_shape, n: int, device, output_voxels, return_logits: bool) -> _Call:
    cfg, Vc = model.config, math.prod(crop_shape)
    return _Call(
        cfg=cfg,
        device=torch.device(device) if device is not None else model_device(model),
        a=2 if getattr(model, "precision", "fp32") != "fp32" else 4,
        V=math.prod(cfg.spatial_size),
        Vc=Vc,
        Vo=Vc if output_voxels is None else int(output_voxels),
        N=n,
        return_logits=return_logits,
    )


def _fp32_weights(model) -> bool:
    return getattr(model, "weights_precision", "fp32") == "fp32"


def _peak(
    model, call: _Call, baseline_bytes: Optional[int], window_batch: int, decode_batch: int, own: dict[str, int]
) -> tuple[int, dict[str, int]]:
    """The items of both modes plus the mode's `own` (one of a shared item's name adds to it),
    then not_concurrent and slack: (total, breakdown in ITEMS order)."""
    host = call.on_cpu
    items = {
        "weights": _weight_bytes(model),
        "baseline": measured_baseline(call.device, model) if baseline_bytes is None else int(baseline_bytes),
        # 16-bit copies autocast makes of fp32 weights; weights cast by the user have none
        "autocast_weights": _encoder_side_bytes(model) // 2 if call.a == 2 and _fp32_weights(model) else 0,
        "encoder": encoder_bytes(call.cfg, window_batch, call.a, host),
        "decoder": decoder_bytes(call.cfg, decode_batch),
        "masks": call.N * call.Vc if host else 0,
        "output": call.N * call.Vo * (1 + (4 if call.return_logits else 0)) if host else 0,
    }
    for name, value in own.items():
        items[name] = items.get(name, 0) + value
    items["not_concurrent"] = -min(items["encoder"], items["decoder"])
    transient = sum(v for k, v in items.items() if k not in ("weights", "baseline"))
    items["slack"] = int(SLACK_FRACTION * transient) + FIXED_SLACK
    items = {k: items[k] for k in ITEMS if k in items}
    return sum(items.values()), items


# ------------------------------------------------------------------------------ the two modes
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
    c = _call(model, crop_shape, int(n_prompts), device, output_voxels, return_logits)
    stitch = torch.device(stitch_device) if stitch_device is not None else c.device
    q = torch.tensor([], dtype=accumulator_dtype).element_size()
    # items that live on the stitch device count when it is budgeted: the model's device, or the CPU
    stitched_here = same_device(stitch, c.device) or c.on_cpu
    own = {
        "zoom_out": (1 if c.on_cpu else 2) * c.V * 4,
        "embedding_cache": cache_windows * c.cfg.hidden_size * c.cfg.num_patches * 4,
        "coarse": c.N * c.V * 6 if stitched_here else 0,
        "accumulators": prompt_group * band_voxels(crop_shape, c.cfg.spatial_size) * q if stitched_here else 0,
        "logits": c.N * c.Vc * q if (c.on_cpu and return_logits) else 0,
    }
    return _peak(model, c, baseline_bytes, window_batch, decode_batch, own)


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
    c = _call(model, crop_shape, max(1, int(n_prompts)), device, output_voxels, return_logits)
    Vp = math.prod(padded_size(crop_shape, c.cfg.spatial_size))
    own = {
        "zoom_out": (3 if c.on_cpu else 1) * c.V * 4,
        "zoom_in": (Vp * 40 + c.Vc * 13 if zoom_in else c.Vc * 8) if c.on_cpu else 0,
        "results": c.N * c.Vc * 4 if c.on_cpu else 0,
        "masks": c.Vc * 4 if c.on_cpu else 0,  # one sigmoid beside the masks
    }
    return _peak(model, c, baseline_bytes, 1, 1, own)
