"""Zoom-out-zoom-in inference: prompts, the exact (official) and fast modes, memory planning."""

from .arguments import SegmentOptions
from .batch import segment_batch
from .budget import Plan, parse_memory, plan_fast
from .exact import run_exact
from .fast import run_fast
from .prompts import Prompt, build_prompts
from .result import SegmentationResult
from .segment import segment
from .session import Session

__all__ = [
    "segment",
    "SegmentOptions",
    "segment_batch",
    "Session",
    "SegmentationResult",
    "Prompt",
    "build_prompts",
    "run_exact",
    "run_fast",
    "plan_fast",
    "parse_memory",
    "Plan",
]
