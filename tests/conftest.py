"""Shared test setup.

Shared material: the real volumes (`data_dir`) and the reference notes (`reference_notes`) live
outside the repository, in `$SEGEVOL_DATA` (default ../shared/data next to the repository) and
`$SEGEVOL_REFERENCE` (default ../shared/reference/segvol-reference.md). When either is missing or
incomplete, every test that needs it FAILS with a message saying how to point at it: a green run
must mean the inference, adapter and training tests ran, not that they were skipped. Someone
running a subset without the data opts in to skipping them instead with
SEGEVOL_ALLOW_MISSING_DATA=1.

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
    settings.register_profile(
        "ci",
        max_examples=40,
        deadline=None,
        derandomize=False,
        print_blob=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
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


# what the tests read from the data folder: a folder missing one of them is incomplete
DATA_FILES = (
    "clip_tokenizer/tokenizer.json",
    "ct_abdomen_sm.nii.gz",
    "ct_abdomen_sm_labels.nii.gz",
    "ct_abdomen_dicom",
    "ct_abdomen_dicom_labels.nii.gz",
    "labels.json",
    "mr_abdomen_sm.nii.gz",
    "mr_abdomen_sm_labels.nii.gz",
    "mr_brain_mni152_t1.nii.gz",
)
ALLOW_MISSING_DATA = "SEGEVOL_ALLOW_MISSING_DATA"


def _shared_material_missing(message: str) -> None:
    """Fail the test (module docstring); skip it only when the run opted in to that."""
    if os.environ.get(ALLOW_MISSING_DATA) == "1":
        pytest.skip(message)
    pytest.fail(f"{message} (to skip the tests that need it instead, set {ALLOW_MISSING_DATA}=1)", pytrace=False)


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The shared real volumes: $SEGEVOL_DATA, default ../shared/data next to the repository."""
    path = pathlib.Path(os.environ.get("SEGEVOL_DATA", REPO.parent / "shared" / "data"))
    missing = [name for name in DATA_FILES if not (path / name).exists()]
    if missing:
        what = "not found" if not path.is_dir() else f"incomplete (no {', '.join(missing)})"
        _shared_material_missing(
            f"shared test data {what} at {path}; set SEGEVOL_DATA to the folder with the test volumes"
        )
    return path


@pytest.fixture(scope="session")
def reference_notes() -> pathlib.Path:
    """The SegVol reference notes: $SEGEVOL_REFERENCE, default ../shared/reference/segvol-reference.md."""
    default = REPO.parent / "shared" / "reference" / "segvol-reference.md"
    path = pathlib.Path(os.environ.get("SEGEVOL_REFERENCE", default))
    if not path.is_file():
        _shared_material_missing(f"reference notes not found at {path}; set SEGEVOL_REFERENCE to segvol-reference.md")
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
def two_series(data_dir, tmp_path) -> pathlib.Path:
    """A DICOM folder holding two series: the shared CT series with its even slices in series
    1.2.826.0.1.3680043.8.498.1 ('even', 10 slices) and its odd ones in ...498.2 ('odd')."""
    pydicom = pytest.importorskip("pydicom")
    folder = tmp_path / "two_series"
    folder.mkdir()
    for n, f in enumerate(sorted((data_dir / "ct_abdomen_dicom").iterdir())):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2" if n % 2 else "1.2.826.0.1.3680043.8.498.1"
        ds.SeriesDescription = "odd" if n % 2 else "even"
        ds.save_as(folder / f.name)
    return folder


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
