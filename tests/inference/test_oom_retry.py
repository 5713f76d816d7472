"""Out-of-memory recovery in mode="fast": smaller batches, then host stitching, then a clear error.

No GPU here: torch.OutOfMemoryError (what torch.cuda.OutOfMemoryError aliases) is injected into the
encoder, the decoder or the stitching of a CPU run, and the recovered run is compared with a clean
one. The `gpu` test at the end forces a real allocator limit instead.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segevol_fast import SegVol, SegVolConfig
from segevol_fast.errors import DeviceOutOfMemoryError, SegVolFastError
from segevol_fast.inference import stitch
from segevol_fast.inference.budget import Plan
from segevol_fast.inference.fast import run_fast
from segevol_fast.inference.oom import OutOfMemoryError
from segevol_fast.inference.prompts import Prompt
from segevol_fast.preprocess import Preprocessed

SHAPE = (12, 48, 60)  # tiny model windows (8, 32, 32): 2 x 2 x 3 grid windows
PROMPTS = [
    Prompt("whole", box=np.array([0.0, 0, 0, 11, 47, 59])),
    Prompt("part", box=np.array([1.0, 3, 4, 9, 30, 40])),
    Prompt("corner", box=np.array([0.0, 0, 0, 5, 20, 20])),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SegVol(SegVolConfig.tiny()).eval()


@pytest.fixture(scope="module")
def prep():
    g = torch.Generator().manual_seed(1)
    return Preprocessed(torch.rand(1, 1, *SHAPE, generator=g), (0, 0, 0), SHAPE, tuple(reversed(SHAPE)), None)


def _plan(**kw) -> Plan:
    return Plan(
        **{**dict(device="cpu", window_batch=4, accumulator_dtype=torch.float32, decode_batch=3, prompt_group=3), **kw}
    )


@pytest.fixture(scope="module")
def clean(model, prep):
    # computed at the thread count the tests run at (one_thread is function-scoped, so it is not
    # in force yet while a module fixture is built): GEMMs may round differently per thread count
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_fast(model, prep, PROMPTS, plan=_plan(), return_logits=True)
    finally:
        torch.set_num_threads(n)


def _fail_calls(monkeypatch, obj, name, fail_at):
    """Make the calls number `fail_at` (0-based) of obj.name raise torch.OutOfMemoryError; returns the
    list of batch sizes of every call."""
    real, sizes = getattr(obj, name), []

    def wrapped(*args, **kw):
        first = args[0] if args else next(iter(kw.values()))
        sizes.append(first.shape[0])
        if len(sizes) - 1 in fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(*args, **kw)

    monkeypatch.setattr(obj, name, wrapped)
    return sizes


def _same(a_outs, b_outs, exact=True):
    for a, b in zip(a_outs, b_outs, strict=True):
        assert torch.equal(a.mask, b.mask) and a.roi == b.roi and a.windows == b.windows
        if exact:
            assert torch.equal(a.logits, b.logits)
        else:  # a different decode batch rounds differently (~3e-8), as test_fast checks
            torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)


def test_torch_cuda_oom_is_the_class_caught():
    assert torch.cuda.OutOfMemoryError is OutOfMemoryError


# encode_image call 0 is the zoom-out image; the zoom-in windows follow in batches of 4
@pytest.mark.parametrize(
    "fail_at,changes",
    [
        ({1}, ["window batch 4 -> 2"]),
        ({1, 2}, ["window batch 4 -> 2", "window batch 2 -> 1"]),  # the same windows fail twice
        ({2}, ["window batch 4 -> 2"]),  # a later batch
        ({1, 3}, ["window batch 4 -> 2", "window batch 2 -> 1"]),  # two different points
    ],
)
def test_encoder_oom_halves_the_window_batch_and_changes_nothing(model, prep, clean, monkeypatch, fail_at, changes):
    sizes = _fail_calls(monkeypatch, model, "encode_image", fail_at)
    log: list = []
    got = run_fast(model, prep, PROMPTS, plan=_plan(), return_logits=True, oom_retries=log)
    assert [r["change"] for r in log] == changes and all(r["stage"] == "encoder" for r in log)
    assert "injected" in log[0]["error"]
    assert sizes[1] == 4 and sizes[-1] <= 4 // 2 ** len(changes)  # the batch really shrank
    _same(clean, got)  # the tiny encoder is batch-invariant bit for bit


@pytest.mark.parametrize(
    "fail_at,changes",
    [
        ({0}, ["decode batch 3 -> 1"]),  # the zoom-out decode of all 3 prompts
        ({2}, ["decode batch 3 -> 1"]),  # a zoom-in window's decode
    ],
)
def test_decoder_oom_halves_the_decode_batch(model, prep, clean, monkeypatch, fail_at, changes):
    _fail_calls(monkeypatch, model, "decode", fail_at)
    log: list = []
    got = run_fast(model, prep, PROMPTS, plan=_plan(), return_logits=True, oom_retries=log)
    assert [r["change"] for r in log] == changes and log[0]["stage"] == "decoder"
    _same(clean, got, exact=False)


def test_stitching_oom_restarts_on_the_host_at_batch_one(model, prep, clean, monkeypatch):
    real, calls = stitch.Stitch.add, []

    def add(self, logits, origin):
        calls.append(origin)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (injected in stitching)")
        return real(self, logits, origin)

    monkeypatch.setattr(stitch.Stitch, "add", add)
    log: list = []
    got = run_fast(model, prep, PROMPTS, plan=_plan(), return_logits=True, oom_retries=log)
    assert len(log) == 1 and log[0]["stage"] == "stitching" and "host" in log[0]["change"]
    _same(clean, got, exact=False)


def test_oom_at_batch_one_moves_stitching_to_the_host_then_gives_up(model, prep, monkeypatch):
    sizes = _fail_calls(monkeypatch, model, "encode_image", set(range(1, 10_000)))  # every zoom-in encode
    log: list = []
    with pytest.raises(DeviceOutOfMemoryError) as info:
        run_fast(model, prep, PROMPTS, plan=_plan(), return_logits=True, oom_retries=log)
    err = info.value
    assert isinstance(err, SegVolFastError) and isinstance(err, MemoryError)
    msg = str(err)
    assert "window batch 1" in msg and "host" in msg and "max_memory" in msg and "injected" in msg
    assert "window batch 4 -> 2" in msg and "window batch 2 -> 1" in msg  # what was tried
    assert [r["stage"] for r in log] == ["encoder", "encoder", "stitching"]
    assert sizes.count(4) == 1 and max(sizes[-2:]) == 1  # the last attempts ran one window at a time


def test_no_oom_no_retries(model, prep, clean):
    log: list = []
    _same(clean, run_fast(model, prep, PROMPTS, plan=_plan(), return_logits=True, oom_retries=log))
    assert log == []


def test_segment_reports_retries_in_plan_and_notes(data_dir, monkeypatch):
    m = SegVol(SegVolConfig.tiny()).eval()
    m.weights_source = "test"
    vol = np.random.default_rng(0).integers(-500, 500, size=(60, 48, 12)).astype(np.int16)
    kw = dict(box=[[5, 5, 1, 50, 40, 10], [0, 0, 0, 20, 20, 5]], progress=False)
    ref = m.segment(vol, **kw)
    assert ref.plan["oom_retries"] == [] and not any("out of" in n for n in ref.notes)
    _fail_calls(monkeypatch, m, "decode", {0})
    res = m.segment(vol, **kw)
    assert [r["change"] for r in res.plan["oom_retries"]] == ["decode batch 2 -> 1"]
    assert any("ran out of cpu memory 1 time(s)" in n and "decode batch 2 -> 1" in n for n in res.notes)
    for k in ref.masks:
        np.testing.assert_array_equal(ref.masks[k], res.masks[k])


@pytest.mark.gpu
@pytest.mark.slow
def test_a_real_cuda_allocator_limit_is_survived():
    """Full-size model on the GPU; the allocator is capped between the peaks of window batch 1 and
    8, so the batch-8 plan must shrink its batch and still give the clean run's masks."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = SegVol(SegVolConfig()).eval().to(dev)
    shape = (96, 400, 400)  # 3 x 3 x 3 windows of (32, 256, 256)
    g = torch.Generator().manual_seed(0)
    p = Preprocessed(torch.rand(1, 1, *shape, generator=g), (0, 0, 0), shape, tuple(reversed(shape)), None)
    prompts = [Prompt("all", box=np.array([0.0, 0, 0, shape[0] - 1, shape[1] - 1, shape[2] - 1]))]
    plan = dict(device=dev, accumulator_dtype=torch.float32, stitch_device=dev)

    def peak(wb):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        out = run_fast(model, p, prompts, plan=Plan(window_batch=wb, **plan), return_logits=True)
        return out, torch.cuda.max_memory_reserved(dev)

    ref, peak1 = peak(1)
    _, peak8 = peak(8)
    assert peak8 > peak1
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction((peak1 + peak8) / 2 / total, dev)
    try:
        log: list = []
        got = run_fast(model, p, prompts, plan=Plan(window_batch=8, **plan), return_logits=True, oom_retries=log)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        torch.cuda.empty_cache()
    assert log and log[0]["stage"] == "encoder" and log[0]["change"] == "window batch 8 -> 4"
    for a, b in zip(ref, got):
        # cuBLAS may pick other kernels for other batch sizes: logits agree to rounding
        assert (a.mask != b.mask).float().mean() < 1e-4
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-3)
