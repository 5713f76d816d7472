"""`PreparedScan`: a scan made ready for segmentation, and what can be reused across calls.

`segment()` builds one on every call (the loaded `Volume` and its official preprocessing) and drops
it at the end; an interactive session (`session.py`) keeps one for its whole life, with the zoom-out
embedding and the zoom-in window embeddings filled in, so that each of its calls encodes only what
it has never seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from ..io import Volume
from ..preprocess import Preprocessed
from .window_cache import WindowCache


@dataclass
class PreparedScan:
    """volume: the scan on its own grid. prep: its preprocessing (foreground crop, model axes; in
    fast mode the crop is read lazily, never copied to float32). zoom_out_embedding: None, or the
    (1, hidden, *grid) encoding of the zoom-out image, made under the adapter and precision of the
    calls that reuse it. window_cache: None, or the zoom-in window embeddings kept between calls."""

    volume: Volume
    prep: Preprocessed
    zoom_out_embedding: Optional[Tensor] = None
    window_cache: Optional[WindowCache] = None
