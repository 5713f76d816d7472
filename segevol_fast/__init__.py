"""segevol_fast: fast, memory-frugal SegVol-class 3-D medical segmentation.

Public API (more arrives as the model and inference land):
    segevol_fast.ops       kernels with plain-PyTorch `*_ref` twins and backend dispatch
    segevol_fast.info()    versions, backends and devices, for bug reports
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import errors, ops  # noqa: E402
from .info import info  # noqa: E402
from .model import SegVolConfig  # noqa: E402

__all__ = ["__version__", "errors", "ops", "info", "SegVolConfig"]
