"""`segevol_fast.info()`: what users paste into bug reports."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from typing import Any

import torch

from . import _native
from .ops import backend_report
from .version import __version__


def _triton_version(import_error: str | None) -> str | None:
    if import_error is not None:
        return None
    import triton

    return triton.__version__


def _cpu_auto_precision() -> str:
    from .inference.precision import cpu_bf16_native

    try:
        native, why = cpu_bf16_native()
    except Exception as exc:  # a bad override in the environment: report it, never raise
        return f"error: {exc}"
    return f"{'bf16' if native else 'fp32'} ({why})"


def info() -> dict[str, Any]:
    """Versions, build flags, devices and the backend each op picks on each device type."""
    mod = _native.native()
    build = dict(mod.build_info()) if mod is not None else None
    devices = ["cpu"]
    gpus = []
    if torch.cuda.is_available():
        devices.append("cuda")
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(f"{i}: {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB)")
    ops = backend_report(devices)
    return {
        "segevol_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        # thread-count-independent GEMMs (determinism.py); a different value here explains results
        # that change with the number of threads
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        # what precision="auto" runs fast mode in on this CPU, and why (inference/precision.py)
        "cpu_auto_precision": _cpu_auto_precision(),
        "cuda_available": torch.cuda.is_available(),
        "gpus": gpus,
        "nvcc": shutil.which("nvcc"),
        "triton": _triton_version(ops["triton_import_error"]),
        "triton_import_error": ops["triton_import_error"],
        "triton_interpret": ops["triton_interpret"],
        "native_extension": build,
        "native_import_error": _native.native_import_error(),
        "forced_backend": ops["forced_backend"],
        "devices": devices,
        "ops": ops["ops"],
    }


def format_info(d: dict[str, Any] | None = None) -> str:
    """Human-readable multi-line rendering of `info()`."""
    d = info() if d is None else d
    lines = []
    for key, value in d.items():
        if key == "ops":
            lines.append("ops:")
            for op, per_device in value.items():
                for dev, sel in per_device.items():
                    lines.append(
                        f"  {op} [{dev}]: {sel['selected']} (available: {', '.join(sel['available']) or 'none'})"
                    )
        elif key == "native_extension" and isinstance(value, dict):
            lines.append("native_extension:")
            for k, v in value.items():
                lines.append(f"  {k}: {v}")
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
