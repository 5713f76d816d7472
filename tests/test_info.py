"""info() and the `info` command: what users paste into bug reports."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import torch

import segevol_fast
from segevol_fast import _native


def test_info_reports_versions_and_backends():
    d = segevol_fast.info()
    # the version users report is the installed distribution's: catches __version__ drifting from
    # pyproject.toml
    assert d["segevol_fast"] == importlib.metadata.version("segevol_fast")
    assert d["cuda_available"] == torch.cuda.is_available()
    assert d["mkl_cbwr"] == os.environ.get("MKL_CBWR") and d["mkl_cbwr"]  # set on import unless the user chose
    assert "patch_embed" in d["ops"]
    cpu = d["ops"]["patch_embed"]["cpu"]
    assert cpu["selected"] in cpu["available"]
    if _native.native() is not None:
        assert d["native_extension"]["ops"] == ["patch_embed"]
        # a stale build (compiled against another torch than the one running) shows here
        assert d["native_extension"]["torch_at_build"] == d["torch"].split("+")[0]
        assert "native" in cpu["available"]
    else:
        assert d["native_import_error"]


def test_python_m_info_prints_human_and_json():
    out = subprocess.run([sys.executable, "-m", "segevol_fast", "info"], capture_output=True, text=True, check=True)
    assert "torch:" in out.stdout and "patch_embed [cpu]" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "segevol_fast", "info", "--json"], capture_output=True, text=True, check=True
    )
    printed, here = json.loads(out.stdout), segevol_fast.info()
    # --json prints info() itself (the fields that do not depend on the process's own settings)
    for key in ("segevol_fast", "torch", "native_extension", "devices", "ops"):
        assert printed[key] == here[key], key
