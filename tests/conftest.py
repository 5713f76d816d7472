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

# precision="auto" picks bf16 on CPUs with bf16 instructions (inference/precision.py): pin the
# detection off so every test runs the same arithmetic on any CI machine; tests/inference/
# test_precision.py covers the rule itself.
os.environ.setdefault("SEGEVOL_FAST_CPU_BF16", "0")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]

try:  # property tests (tests/property): a fast, reproducible-on-failure profile for CI and `make test`
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test dependency (requirements/dev.txt); only tests/property need it
    pass
else:
    # deadline None: the 2-core CI boxes stall for seconds at times, which is not a failure;
    # print_blob: a failure prints the @reproduce_failure line that replays it exactly (no example
    # database: nothing is written into the working tree)
    settings.register_profile("ci", max_examples=40, deadline=None, derandomize=False, print_blob=True,
                              database=None, suppress_health_check=[HealthCheck.too_slow])
    # a bug hunt before a release: HYPOTHESIS_PROFILE=thorough pytest tests/property
    settings.register_profile("thorough", settings.get_profile("ci"), max_examples=2000)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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


@pytest.fixture
def one_thread():
    """One torch thread for the test: on the 2-core CI boxes OpenMP spinning between concurrent
    processes costs more than a second thread wins. Modules use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_model(data_dir):
    """The tiny SegVol (weights from seed 0) with the shared CLIP tokenizer, marked as loaded so
    segment() does not warn about random weights."""
    from segevol_fast import SegVol, SegVolConfig

    torch.manual_seed(0)
    model = SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer").eval()
    model.weights_source = "test"
    return model


@pytest.fixture
def ct(data_dir):
    """The shared real abdominal CT (122x101x30 int16) as a Volume."""
    from segevol_fast import load_volume

    return load_volume(data_dir / "ct_abdomen_sm.nii.gz")
