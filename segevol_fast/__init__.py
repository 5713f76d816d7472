"""segevol_fast: fast, memory-frugal SegVol-class 3-D medical segmentation.

Public API:
    SegVol, SegVolConfig   the model (`SegVol.from_pretrained(path)`), encode_image/encode_text/decode,
                           segment(volume, text=...) and session(volume)
    load_volume, Volume    NIfTI / DICOM / arrays in, with affine and spacing
    segevol_fast.ops       kernels with plain-PyTorch `*_ref` twins and backend dispatch
    segevol_fast.info()    versions, backends and devices, for bug reports
    optimize(model)        route a MONAI ViT / peft LoRA / SegVol model's attention, patch embedding
                           and LoRA linears through segevol_fast.ops, in place
"""

from __future__ import annotations

from .determinism import configure_mkl
from .version import __version__

configure_mkl()  # before anything here can call MKL: thread-count-independent GEMMs (determinism.py)

from . import errors, ops  # noqa: E402
from .inference import SegmentationResult, segment  # noqa: E402
from .info import info  # noqa: E402
from .io import Volume, load_volume  # noqa: E402
from .model import SegVolConfig  # noqa: E402
from .optimize import OptimizeReport, optimize  # noqa: E402
from .segvol import SegVol  # noqa: E402

__all__ = [
    "__version__",
    "errors",
    "ops",
    "info",
    "SegVol",
    "SegVolConfig",
    "Volume",
    "load_volume",
    "segment",
    "SegmentationResult",
    "optimize",
    "OptimizeReport",
]
