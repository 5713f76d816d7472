"""Argument checks for `segment()`: every wrong type or value fails here, before the scan is read.

A wrong argument should cost the user a second, not a scan load plus minutes of inference followed
by a torch assertion. Each check raises a `segevol_fast.errors` class: ArgumentTypeError (a
TypeError) for a wrong type, InvalidArgumentError (a ValueError) for a value that cannot be used,
PromptError for prompts, MemorySpecError for an unreadable memory size. Messages say what is
accepted.

`SegmentOptions` holds a call's settings (everything but the model, the volume and the prompts)
and checks them when it is made: `segment()` and a session's calls build one from their keyword
arguments, and the layers below take it as it is. `check_segment_arguments` adds what needs the
model, the volume or the prompts.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from ..adapters.manage import adapter_names
from ..errors import AdapterError, ArgumentTypeError, InvalidArgumentError
from ..io.volume import MODALITY_ALIASES
from .approximations import ApproximationsLike, as_approximations
from .precision import PRECISION_REQUESTS
from .progress import Progress

if TYPE_CHECKING:
    import torch

MODES = ("fast", "exact")
COORDS = ("voxel", "world")


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def _choice(value, name: str, choices: tuple, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be one of {choices}, got {type(value).__name__} {value!r:.60}")
    if value not in choices:
        raise InvalidArgumentError(f"{name} must be one of {choices}, got {value!r}")


def _flag(value, name: str) -> None:
    if not _is_bool(value):
        raise ArgumentTypeError(f"{name} must be True or False, got {type(value).__name__} {value!r:.60}")


def check_seed(seed) -> None:
    """An int (numpy ints too) in torch's seed range; bools and floats are refused (1.5 is no seed,
    and True is almost always a misplaced positional argument)."""
    if _is_bool(seed) or not isinstance(seed, numbers.Integral):
        raise ArgumentTypeError(f"seed must be an int, got {type(seed).__name__} {seed!r:.60}")
    if not -(2**63) <= int(seed) < 2**64:
        raise InvalidArgumentError(f"seed must fit in 64 bits, got {seed}")


def check_modality(modality) -> None:
    if modality is None:
        return
    if not isinstance(modality, str):
        raise ArgumentTypeError(f"modality must be 'ct', 'mri' or None, got {type(modality).__name__} {modality!r:.60}")
    if modality.strip().lower() not in MODALITY_ALIASES:
        raise InvalidArgumentError(f"modality must be 'ct', 'mri' (or 'mr') or None, got {modality!r}")


def check_max_memory(max_memory) -> None:
    """Types here (ArgumentTypeError); the value through the planner's own parser (MemorySpecError)."""
    if max_memory is None:
        return
    if _is_bool(max_memory) or not isinstance(max_memory, (numbers.Real, str)):
        raise ArgumentTypeError(
            f"max_memory must be bytes (an int) or a size string like '2GB', got "
            f"{type(max_memory).__name__} {max_memory!r:.60}"
        )
    from .budget import parse_memory

    parse_memory(max_memory)


def _available_devices() -> list[str]:
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return names


def check_device(device) -> None:
    """None, a torch.device or a string naming a device that exists here ('cpu', 'cuda', 'cuda:N')."""
    if device is None:
        return
    import torch

    if not isinstance(device, (str, torch.device)):
        raise ArgumentTypeError(
            f"device must be a string like 'cpu' or 'cuda:0' (or a torch.device), got "
            f"{type(device).__name__} {device!r:.60}"
        )
    here = ", ".join(repr(d) for d in _available_devices())
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InvalidArgumentError(f"unknown device {device!r}; devices on this machine: {here}") from None
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(
            f"segment() runs on 'cpu' or 'cuda[:N]', not {device!r}; devices on this machine: {here}"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(
                f"device {str(device)!r}: this torch build or machine has no CUDA device; "
                f"devices on this machine: {here}"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgumentError(f"device {str(device)!r} does not exist; devices on this machine: {here}")


def check_model(model) -> None:
    from ..model.network import SegVolNetwork

    if not isinstance(model, SegVolNetwork):
        raise ArgumentTypeError(f"model must be a SegVol (SegVol.from_pretrained(...)), got {type(model).__name__}")
    if any(p.is_meta for p in model.parameters()):
        raise InvalidArgumentError(
            "the model's weights are on the meta device (never loaded); build it with "
            "SegVol.from_pretrained(path) or move real weights in before segmenting"
        )


def check_text_support(model, text) -> None:
    """Text prompts need the CLIP tokenizer: say so before the scan is read, not after."""
    if text is not None and getattr(model, "tokenizer", None) is None:
        raise InvalidArgumentError(
            "text prompts need the CLIP tokenizer, and this model has none: load it with "
            "SegVol.from_pretrained(dir) from a folder holding tokenizer.json (or vocab.json + merges.txt), or set "
            "model.tokenizer = 'path/to/folder'; box and point prompts work without it"
        )


def check_volume(volume) -> None:
    """Only the kind: a path, a Volume, an array or a tensor; `load_volume` checks the contents."""
    from ..io import Volume

    ok = isinstance(volume, (str, os.PathLike, Volume, np.ndarray)) or (
        hasattr(volume, "detach") and hasattr(volume, "dtype")
    )  # torch tensors and MetaTensors
    if not ok:
        raise ArgumentTypeError(
            f"volume must be a path (NIfTI file, DICOM folder), a Volume, a numpy array or a "
            f"torch tensor (X, Y, Z), got {type(volume).__name__}"
        )
    if isinstance(volume, str) and not volume.strip():
        raise InvalidArgumentError("volume is an empty string; give the path of a NIfTI file or DICOM folder")


def check_series_type(series) -> None:
    if series is not None and not isinstance(series, str):  # "" is fine: it names a series whose files have no UID
        raise ArgumentTypeError(
            f"series must be a SeriesInstanceUID string, got {type(series).__name__} {series!r:.60}"
        )


def check_series(series, volume) -> None:
    """A series (checked by `check_series_type`) can only be picked from a path."""
    check_series_type(series)
    if series is not None and not isinstance(volume, (str, os.PathLike)):
        raise InvalidArgumentError("series= picks a DICOM series from a folder; the volume given is not a path")


def check_progress(progress) -> None:
    # True / False, or a progress display object (segevol_fast.inference.progress); a number or a
    # string is a misplaced argument
    if not _is_bool(progress) and (progress is None or isinstance(progress, (numbers.Number, str, bytes))):
        raise ArgumentTypeError(
            f"progress must be True, False or a progress display, got {type(progress).__name__} {progress!r:.60}"
        )


@dataclass(frozen=True)
class SegmentOptions:
    """The settings of one `segment()` call, checked once, when made (see `segment()` for each).

    Everything but the model, the volume and the prompts. A bad setting raises, as `segment()`
    does, ArgumentTypeError (type), InvalidArgumentError (value) or MemorySpecError (max_memory).
    What needs the model or the volume (an adapter's name, series= on a non-path) is
    `check_segment_arguments`' part. Frozen: a variant is `dataclasses.replace(options, ...)`,
    which checks again.
    """

    coords: str = "voxel"
    modality: Optional[str] = None
    mode: str = "fast"
    zoom_in: bool = True
    max_memory: Union[int, str, None] = None
    device: Union[str, torch.device, None] = None
    progress: Union[bool, Progress] = True
    return_probabilities: bool = False
    seed: int = 0
    precision: Optional[str] = "auto"
    series: Optional[str] = None
    adapter: Optional[str] = None
    approximations: ApproximationsLike = "default"

    def __post_init__(self) -> None:
        _choice(self.mode, "mode", MODES)
        _choice(self.coords, "coords", COORDS)
        _choice(self.precision, "precision", PRECISION_REQUESTS, optional=True)
        check_modality(self.modality)
        _flag(self.zoom_in, "zoom_in")
        _flag(self.return_probabilities, "return_probabilities")
        check_progress(self.progress)
        check_seed(self.seed)
        check_max_memory(self.max_memory)
        check_device(self.device)
        check_series_type(self.series)
        check_adapter_type(self.adapter)
        # stored resolved: a variant made with dataclasses.replace checks an Approximations again
        object.__setattr__(self, "approximations", as_approximations(self.approximations))


def check_segment_arguments(model, volume, text, box, points, point_labels, options: SegmentOptions) -> None:
    """Check what `segment()` can check without reading the volume, beyond `options` (a
    `SegmentOptions`, checked when it was made): the model, the kind of volume, the prompts, and
    the options that depend on the model or the volume (series, text prompts, adapter name).

    Raises ArgumentTypeError / InvalidArgumentError / PromptError / AdapterError; returns None.
    Prompt coordinates are checked against the volume later (`build_prompts`), once its shape and
    affine are known.
    """
    from .prompts import check_prompt_arguments

    check_model(model)
    check_volume(volume)
    check_series(options.series, volume)
    check_prompt_arguments(text, box, points, point_labels)
    check_text_support(model, text)
    check_adapter(model, options.adapter)


def check_session_arguments(model, volume, options: SegmentOptions) -> None:
    """`model.session(...)`'s arguments beyond its `SegmentOptions`: segment()'s checks except
    the prompts, which come later."""
    check_model(model)
    check_volume(volume)
    check_series(options.series, volume)
    check_adapter(model, options.adapter)


def check_adapter_type(adapter) -> None:
    if adapter is not None and not isinstance(adapter, str):
        raise ArgumentTypeError(f"adapter must be None or a name (str), got {type(adapter).__name__}")


def check_adapter(model, adapter) -> None:
    """adapter: None, "base", "auto" or the name of one of the model's adapters."""
    if adapter is None:
        return
    check_adapter_type(adapter)
    names = adapter_names(model)
    if adapter not in ("base", "auto") and adapter not in names:
        raise AdapterError(f"no adapter named {adapter!r}; this model has {names or 'none'} (or use 'base' / 'auto')")
