"""Which arithmetic a segment() call runs in: `precision="auto"` resolved per device and mode.

The evidence behind the CPU rule is recorded by `bench/cpu_encoder.py` (README, "Measured: the
CPU encoder and precision"): SegVol's encoder is GEMM- and attention-bound, so bf16 pays only where
the CPU executes bf16 dot products in hardware (AVX512-BF16 or AMX-BF16). Elsewhere oneDNN
emulates bf16 with conversions around fp32 arithmetic, which made the encoder about 3x *slower*
than fp32 on an AVX-512 Xeon without those instructions. Masks agree closely either way (measured
fp32-vs-bf16 agreement on the shared CT and MRI is in the same README section).

`SEGEVOL_FAST_CPU_BF16=0|1` overrides the detection (a VM may hide or misreport CPU flags; the
test suite pins it to 0 so results do not depend on the CI machine).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
from typing import Iterator, Optional

import torch

from ..errors import InvalidArgumentError
from ..model.network import PRECISIONS, check_weights_precision

# What a call may ask for: the network's own precisions, or "auto" (resolved below).
PRECISION_REQUESTS = ("auto", *PRECISIONS)
CPU_BF16_ENV = "SEGEVOL_FAST_CPU_BF16"
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of the bf16 dot-product instructions


def _cpuinfo_flags() -> set[str]:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((row for row in text.splitlines() if row.startswith("flags")), "")
    return set(line.partition(":")[2].split())


@functools.lru_cache(maxsize=None)
def _detected_cpu_bf16() -> tuple[bool, str]:
    # torch's own CPUID checks first (they work on every OS); /proc/cpuinfo if they are missing.
    probes = (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported"))
    found = [flag for flag, fn in probes if getattr(torch.cpu, fn, lambda: False)()]
    if not found:
        found = [flag for flag in _BF16_FLAGS if flag in _cpuinfo_flags()]
    if found:
        return True, f"CPU has {' and '.join(found)}"
    return False, "CPU has no bf16 dot-product instructions (avx512_bf16 / amx_bf16)"


def cpu_bf16_native() -> tuple[bool, str]:
    """(whether this CPU computes bf16 GEMMs in hardware, why we think so)."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise InvalidArgumentError(f"{CPU_BF16_ENV} must be 0 or 1, got {forced!r}")
        return forced == "1", f"{CPU_BF16_ENV}={forced}"
    return _detected_cpu_bf16()


@contextlib.contextmanager
def inference_state(model, precision: str) -> Iterator[None]:
    """The model in eval mode under `precision` for the block, then back as it was (training flag
    and precision), whatever the block raises: inference never changes the caller's model."""
    was_training, previous = model.training, model.precision
    model.eval()
    model.set_precision(precision)
    try:
        yield
    finally:
        model.train(was_training)
        model.set_precision(previous)


def resolve_precision(
    requested: Optional[str], model_precision: str, device: torch.device, mode: str, weights: str = "fp32"
) -> str:
    """The autocast precision a segment() call runs under.

    `weights` is the model's `weights_precision`: weights the caller cast to bf16 / fp16 compute in
    that dtype only, so "auto" resolves to it and any other request is an InvalidArgumentError
    (raised here, before the scan is read).

    "auto" (or None):
      * the model's own precision when it was set to bf16/fp16;
      * exact mode: float32 (it follows the official float32 pipeline);
      * fast mode on CUDA: bf16 where the GPU supports it, else fp16 (tensor cores, half the
        activations);
      * fast mode on the CPU: bf16 when the CPU computes it in hardware (`cpu_bf16_native`),
        float32 otherwise;
      * float32 on anything else.
    "fp32" / "bf16" / "fp16" force one.
    """
    requested = "auto" if requested is None else requested
    if requested not in PRECISION_REQUESTS:
        raise InvalidArgumentError(f"precision must be one of {PRECISION_REQUESTS}, got {requested!r}")
    if requested != "auto":
        check_weights_precision(requested, weights)
        return requested
    if weights != "fp32":
        return weights
    kind = torch.device(device).type
    if model_precision != "fp32" or mode != "fast":
        return model_precision
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "cpu" and cpu_bf16_native()[0]:
        return "bf16"
    return "fp32"
