"""The napari dock widget: open an interactive session on a scan, prompt it, correct it, export.

From top to bottom: the scan (an image layer), the model (official weights, a folder of them, or
random weights, which make meaningless masks and say so loudly), an adapter file, the session's
modality, precision, zoom-in and memory budget, then "Open session"; organ names with
completion, "Segment"; an organ, "Refine", "Undo", "Clear organ"; an export folder and "Export".

Prompts come from two layers the session adds, both placed like the scan: "boxes" (Shapes: the
bounding box of every rectangle, whole scan along the axis a rectangle is flat in) and "clicks"
(Points, one layer with a `positive` feature column set by the click-sign buttons: green positive,
red negative "not here" clicks). Each segment or refine uses the clicks and boxes drawn since the
last one and then empties those layers. The organs show in one Labels layer, "organs" (one id per
organ, names in its features). Like the scan's, these layers' axes are the stored array's, reordered
for scans stored along permuted axes (`coords`); clicks and boxes go to voxel indices through
napari's world, so any placement works.

The work (`annotator.py`) runs in napari thread workers, so the viewer stays live; opening a
session can be cancelled between its stages. Errors become napari notifications with their
message, never a traceback dialog.
"""

from __future__ import annotations

import functools
import inspect
import logging
import pathlib
import re
import time
from typing import Callable, Optional

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    RadioButtons,
)
from napari.layers import Image, Labels, Points, Shapes
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QStringListModel
from qtpy.QtWidgets import QApplication, QCompleter

from ..cli.segment import input_stem
from ..errors import PromptError, SegVolFastError
from .annotator import Annotator, ModelChoice, layer_affine, load_model, volume_from_layer
from .coords import image_transform, world_to_voxel
from .prompts import box_from_vertices, click_prompt, complete, text_prompts

log = logging.getLogger(__name__)

ORGANS, CLICKS, BOXES = "organs", "clicks", "boxes"
CLICK_COLORS = {True: "lime", False: "red"}
RANDOM_BANNER = "RANDOM WEIGHTS: the masks are MEANINGLESS (a pipeline check only)"
MODEL_CHOICES = [
    ("official weights", "official"),
    ("weights folder or file", "folder"),
    ("random weights (official size)", "random"),
    ("random weights (tiny, tests/demos)", "tiny"),
]


def report(exc: BaseException) -> None:
    """An error as a napari notification: our typed errors by their message, anything else with its
    type too (and its traceback in the log, for a bug report)."""
    if isinstance(exc, SegVolFastError):
        show_error(str(exc))
    else:
        log.error("segevol_fast widget", exc_info=exc)
        show_error(f"{type(exc).__name__}: {exc}")


def reported(action: Callable[[SessionWidget], None]) -> Callable[[SessionWidget], None]:
    """A button's action whose errors (bad input, found before any work starts) become
    notifications instead of exceptions in Qt's event loop."""

    @functools.wraps(action)
    def run(self: SessionWidget) -> None:
        try:
            action(self)
        except Exception as exc:
            report(exc)

    return run


def _layer_voxels(layer, points: np.ndarray, volume) -> np.ndarray:
    """Points in `layer`'s data coordinates -> voxel indices of `volume`, through napari's world."""
    m = layer_affine(layer)
    return world_to_voxel(points @ m[:3, :3].T + m[:3, 3], image_transform(volume))


class SessionWidget(Container):
    """The dock widget (module docstring). `annotator` is the open session (None before), `worker`
    the thread worker running now (None when idle)."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.annotator: Optional[Annotator] = None
        self.worker = None
        self._model = None  # (ModelChoice, LoadedModel) of the last session: reused while unchanged

        self.image = ComboBox(label="scan", choices=self._image_layers)
        self.model_source = ComboBox(label="model", choices=MODEL_CHOICES, value="official")
        self.weights = FileEdit(label="weights", mode="d", nullable=True, visible=False)
        self.adapter = FileEdit(label="adapter", mode="r", filter="*.safetensors", nullable=True)
        self.modality = ComboBox(label="modality", choices=[("from the scan", None), ("CT", "ct"), ("MRI", "mri")])
        self.precision = ComboBox(label="precision", choices=["auto", "fp32", "bf16", "fp16"], value="auto")
        # fast mode's defaults are the official zoom-in; the approximations are opt-in, with the
        # agreement docs/benchmarks.md measured ("Fast mode's approximations")
        self.approximations = ComboBox(
            label="zoom-in",
            choices=[
                ("official windows (default)", "default"),
                ("image tokens only (faster, approximate)", {"token_subset": True}),
                ("overlap 0.25 (faster, approximate)", {"overlap": 0.25}),
            ],
        )
        self.max_memory = LineEdit(label="memory budget", tooltip="a peak memory budget such as 4GB; empty: none")
        self.open_button = PushButton(text="Open session")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(visible=False)
        self.progress.native.setRange(0, 0)  # busy indicator: a session's stages have no fraction
        self.status = Label(value="open a scan, choose a model, then Open session")
        self.banner = Label(value=RANDOM_BANNER, visible=False)
        self.banner.native.setStyleSheet("color: #ff5050; font-weight: bold")
        self.banner.native.setWordWrap(True)

        self.prompt = LineEdit(label="organs", tooltip="names separated by commas, e.g. liver, spleen")
        self.zoom_in = CheckBox(text="zoom-in", value=True)
        self.click_sign = RadioButtons(
            label="clicks", choices=[("positive", True), ("negative", False)], value=True, orientation="horizontal"
        )
        self.segment_button = PushButton(text="Segment")
        self.organ = ComboBox(label="organ", choices=self._organ_names)
        self.refine_button = PushButton(text="Refine with clicks")
        self.undo_button = PushButton(text="Undo")
        self.clear_button = PushButton(text="Clear organ")
        self.export_folder = FileEdit(label="export to", mode="d", nullable=True)
        self.export_button = PushButton(text="Export")
        self.extend(
            [
                self.image,
                self.model_source,
                self.weights,
                self.adapter,
                self.modality,
                self.precision,
                self.approximations,
                self.max_memory,
                Container(widgets=[self.open_button, self.cancel_button], layout="horizontal", labels=False),
                self.progress,
                self.status,
                self.banner,
                self.prompt,
                self.click_sign,
                Container(widgets=[self.zoom_in, self.segment_button], layout="horizontal", labels=False),
                self.organ,
                Container(
                    widgets=[self.refine_button, self.undo_button, self.clear_button],
                    layout="horizontal",
                    labels=False,
                ),
                self.export_folder,
                self.export_button,
            ]
        )
        self.completer = self._completer()
        self.model_source.changed.connect(lambda value: setattr(self.weights, "visible", value == "folder"))
        self.open_button.changed.connect(self.open_session)
        self.cancel_button.changed.connect(self.cancel)
        self.segment_button.changed.connect(self.segment)
        self.prompt.native.returnPressed.connect(self.segment)
        self.click_sign.changed.connect(self._click_sign)
        self.refine_button.changed.connect(self.refine)
        self.undo_button.changed.connect(self.undo)
        self.clear_button.changed.connect(self.clear)
        self.export_button.changed.connect(self.export)
        self.viewer.layers.events.inserted.connect(self.image.reset_choices)
        self.viewer.layers.events.removed.connect(self.image.reset_choices)
        self._idle()

    # ------------------------------------------------------------------ choices and completion
    def _image_layers(self, _widget=None) -> list:
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _organ_names(self, _widget=None) -> list[str]:
        return [] if self.annotator is None else list(self.annotator.labels.names().values())

    def _completer(self) -> QCompleter:
        """Organ-name completion of the name being typed (the text after the last comma)."""
        completer = QCompleter(self.prompt.native)
        completer.setWidget(self.prompt.native)
        completer.setModel(QStringListModel(completer))
        completer.setCompletionMode(QCompleter.UnfilteredPopupCompletion)  # complete() already filtered
        self.prompt.native.textEdited.connect(self._suggest)
        completer.activated.connect(self._take_completion)
        return completer

    def _suggest(self, text: str) -> None:
        prefix = re.split(r"[,;]", text)[-1].strip()
        names = complete(prefix) if prefix else []
        self.completer.model().setStringList(names)
        if names:
            self.completer.complete()
        else:
            self.completer.popup().hide()

    def _take_completion(self, name) -> None:
        text = self.prompt.native.text()
        cut = max(text.rfind(","), text.rfind(";"))
        head = text[: cut + 1] + " " if cut >= 0 else ""
        self.prompt.native.setText(f"{head}{name}")

    # ------------------------------------------------------------------ workers
    def _run(self, work: Callable, *args, done: Callable, what: str, cancellable: bool = False) -> None:
        """Run `work(*args)` in a napari thread worker (a generator yields stage names), then
        `done(its result)`; errors go to `report`. One worker at a time."""
        if self.worker is not None:
            show_warning("busy: wait for the running step (or cancel it) first")
            return
        connect = {"returned": done, "errored": report, "finished": self._idle}
        if inspect.isgeneratorfunction(work):
            connect.update(yielded=self._stage, aborted=self._cancelled)
        self.worker = create_worker(
            work,
            *args,
            _progress={"desc": what},
            _connect=connect,
        )
        self._busy(what, cancellable)

    def _busy(self, what: str, cancellable: bool) -> None:
        self.status.value = what + "..."
        self.progress.visible = True
        self.cancel_button.enabled = cancellable
        for button in self._actions():
            button.enabled = False

    def _idle(self) -> None:
        self.worker = None
        self.progress.visible = False
        self.cancel_button.enabled = False
        self.open_button.enabled = True
        for button in self._actions()[1:]:
            button.enabled = self.annotator is not None

    def _actions(self) -> list[PushButton]:
        return [
            self.open_button,
            self.segment_button,
            self.refine_button,
            self.undo_button,
            self.clear_button,
            self.export_button,
        ]

    def _stage(self, stage: str) -> None:
        self.status.value = stage + "..."

    def _cancelled(self) -> None:
        self.status.value = "cancelled"

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def wait(self, timeout: float = 600.0) -> None:
        """Process Qt events until the running step ends: for scripts and notebooks that drive the
        widget (the viewer itself never waits). TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.worker is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the widget's step still runs after {timeout:g} s")
            QApplication.processEvents()
            time.sleep(0.01)

    def cancel(self) -> None:
        """Stop opening the session at its next stage (the stage running now finishes first)."""
        if self.worker is not None:
            self.worker.quit()
            self.status.value = "cancelling after this stage..."

    # ------------------------------------------------------------------ the session
    def model_choice(self) -> ModelChoice:
        weights, adapter = self.weights.value, self.adapter.value
        return ModelChoice(
            self.model_source.value,
            None if weights is None else str(weights),
            None if adapter is None else str(adapter),
        )

    @reported
    def open_session(self) -> None:
        """Build (or reuse) the model and encode the chosen scan, in a worker."""
        layer = self.image.value
        if layer is None:
            raise PromptError("open a scan first (File > Open, or drag a NIfTI file or DICOM folder in)")
        volume = volume_from_layer(layer, self.modality.value)
        choice = self.model_choice()
        options = dict(
            modality=self.modality.value,
            precision=self.precision.value,
            approximations=self.approximations.value,
            max_memory=self.max_memory.value.strip() or None,
        )
        cached = self._model[1] if self._model is not None and self._model[0] == choice else None
        self._run(self._open, volume, choice, cached, options, done=self._opened, what="opening", cancellable=True)

    @staticmethod
    def _open(volume, choice: ModelChoice, loaded, options: dict):
        yield "loading the model"
        if loaded is None:
            loaded = load_model(choice)
        yield "encoding the scan"
        session = loaded.model.session(volume, adapter=loaded.adapter, **options)
        return choice, loaded, Annotator(session, random=loaded.random, adapter_note=loaded.adapter_note)

    def _opened(self, outcome) -> None:
        choice, loaded, annotator = outcome
        self._model = (choice, loaded)
        self.annotator = annotator
        self._prompt_layers()
        self._show()
        self.banner.visible = annotator.random
        if annotator.random:
            show_warning(RANDOM_BANNER)
        if self.export_folder.value is None:  # the CLI's default: ./segevol_out/<input name>
            self.export_folder.value = pathlib.Path("segevol_out") / input_stem(annotator.volume.source or "scan")
        cache = annotator.session.cache
        self.status.value = f"session open: {annotator.volume.shape} voxels, room for {cache.capacity} windows"

    def _prompt_layers(self) -> None:
        """A fresh organs, clicks and boxes layer placed like the session's scan."""
        for name in (ORGANS, CLICKS, BOXES):
            if name in self.viewer.layers:
                self.viewer.layers.remove(self.viewer.layers[name])
        transform = image_transform(self.annotator.volume)
        place = transform.layer_kwargs()
        self.viewer.add_layer(Labels(transform.to_layer(self.annotator.labels.label_map()), name=ORGANS, **place))
        self.viewer.add_layer(Shapes(ndim=3, name=BOXES, edge_color="yellow", face_color="transparent", **place))
        clicks = Points(ndim=3, name=CLICKS, size=3, features={"positive": np.zeros(0, bool)}, **place)
        self.viewer.add_layer(clicks)
        self._click_sign(self.click_sign.value)

    def _click_sign(self, positive: bool) -> None:
        if CLICKS in self.viewer.layers:
            clicks = self.viewer.layers[CLICKS]
            clicks.feature_defaults = {"positive": bool(positive)}
            clicks.current_face_color = CLICK_COLORS[bool(positive)]

    def _require(self) -> Annotator:
        if self.annotator is None:
            raise PromptError("open a session first")
        return self.annotator

    def _chosen_organ(self) -> str:
        if self.organ.value is None:
            raise PromptError("no organ yet: segment one first, then pick it in the organ list")
        return self.organ.value

    def _clicks(self, volume):
        """(points, labels) from the clicks layer, or (None, None) when it holds none."""
        layer = self.viewer.layers[CLICKS] if CLICKS in self.viewer.layers else None
        if layer is None or not len(layer.data):
            return None, None
        voxels = _layer_voxels(layer, np.asarray(layer.data, dtype=np.float64), volume)
        return click_prompt(voxels, layer.features["positive"].to_numpy(bool), volume.shape)

    def _box(self, volume):
        layer = self.viewer.layers[BOXES] if BOXES in self.viewer.layers else None
        if layer is None or not len(layer.data):
            return None
        vertices = np.concatenate([np.asarray(shape, dtype=np.float64) for shape in layer.data])
        return box_from_vertices(_layer_voxels(layer, vertices, volume), volume.shape)

    def _used_prompts(self) -> None:
        for name in (CLICKS, BOXES):
            if name in self.viewer.layers:
                layer = self.viewer.layers[name]
                layer.data = np.empty((0, 3)) if isinstance(layer, Points) else []

    @reported
    def segment(self) -> None:
        """Segment the typed organs (and/or the box and clicks drawn) in a worker."""
        annotator = self._require()
        typed = self.prompt.value.strip()
        texts = text_prompts(typed) if typed else []
        box = self._box(annotator.volume)
        points, labels = self._clicks(annotator.volume)
        args = (texts, box, points, labels, self.zoom_in.value)
        self._run(annotator.segment, *args, done=self._segmented, what="segmenting")

    def _segmented(self, names: list[str]) -> None:
        self._used_prompts()
        self._show(select=names[-1])
        self.status.value = "segmented " + ", ".join(names)

    @reported
    def refine(self) -> None:
        """Correct the chosen organ with the clicks drawn since the last step, in a worker."""
        annotator = self._require()
        name = self._chosen_organ()
        points, labels = self._clicks(annotator.volume)
        if points is None:
            raise PromptError("add clicks to the clicks layer first (positive: in the organ; negative: not)")
        self._run(annotator.refine, name, points, labels, done=self._refined, what=f"refining {name}")

    def _refined(self, name: str) -> None:
        self._used_prompts()
        self._show(select=name)
        self.status.value = f"refined {name}"

    @reported
    def undo(self) -> None:
        """Take back the last segment or refine of one organ."""
        name = self._require().undo()
        self._show()
        self.status.value = "nothing to undo" if name is None else f"undid the last change of {name}"

    @reported
    def clear(self) -> None:
        """Remove the chosen organ."""
        name = self._chosen_organ()
        self._require().clear(name)
        self._show()
        self.status.value = f"cleared {name}"

    @reported
    def export(self) -> None:
        """Write the organs (NIfTI masks, label map, summary.json; DICOM-SEG for a DICOM series)."""
        annotator = self._require()
        folder = self.export_folder.value
        if folder is None:
            raise PromptError("choose the folder to export to")
        self._run(annotator.export, folder, done=self._exported, what="exporting")

    def _exported(self, folder) -> None:
        self.status.value = f"wrote {folder}"
        show_info(f"wrote {folder}")

    def _show(self, select: Optional[str] = None) -> None:
        """Redraw the organs layer from the annotator's labels and refresh the organ list."""
        labels = self.annotator.labels
        layer = self.viewer.layers[ORGANS]
        layer.data = image_transform(self.annotator.volume).to_layer(labels.label_map())  # the scan's axis order
        layer.features = labels.features()
        layer.colormap = {None: (0.0, 0.0, 0.0, 0.0), **labels.colors()}
        self.organ.reset_choices()
        if select is not None and select in self.organ.choices:
            self.organ.value = select
