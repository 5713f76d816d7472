"""Shared test setup.

TRITON_INTERPRET=1 must be set before triton is first imported, so it is set here, at the top of
the first file pytest loads, whenever no CUDA device is present: Triton kernels then run on CPU
tensors through the interpreter (tiny shapes, fp32/fp16 only: bf16 is silently wrong there).
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    assert "triton" not in sys.modules or os.environ["TRITON_INTERPRET"] == "1"

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A fresh random seed per test (printed on failure), so inputs differ between runs."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None and not call.excinfo.errisinstance(pytest.skip.Exception):
        for name, value in item.user_properties:
            if name == "seed":
                print(f"\n[segevol_fast] {item.nodeid} ran with torch seed {value}")


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The shared real volumes: $SEGEVOL_DATA, default ../shared/data next to the repository."""
    path = pathlib.Path(os.environ.get("SEGEVOL_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}; set SEGEVOL_DATA to the folder with the test volumes")
    return path
