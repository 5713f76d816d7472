"""Evaluation of trained models: robustness to rotations and prompt jitter."""

from .jitter import jitter_box, jitter_points
from .report import RobustnessReport
from .robustness import robustness
from .rotation import PUBLISHED, Rotation, rotate_probabilities, rotate_scan, sweep
from .tta import segment_with_tta

__all__ = [
    "PUBLISHED",
    "RobustnessReport",
    "Rotation",
    "jitter_box",
    "jitter_points",
    "robustness",
    "rotate_probabilities",
    "rotate_scan",
    "segment_with_tta",
    "sweep",
]
