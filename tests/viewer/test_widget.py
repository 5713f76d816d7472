"""The napari plugin in a real (hidden) napari viewer: the reader through napari's own plugin
discovery, and the dock widget driving a session on the shared CT with the tiny random-weights
model (the masks mean nothing; the wiring is what is tested): open, segment by name, refine with
clicks, undo, clear, export, cancel, and errors as notifications."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("napari")
nib = pytest.importorskip("nibabel")

from segevol_fast.errors import PromptError  # noqa: E402
from segevol_fast.viewer.annotator import volume_from_layer  # noqa: E402
from segevol_fast.viewer.reader import VOLUME_KEY  # noqa: E402

CT = "ct_abdomen_sm.nii.gz"
WAIT_MS = 120_000  # a step on a busy 2-core CI box; each takes seconds


@pytest.fixture
def errors(monkeypatch) -> list[str]:
    """The messages the widget shows as napari error notifications."""
    shown: list[str] = []
    monkeypatch.setattr("segevol_fast.viewer.widget.show_error", shown.append)
    return shown


@pytest.fixture
def widget(viewer, data_dir, monkeypatch, errors):
    """The dock widget in `viewer`, set to the tiny random model (its tokenizer from the shared data)."""
    from segevol_fast.viewer.widget import SessionWidget

    monkeypatch.setenv("SEGEVOL_DATA", str(data_dir))
    w = SessionWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.model_source.value = "tiny"
    return w


def wait(qtbot, w) -> None:
    qtbot.waitUntil(lambda: not w.busy, timeout=WAIT_MS)


def open_scan(viewer, path):
    (layer,) = viewer.open(path, plugin="segevol_fast")  # as `napari --plugin segevol_fast PATH` does
    return layer


def open_session(qtbot, w, layer) -> None:
    w.image.value = layer
    w.open_session()
    wait(qtbot, w)


def test_napari_offers_our_reader_and_takes_it_as_the_preferred_one(viewer, data_dir):
    from napari.errors import MultipleReaderError
    from napari.settings import get_settings

    # napari's built-in imageio reader claims *.nii.gz too (and cannot read it): napari asks which one
    with pytest.raises(MultipleReaderError) as asked:
        viewer.open(data_dir / CT, plugin=None)
    assert "segevol_fast" in asked.value.available_plugins
    # the choice napari's dialog remembers (settings in a temporary file: conftest)
    plugins = get_settings().plugins
    plugins.extension2reader = {"*.nii.gz": "segevol_fast"}
    try:
        (layer,) = viewer.open(data_dir / CT, plugin=None)
    finally:
        plugins.extension2reader = {}
    assert layer.metadata[VOLUME_KEY].source.endswith(CT)


def test_our_reader_places_voxels_where_the_file_affine_says(viewer, data_dir):
    layer = open_scan(viewer, data_dir / CT)
    affine = nib.load(data_dir / CT).affine  # the file's own header, read independently of our loader
    voxels = np.array([[0, 0, 0], [121, 100, 29], [60, 50, 14], [7, 93, 2]], dtype=float)
    world = np.array([layer.data_to_world(v) for v in voxels])
    np.testing.assert_allclose(world, voxels @ affine[:3, :3].T + affine[:3, 3], atol=1e-9)
    assert layer.data.shape == (122, 101, 30)
    assert layer.metadata[VOLUME_KEY].shape == layer.data.shape


def test_a_dicom_series_folder_opens_with_its_geometry(viewer, data_dir):
    layer = open_scan(viewer, data_dir / "ct_abdomen_dicom")
    volume = layer.metadata[VOLUME_KEY]
    assert layer.data.shape == (512, 512, 20)
    voxels = np.array([[0, 0, 0], [511, 511, 19], [100, 300, 7]], dtype=float)
    world = np.array([layer.data_to_world(v) for v in voxels])
    np.testing.assert_allclose(world, volume.voxel_to_world(voxels), atol=1e-9)


def test_an_image_layer_from_elsewhere_becomes_a_volume_with_its_layer_transform():
    from napari.layers import Image

    layer = Image(
        np.zeros((12, 10, 8), np.int16),
        scale=(2.0, 1.5, 3.0),
        translate=(-40.0, 7.0, 12.5),
        rotate=((0.8, -0.6, 0.0), (0.6, 0.8, 0.0), (0.0, 0.0, 1.0)),
    )
    volume = volume_from_layer(layer, "mri")
    voxels = np.array([[0, 0, 0], [11, 9, 7], [3, 5, 1]], dtype=float)
    np.testing.assert_allclose(volume.voxel_to_world(voxels), [layer.data_to_world(v) for v in voxels], atol=1e-9)
    assert volume.modality == "mri" and volume.spacing == pytest.approx((2.0, 1.5, 3.0))


def test_a_session_segments_refines_undoes_clears_and_exports(viewer, widget, qtbot, data_dir, tmp_path, errors):
    w = widget
    open_session(qtbot, w, open_scan(viewer, data_dir / CT))
    assert w.annotator is not None, errors
    assert not w.banner.native.isHidden()  # random weights are announced in the widget itself (hidden otherwise)

    qtbot.keyClicks(w.prompt.native, "sple")  # completion of what is typed
    assert "spleen" in w.completer.model().stringList()

    w.prompt.value = "liver, spleen"
    w.segment()
    wait(qtbot, w)
    organs = viewer.layers["organs"]
    assert list(organs.features["name"]) == ["background", "liver", "spleen"]
    assert set(np.unique(organs.data)) <= {0, 1, 2}
    assert np.array_equal(organs.data, w.annotator.labels.label_map())
    before = {name: mask.copy() for name, mask in w.annotator.labels.masks().items()}

    clicks = viewer.layers["clicks"]
    clicks.add([60, 50, 14])  # the clicks layer is placed like the scan: its data coordinates are voxels
    w.click_sign.value = False
    clicks.add([20, 30, 10])
    assert list(clicks.features["positive"]) == [True, False]
    w.organ.value = "liver"
    w.refine()
    wait(qtbot, w)
    after = w.annotator.labels.masks()
    assert not np.array_equal(after["liver"], before["liver"])  # the clicks reached the decoder
    assert np.array_equal(after["spleen"], before["spleen"])  # and touched no other organ
    np.testing.assert_array_equal(w.annotator.session.history["liver"]["point_labels"], [1, 0])
    assert len(clicks.data) == 0  # used clicks are consumed

    w.undo()
    assert np.array_equal(w.annotator.labels.masks()["liver"], before["liver"])
    assert w.annotator.session.history["liver"]["points"] is None  # the next refine starts from the text again
    assert np.array_equal(organs.data, w.annotator.labels.label_map())

    w.organ.value = "spleen"
    w.clear()
    assert list(organs.features["name"]) == ["background", "liver"]
    assert 2 not in organs.data

    w.export_folder.value = tmp_path / "out"
    w.export()
    wait(qtbot, w)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"liver.nii.gz", "label_map.nii.gz", "summary.json"}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["labels"] == ["liver"] and summary["random_weights"] is True
    assert summary["prompts"]["liver"]["text"] == "liver"
    saved = nib.load(tmp_path / "out" / "liver.nii.gz")
    np.testing.assert_array_equal(np.asarray(saved.dataobj) > 0, before["liver"])
    np.testing.assert_allclose(saved.affine, nib.load(data_dir / CT).affine)
    assert errors == []


def test_an_adapter_file_applies_to_the_session_and_is_recorded(viewer, widget, qtbot, data_dir, tmp_path, errors):
    """The adapter chosen in the widget reaches the session's masks (trained context priors for the
    liver change them) and its file is named in the export."""
    from segevol_fast.cli.common import build_model
    from tests.test_cli import _save_trained_priors

    priors = _save_trained_priors(build_model(None, "tiny", None, "cpu"), tmp_path / "priors.safetensors")
    w, layer, masks = widget, open_scan(viewer, data_dir / CT), {}
    for name, adapter in (("without", None), ("with", priors)):
        w.adapter.value = adapter
        open_session(qtbot, w, layer)  # the same seeded random tiny model, with or without the file
        w.prompt.value = "liver"
        w.segment()
        wait(qtbot, w)
        masks[name] = w.annotator.labels.masks()["liver"]
    assert not np.array_equal(masks["with"], masks["without"])
    w.export_folder.value = tmp_path / "out"
    w.export()
    wait(qtbot, w)
    assert "priors.safetensors" in (tmp_path / "out" / "summary.json").read_text()
    assert errors == []


def test_a_box_on_one_slice_prompts_and_a_dicom_series_exports_a_dicom_seg(viewer, widget, qtbot, data_dir, tmp_path):
    w = widget
    w.zoom_in.value = False  # zoom-out only: the 512x512 series in seconds
    open_session(qtbot, w, open_scan(viewer, data_dir / "ct_abdomen_dicom"))
    boxes = viewer.layers["boxes"]
    boxes.add_rectangles(np.array([[100, 150, 9], [100, 350, 9], [300, 350, 9], [300, 150, 9]], dtype=float))
    w.segment()  # no name: the box alone
    wait(qtbot, w)
    (name,) = w.annotator.labels.names().values()
    np.testing.assert_array_equal(w.annotator.session.history[name]["box"], [100, 150, 0, 300, 350, 19])
    w.export_folder.value = tmp_path / "seg"
    w.export()
    wait(qtbot, w)
    assert (tmp_path / "seg" / "segmentation.dcm").is_file()


def test_errors_become_notifications_with_their_message(viewer, widget, qtbot, data_dir, errors):
    w = widget
    w.segment()
    assert errors == ["open a session first"]
    w.model_source.value = "folder"
    w.open_session()  # no scan layer yet
    assert "open a scan first" in errors[-1]
    w.image.value = open_scan(viewer, data_dir / CT)
    w.open_session()  # no weights folder chosen
    assert errors[-1] == "choose the folder (or file) holding the SegVol weights"
    w.model_source.value = "tiny"
    w.max_memory.value = "lots"
    w.open_session()  # raised in the worker thread
    wait(qtbot, w)
    assert "lots" in errors[-1] and w.annotator is None
    assert not w.busy and w.open_button.enabled


def test_opening_a_session_can_be_cancelled(viewer, widget, qtbot, data_dir):
    w = widget
    w.image.value = open_scan(viewer, data_dir / CT)
    w.open_session()
    w.cancel()
    wait(qtbot, w)
    assert w.annotator is None and w.status.value == "cancelled"
    assert "organs" not in viewer.layers


def test_prompt_errors_are_typed_before_any_work(viewer, widget, qtbot, data_dir, errors):
    w = widget
    open_session(qtbot, w, open_scan(viewer, data_dir / CT))
    viewer.layers["clicks"].add([500, 50, 14])  # outside the 122-voxel axis
    w.prompt.value = "liver"
    w.segment()
    assert not w.busy and "outside the scan" in errors[-1]
    with pytest.raises(PromptError):
        w.annotator.segment()  # nothing to prompt with


def test_a_scan_stored_along_permuted_axes_gets_its_clicks_and_organs_where_napari_draws_it(
    viewer, widget, qtbot, data_dir, tmp_path
):
    ct = nib.load(data_dir / CT)
    order = (2, 0, 1)  # stored axis 0 runs along world z, ...: napari shows it reordered
    permuted = nib.Nifti1Image(np.transpose(np.asarray(ct.dataobj), order), ct.affine[:, [*order, 3]])
    nib.save(permuted, tmp_path / "permuted.nii.gz")
    w = widget
    w.zoom_in.value = False
    layer = open_scan(viewer, tmp_path / "permuted.nii.gz")
    volume = layer.metadata[VOLUME_KEY]
    assert layer.data.shape != volume.shape  # the reader reordered the axes
    open_session(qtbot, w, layer)
    click = np.array([60.0, 50.0, 14.0])  # in the layer's (reordered) data coordinates
    viewer.layers["clicks"].add(click)
    w.prompt.value = "liver"
    w.segment()
    wait(qtbot, w)
    stored = volume.world_to_voxel(np.asarray(layer.data_to_world(click)))
    np.testing.assert_array_equal(w.annotator.session.history["liver"]["points"], [np.rint(stored)])
    organs = viewer.layers["organs"]
    assert organs.data.shape == layer.data.shape
    # every labelled voxel of the organs layer sits at the world position of the stored voxel it labels
    liver = w.annotator.labels.masks()["liver"]
    assert liver.any()
    voxels = np.argwhere(organs.data == 1)[:50].astype(float)
    world = np.array([organs.data_to_world(v) for v in voxels])
    back = np.rint(volume.world_to_voxel(world)).astype(int)
    assert liver[tuple(back.T)].all()


def _docs_script() -> str:
    """docs/napari.md's script (the one that makes the screenshot)."""
    text = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "napari.md").read_text()
    (code,) = [c for c in re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S) if "screenshot(" in c]
    return code


def test_the_documented_script_draws_the_widget_headless(data_dir, tmp_path, qt_display, monkeypatch):
    (tmp_path / "show.py").write_text(_docs_script().replace("../shared/data/", f"{data_dir}/"))
    monkeypatch.setenv("SEGEVOL_DATA", str(data_dir))
    proc = subprocess.run(
        [sys.executable, "show.py"], cwd=tmp_path, capture_output=True, text=True, timeout=WAIT_MS // 1000
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image

    picture = np.asarray(Image.open(tmp_path / "napari-widget.png"))
    assert picture.shape[0] > 600 and picture.shape[1] > 1000  # the window, dock widget included
    assert len(np.unique(picture.reshape(-1, picture.shape[-1]), axis=0)) > 100  # drawn, not blank
