"""The plugin as napari finds it: the npe2 manifest is valid, installed through the package's entry
point, and offers our reader for NIfTI files, DICOM files and folders (only those) and the widget."""

from __future__ import annotations

import pytest

npe2 = pytest.importorskip("npe2")

NAME = "segevol_fast"


@pytest.fixture(scope="module")
def plugins():
    """npe2's plugin manager after discovery of the installed plugins (ours through its entry point)."""
    pm = npe2.PluginManager()
    pm.discover()
    return pm


def test_the_installed_manifest_is_valid_and_names_a_reader_and_a_widget():
    manifest = npe2.PluginManifest.from_distribution(NAME)  # raises when the YAML breaks the schema
    assert manifest.name == NAME
    commands = {c.id: c.python_name for c in manifest.contributions.commands}
    assert commands[f"{NAME}.get_reader"] == "segevol_fast.viewer.reader:napari_get_reader"
    assert commands[f"{NAME}.session_widget"] == "segevol_fast.viewer.widget:SessionWidget"
    (reader,) = manifest.contributions.readers
    assert reader.accepts_directories
    assert {w.command for w in manifest.contributions.widgets} == {f"{NAME}.session_widget"}


def test_every_command_imports():
    pytest.importorskip("napari")  # the widget's module imports it
    npe2.PluginManifest.from_distribution(NAME).validate_imports()  # each python_name resolves


@pytest.mark.parametrize("path", ["scan.nii.gz", "scan.nii", "SCAN.NII.GZ", "CT.1.2.840.5.dcm"])
def test_napari_offers_our_reader_for_nifti_and_dicom_files(plugins, path):
    assert NAME in {r.plugin_name for r in plugins.iter_compatible_readers([path])}


def test_napari_offers_our_reader_for_a_folder(plugins, tmp_path):
    assert NAME in {r.plugin_name for r in plugins.iter_compatible_readers([str(tmp_path)])}


@pytest.mark.parametrize("path", ["image.tif", "table.csv", "scan.nii.gz.bak"])
def test_napari_does_not_offer_it_for_other_files(plugins, path):
    assert NAME not in {r.plugin_name for r in plugins.iter_compatible_readers([path])}


def test_the_widget_is_in_the_plugins_menu(plugins):
    widgets = {(w.plugin_name, w.display_name) for w in plugins.iter_widgets()}
    assert (NAME, "Interactive segmentation") in widgets
