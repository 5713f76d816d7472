"""Fixtures of the napari plugin's tests: a napari viewer on a working Qt display.

Only test_widget.py and test_manifest.py use napari (they `importorskip` it, so they skip where the
extra is not installed); the logic tests beside them (coords, prompts, labels, reader) run without
it, and nothing here imports napari or Qt at import time.

The display is pytest-xvfb's virtual X screen (requirements/dev.txt; Xvfb and Mesa from .ci/run).
Qt aborts the whole process when it finds no usable display, which would end the run without a
report, so a child process tries first (`qt_display`); when it cannot start Qt the napari tests
fail with its message, which names what is missing, instead of passing unseen.

napari's own pytest plugin (`make_napari_viewer`) is off for the whole suite (pyproject.toml says
why), so `viewer` makes and closes its viewers itself.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "from qtpy.QtWidgets import QApplication; app = QApplication([]); print(app.platformName())"


@pytest.fixture(scope="session")
def qt_display(tmp_path_factory) -> str:
    """The Qt platform in use ("xcb" under Xvfb), after a child process started Qt successfully.
    napari's settings file goes to a temporary folder, not the user's (set before napari reads it)."""
    pytest.importorskip("napari")
    os.environ.setdefault("NAPARI_CONFIG", str(tmp_path_factory.mktemp("napari") / "settings.yaml"))
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        tail = "\n".join((probe.stderr or probe.stdout).strip().splitlines()[-6:])
        pytest.fail(
            f"Qt cannot start here (DISPLAY={os.environ.get('DISPLAY')!r}), so napari cannot either:\n{tail}\n"
            "install Xvfb, Mesa and Qt's X libraries as .ci/run does (pytest-xvfb then starts a screen)",
            pytrace=False,
        )
    return probe.stdout.strip()


@pytest.fixture
def viewer(qt_display, qtbot):
    """A hidden napari viewer, closed after the test (qtbot: pytest-qt's QApplication)."""
    import napari

    v = napari.Viewer(show=False)
    yield v
    v.close()
