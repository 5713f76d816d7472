"""What the napari widget does, without the widget: choose and build the model, turn an image
layer into a `Volume`, and keep one scan's interactive session in step with its organ labels.

The widget (`widget.py`) only draws controls and runs these calls in napari thread workers; all
of it is here, Qt-free and napari-free, so the model, session, undo and export logic is one
plain-Python unit the tests drive directly as well as through the widget.

The model comes from the command line's own code (`segevol_fast.cli.common`): the same search for
the official weights and the CLIP tokenizer, the same random models with the same loud notice, and
the export goes through the same writer (`cli.report.write_result`), so a viewer's export is a
result folder like `segevol-fast segment`'s (a NIfTI mask per organ, label_map.nii.gz,
summary.json, and segmentation.dcm for a DICOM series).
"""

from __future__ import annotations

import argparse
import pathlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..cli.common import RANDOM_NOTE, adapter_file, build_model, loud_random_notice, model_files, resolve_device
from ..cli.report import write_result
from ..errors import InvalidArgumentError, PromptError, VolumeError
from ..inference.adapter_scope import attach_for_every_scan, file_note
from ..inference.result import SegmentationResult
from ..inference.result_files import describe_prompts
from ..io import Volume
from .labels import OrganLabels
from .reader import VOLUME_KEY

# where the model comes from: the official weights (found like the CLI finds them), a folder or
# file of them, or random weights of the official or the tiny architecture (masks meaningless)
MODEL_SOURCES = ("official", "folder", "random", "tiny")


@dataclass(frozen=True)
class ModelChoice:
    """The model the widget asks for: `source` one of MODEL_SOURCES, `weights` the folder or file
    for "folder", `adapter` an adapter file (segevol_fast.adapters.save_adapter) or None."""

    source: str = "official"
    weights: Optional[str] = None
    adapter: Optional[str] = None

    def __post_init__(self) -> None:
        if self.source not in MODEL_SOURCES:
            raise InvalidArgumentError(f"model source must be one of {MODEL_SOURCES}, got {self.source!r}")
        if self.source == "folder" and not self.weights:
            raise InvalidArgumentError("choose the folder (or file) holding the SegVol weights")

    @property
    def random(self) -> bool:
        return self.source in ("random", "tiny")


@dataclass
class LoadedModel:
    """A built model and what the session needs from its loading: whether its weights are random,
    the adapter name a session selects (None: none, or one that applies to every call), and the
    note recording the adapter file."""

    model: object
    random: bool
    adapter: Optional[str] = None
    adapter_note: Optional[str] = None


def load_model(choice: ModelChoice) -> LoadedModel:
    """Build the model `choice` names with the CLI's own code: WeightsNotFoundError (saying where it
    looked and how to get the weights) when the official ones are not found, UsageError for a
    missing adapter file; random weights print the CLI's loud notice."""
    args = argparse.Namespace(
        weights=choice.weights if choice.source == "folder" else None,
        random_weights=choice.random,
        tokenizer=None,
        download=False,
        adapter=choice.adapter or None,
    )
    adapter = adapter_file(args)
    weights, tokenizer = model_files(args, text=False)
    if weights is None:
        loud_random_notice("tiny" if choice.source == "tiny" else "official")
    model = build_model(weights, "tiny" if choice.source == "tiny" else "official", tokenizer, resolve_device(None))
    active, attached = attach_for_every_scan(model, adapter)
    note = None if adapter is None else file_note(attached, adapter)
    return LoadedModel(model, random=weights is None, adapter=active, adapter_note=note)


def volume_from_layer(layer, modality: Optional[str] = None) -> Volume:
    """The `Volume` of a napari image layer: the one our reader put in its metadata, else (an image
    from another reader, a script's array) one built from the layer's data with its data -> world
    transform as the affine, so prompts and masks stay where napari draws them. `layer` needs only
    `data`, `metadata`, `name` and `data_to_world` (napari's Image layer has them)."""
    volume = layer.metadata.get(VOLUME_KEY)
    if isinstance(volume, Volume):
        return volume
    data = np.asarray(layer.data)
    if data.ndim != 3 or getattr(layer, "rgb", False):
        raise VolumeError(
            f"layer {layer.name!r} has shape {data.shape}{' (RGB)' if getattr(layer, 'rgb', False) else ''}: "
            "a session needs a 3-D grey-level scan"
        )
    return Volume(data, layer_affine(layer), modality=modality, source=f"napari layer {layer.name}")


def layer_affine(layer) -> np.ndarray:
    """A layer's whole data -> world map (scale, translate, rotation, shear and affine composed) as
    one (4, 4) matrix, read off napari's `data_to_world` at the origin and the three unit points,
    which fix an affine map exactly."""
    origin = np.asarray(layer.data_to_world((0.0, 0.0, 0.0)), dtype=np.float64)
    out = np.eye(4)
    out[:3, 3] = origin
    for axis in range(3):
        unit = np.zeros(3)
        unit[axis] = 1.0
        out[:3, axis] = np.asarray(layer.data_to_world(tuple(unit)), dtype=np.float64) - origin
    return out


class Annotator:
    """One scan's session and its organs: every mask a prompt or a refinement returns goes into
    `labels` (an `OrganLabels`), and undo / clear take the session's record of that organ's prompt
    back with the mask, so a later refinement starts from the prompt that made the mask shown.

    session: a `Session` (model.session(volume, ...)); random: the model's weights are random (every
    export says so); adapter_note: recorded in the export's notes.
    """

    def __init__(self, session, *, random: bool, adapter_note: Optional[str] = None):
        self.session = session
        self.volume: Volume = session.volume
        self.labels = OrganLabels(self.volume.shape)
        self.random = random
        self.adapter_note = adapter_note
        self._earlier_prompts: dict[str, list[Optional[dict]]] = {}  # per organ, oldest first

    def _keep(self, name: str, mask: np.ndarray, earlier: Optional[dict]) -> None:
        self._earlier_prompts.setdefault(name, []).append(earlier)
        self.labels.set(name, mask)

    def segment(self, texts: Sequence[str] = (), box=None, points=None, point_labels=None, zoom_in: bool = True):
        """Prompt the session (text names, a box, clicks: voxel indices) and keep each mask it
        returns; returns the names set. A prompt needs a name, a box or a positive click."""
        if not texts and box is None and (points is None or not np.any(point_labels)):
            raise PromptError("give an organ name, draw a box or add a positive click first")
        before = dict(self.session.history)
        result = self.session.segment(
            text=list(texts) or None, box=box, points=points, point_labels=point_labels, zoom_in=zoom_in
        )
        for name, mask in result.masks.items():
            self._keep(name, mask, before.get(name))
        return result.labels

    def refine(self, name: str, points, point_labels) -> str:
        """Correct the organ `name` with clicks (points (P, 3) voxel indices, labels 1 / 0)."""
        before = self.session.history.get(name)
        result = self.session.refine(name, points, point_labels)
        self._keep(name, result.masks[name], before)
        return name

    def undo(self) -> Optional[str]:
        """Take back the last segment or refine of one organ (mask and prompt); its name, or None."""
        name = self.labels.undo()
        if name is not None:
            earlier = self._earlier_prompts[name].pop()
            if earlier is None:
                self.session.history.pop(name, None)
            else:
                self.session.history[name] = earlier
        return name

    def clear(self, name: str) -> None:
        """Remove the organ, its undo steps and the session's record of its prompt."""
        self.labels.clear(name)
        self._earlier_prompts.pop(name, None)
        self.session.history.pop(name, None)

    def result(self) -> SegmentationResult:
        """The organs as a `SegmentationResult` on the scan's grid, with the prompts that made them."""
        history = self.session.history
        prompts = {
            name: describe_prompts(*(history[name][k] for k in ("text", "box", "points", "point_labels", "coords")))
            for name in self.labels.masks()
        }
        notes = [RANDOM_NOTE] if self.random else []
        if self.adapter_note:
            notes.append(self.adapter_note)
        weights = getattr(self.session.model, "weights_source", None)
        return SegmentationResult(
            masks=dict(self.labels.masks()),
            affine=self.volume.affine,
            modality=self.session.modality,
            source=self.volume.source,
            series=self.volume.series,
            prompts=prompts,
            weights_source=None if weights is None else str(weights),
            notes=notes,
        )

    def export(self, folder) -> pathlib.Path:
        """Write the organs to `folder` with the CLI's writer (module docstring); returns it."""
        if not len(self.labels):
            raise PromptError("nothing to export yet: segment an organ first")
        out = pathlib.Path(folder).expanduser()
        write_result(self.result(), out, self.volume, preview=False, random_weights=self.random)
        return out
