"""`make test` runs the suite a second time with the AVX2 code paths forced (Makefile, AVX2_ENV),
as on AVX2-only CPUs. That pass is only worth something if the forcing took effect: torch's own
kernels and oneDNN must report AVX2. A renamed environment variable would otherwise turn the
second pass into a silent repeat of the first. (MKL reports no instruction set to check; its
MKL_ENABLE_INSTRUCTIONS is set by the same line.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

EXPECTED = os.environ.get("SEGEVOL_FAST_EXPECT_ISA")

pytestmark = pytest.mark.skipif(not EXPECTED, reason="not the forced-ISA pass of `make test`")

_ONEDNN_ISA = """
import torch
x, w = torch.randn(1, 1, 32, 64, 64), torch.randn(8, 1, 4, 16, 16)
with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
    torch.nn.functional.conv3d(x, w, stride=(4, 16, 16))
"""


def test_torch_kernels_run_the_forced_instruction_set():
    assert torch.backends.cpu.get_cpu_capability() == EXPECTED.upper()


def test_mkl_is_limited_to_the_forced_instruction_set():
    assert os.environ.get("MKL_ENABLE_INSTRUCTIONS") == EXPECTED.upper()


def test_onednn_runs_the_forced_instruction_set():
    out = subprocess.run([sys.executable, "-c", _ONEDNN_ISA], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    isa = [line for line in (out.stdout + out.stderr).splitlines() if ",isa:" in line]
    assert isa, "oneDNN printed no instruction-set line:\n" + out.stdout + out.stderr
    assert isa[0].rstrip().endswith(f"isa:Intel {EXPECTED.upper()}"), isa[0]
