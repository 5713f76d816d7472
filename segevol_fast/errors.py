"""Every error a user of segevol_fast can meet, in one place.

Each class subclasses `SegVolFastError` (catch everything of ours with one clause) *and* the builtin
a Python user would expect (`ValueError` for bad values, `TypeError` for wrong types,
`FileNotFoundError` for missing files, `MemoryError` for budgets...), so existing `except` clauses
keep working. Messages say what was wrong and what to do. Every module, and every caller, imports
them from here.
"""

from __future__ import annotations


class SegVolFastError(Exception):
    """Base class of every error raised on purpose by segevol_fast."""


# ---------------------------------------------------------------------- kernels and build
class BackendUnavailableError(SegVolFastError, RuntimeError):
    """A forced kernel backend cannot run here (not built, no GPU, no Triton...)."""


class NativeExtensionError(BackendUnavailableError):
    """The compiled extension `segevol_fast._C` is missing or lacks the requested kernel."""


# ---------------------------------------------------------------------- arguments
class ShapeError(SegVolFastError, ValueError):
    """A tensor has the wrong rank, size, dtype or device for the call."""


class ArgumentTypeError(SegVolFastError, TypeError):
    """An argument has the wrong type (text=5, a string box, a float seed...)."""


class InvalidArgumentError(SegVolFastError, ValueError):
    """An argument has the right type but a value that cannot be used (unknown mode, device...)."""


class UsageError(SegVolFastError, ValueError):
    """A command-line request that cannot be run as given (exit code 2)."""


class PromptError(SegVolFastError, ValueError):
    """A prompt is malformed, outside the volume, or an unsupported combination."""


# ---------------------------------------------------------------------- model and weights
class ConfigError(SegVolFastError, ValueError):
    """A model configuration is inconsistent."""


class CheckpointError(SegVolFastError, RuntimeError):
    """A checkpoint cannot be loaded: wrong format, or missing / unexpected / mis-shaped keys."""


class DamagedWeightsError(CheckpointError):
    """A weights or adapter file is corrupt: cut short, or its tensors no longer match the checksum
    written with them (the message names the file)."""


class NonFiniteWeightsError(CheckpointError):
    """A weights or adapter file holds NaN or infinite values (the message names the file and the
    tensor); the model would give NaN logits, hence empty masks."""


class WeightsNotFoundError(SegVolFastError, FileNotFoundError):
    """No SegVol weights were found; the message lists where it looked and how to get them."""


# ---------------------------------------------------------------------- adapters
class AdapterError(SegVolFastError, ValueError):
    """An adapter request that cannot be honoured: unknown name, no target matched, a duplicate
    name, routing over adapters of different shapes, merging a routed layer..."""


class AdapterMismatchError(AdapterError):
    """A saved adapter was trained on other base weights (its base-weights hash differs) or for
    another architecture; loading it would silently give wrong masks."""


# ---------------------------------------------------------------------- input volumes
class VolumeError(SegVolFastError, ValueError):
    """Voxel data or geometry is unusable: non-finite values, a singular affine, bad spacing..."""


class VolumeFileError(VolumeError):
    """A path is missing, of an unknown kind, or cannot be read as a volume."""


class DamagedFileError(VolumeFileError):
    """A file exists and has the right kind but is truncated or corrupt (the message names it)."""


class DicomSeriesError(VolumeFileError):
    """A DICOM folder holds several series, or a series whose slices do not form one regular grid."""


class VolumeNotFoundError(VolumeFileError, FileNotFoundError):
    """An input path (NIfTI file, DICOM file or folder) does not exist."""


class UnreadableFileError(VolumeFileError, PermissionError):
    """An input path exists but cannot be opened (permissions, a folder where a file is needed...)."""


class MissingDependencyError(SegVolFastError, ImportError):
    """An optional package needed for this input is not installed (the message says which extra)."""


class PreprocessError(SegVolFastError, ValueError):
    """The volume cannot be normalised: constant, empty, or non-finite."""


# ---------------------------------------------------------------------- memory
class MemorySpecError(SegVolFastError, ValueError):
    """A memory limit could not be read (e.g. "2 bananas", a negative number)."""


class BudgetError(SegVolFastError, MemoryError):
    """The memory limit cannot be met, not even by the smallest plan. Raised before any work.

    Attributes: required (bytes the smallest plan needs), limit (bytes), breakdown (item -> bytes).
    """

    def __init__(self, message: str, required: int, limit: int, breakdown: dict[str, int]):
        super().__init__(message)
        self.required, self.limit, self.breakdown = required, limit, breakdown


class DeviceOutOfMemoryError(SegVolFastError, MemoryError):
    """The device ran out of memory even after retrying with the smallest window batch and
    host-side stitching."""


# ---------------------------------------------------------------------- inference
class NonFiniteOutputError(SegVolFastError, FloatingPointError):
    """The model gave NaN or infinite logits for some prompts (non-finite weights or adapter, a
    float16 overflow...): refused rather than returned as empty masks. Attribute: prompts (labels)."""

    def __init__(self, message: str, prompts: list[str]):
        super().__init__(message)
        self.prompts = prompts


# ---------------------------------------------------------------------- outputs
class ResultError(SegVolFastError, ValueError):
    """A result is inconsistent (masks of different shapes, bad affine) or a label is unknown."""


class OutputError(SegVolFastError, OSError):
    """An output path cannot be written (permissions, a file where a folder is needed, full disk...)."""


class OutputLockedError(OutputError):
    """Another run is writing into the same output folder right now."""


# ---------------------------------------------------------------------- warnings (filterable by class)
class VocabularyWarning(UserWarning):
    """A text prompt is not among the structure names known from SegVol's training data."""


class ModalityWarning(UserWarning):
    """The input looks like MRI (file name or header) but text prompts run with the CT template."""


class SpacingWarning(UserWarning):
    """A scan's voxel spacing is implausible for a medical image (e.g. metres or micrometres taken
    for millimetres): volumes in mL and world-coordinate prompts will be wrong by that factor."""


class ZoomInWarning(UserWarning):
    """The zoom-in pass was skipped for a prompt (no foreground in the coarse prediction)."""


class OutputWarning(UserWarning):
    """A save wrote the result but left out one of its outputs (e.g. the DICOM-SEG, when the source
    series is gone); the message says which and why, and summary.json records it."""
