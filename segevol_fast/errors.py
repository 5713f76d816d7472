"""Typed errors. Each says what was wrong and what to do about it."""

from __future__ import annotations


class SegVolFastError(Exception):
    """Base class of every error raised on purpose by segevol_fast."""


class BackendUnavailableError(SegVolFastError, RuntimeError):
    """A forced kernel backend cannot run here (not built, no GPU, no Triton...)."""


class NativeExtensionError(BackendUnavailableError):
    """The compiled extension `segevol_fast._C` is missing or lacks the requested kernel."""


class ShapeError(SegVolFastError, ValueError):
    """A tensor has the wrong rank, size, dtype or device for the call."""


class ConfigError(SegVolFastError, ValueError):
    """A model configuration is inconsistent."""


class CheckpointError(SegVolFastError, RuntimeError):
    """A checkpoint cannot be loaded: wrong format, or missing / unexpected / mis-shaped keys."""
