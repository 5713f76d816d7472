"""Compile-check every csrc/<op>/cuda/*.cu with nvcc, on any machine that has nvcc (no GPU needed).

The .cu files include only CUDA headers (torch-facing code lives in <op>/cuda/*_cuda.cpp, built only
in CUDA builds), so they compile in about a second here even with a CPU torch; this keeps GPU code from
rotting on machines that never build it.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
CU_FILES = sorted(CSRC.glob("*/cuda/*.cu"))


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for candidate in ("/usr/local/cuda/bin/nvcc",):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


NVCC = _find_nvcc()
# Headers that need torch: including them would make a .cu uncompilable without a CUDA torch.
_TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch/|ATen/|c10/|caffe2/)', re.MULTILINE)


def test_cuda_sources_exist():
    assert CU_FILES, f"no .cu files under {CSRC}/<op>/cuda/"


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_includes_no_torch_headers(cu: pathlib.Path):
    # A torch/ATen include (directly or through a local header) breaks the compile-check design.
    for path in [cu, *sorted(cu.parent.glob("*.cuh"))]:
        hits = [m.group(0).strip() for m in _TORCH_INCLUDE.finditer(path.read_text())]
        assert not hits, f"{path.name} includes torch headers {hits}; move torch code to a *_cuda.cpp wrapper"


@pytest.mark.skipif(
    NVCC is None, reason="nvcc not found on PATH or at /usr/local/cuda/bin/nvcc; CUDA sources not compile-checked"
)
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles(cu: pathlib.Path, tmp_path: pathlib.Path):
    cmd = [NVCC, "-std=c++17", "-arch=sm_90", "-c", str(cu), "-o", str(tmp_path / (cu.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        print(proc.stderr)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{proc.stderr}"
