"""Evaluation of trained models: robustness to rotations and prompt jitter."""

from .jitter import jitter_box, jitter_points
from .rotation import PUBLISHED, Rotation, rotate_probabilities, rotate_scan, sweep

__all__ = ["PUBLISHED", "Rotation", "jitter_box", "jitter_points", "rotate_probabilities", "rotate_scan", "sweep"]
