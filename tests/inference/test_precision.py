"""precision="auto": the rule per device and mode, and the CPU bf16 detection behind it."""

from __future__ import annotations

import pytest
import torch

from segevol_fast.errors import InvalidArgumentError
from segevol_fast.inference import precision as P
from segevol_fast.inference import segment

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def detected(monkeypatch):
    """Set what torch's CPUID probes and /proc/cpuinfo report, with no override in the env."""
    monkeypatch.delenv(P.CPU_BF16_ENV, raising=False)

    def set_(avx512_bf16=False, amx=False, cpuinfo=()):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(P, "_cpuinfo_flags", lambda: set(cpuinfo))
        P._detected_cpu_bf16.cache_clear()

    yield set_
    P._detected_cpu_bf16.cache_clear()


def test_cuda_rule(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert P.resolve_precision("auto", "fp32", CUDA, "fast") == "bf16"
    assert P.resolve_precision(None, "fp32", "cuda", "fast") == "bf16"
    assert P.resolve_precision("auto", "fp32", CUDA, "exact") == "fp32"  # the official float32 pipeline
    assert P.resolve_precision("fp32", "bf16", CUDA, "fast") == "fp32"  # an explicit choice wins
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert P.resolve_precision("auto", "fp32", CUDA, "fast") == "fp16"  # pre-Ampere GPUs


@pytest.mark.parametrize("probe", [dict(avx512_bf16=True), dict(amx=True), dict(cpuinfo={"fpu", "amx_bf16"})])
def test_cpu_with_bf16_instructions_runs_fast_mode_in_bf16(detected, probe):
    detected(**probe)
    native, why = P.cpu_bf16_native()
    assert native and "bf16" in why
    assert P.resolve_precision("auto", "fp32", CPU, "fast") == "bf16"
    assert P.resolve_precision("auto", "fp32", CPU, "exact") == "fp32"
    assert P.resolve_precision("fp32", "fp32", CPU, "fast") == "fp32"


def test_cpu_without_bf16_instructions_stays_fp32(detected):
    detected(cpuinfo={"avx512f", "avx512_vnni"})  # AVX-512 alone: oneDNN would emulate bf16, slower
    assert P.cpu_bf16_native() == (False, "CPU has no bf16 dot-product instructions (avx512_bf16 / amx_bf16)")
    assert P.resolve_precision("auto", "fp32", CPU, "fast") == "fp32"
    assert P.resolve_precision("auto", "fp16", CPU, "fast") == "fp16"  # the model's own setting stands
    assert P.resolve_precision("bf16", "fp32", CPU, "exact") == "bf16"  # forced


def test_environment_overrides_detection(detected, monkeypatch):
    detected(avx512_bf16=True)
    monkeypatch.setenv(P.CPU_BF16_ENV, "0")
    assert P.resolve_precision("auto", "fp32", CPU, "fast") == "fp32"
    detected()
    monkeypatch.setenv(P.CPU_BF16_ENV, "1")
    assert P.cpu_bf16_native() == (True, f"{P.CPU_BF16_ENV}=1")
    monkeypatch.setenv(P.CPU_BF16_ENV, "yes")
    with pytest.raises(InvalidArgumentError, match=P.CPU_BF16_ENV):
        P.cpu_bf16_native()


def test_unknown_precision_is_refused():
    with pytest.raises(InvalidArgumentError, match="precision"):
        P.resolve_precision("int8", "fp32", CPU, "fast")


def test_segment_reports_the_precision_auto_picked(tiny_model, ct, monkeypatch, one_thread):
    monkeypatch.setenv(P.CPU_BF16_ENV, "1")
    fast = segment(tiny_model, ct, text="liver", zoom_in=False, progress=False)
    exact = segment(tiny_model, ct, text="liver", zoom_in=False, mode="exact", progress=False)
    assert (fast.precision, exact.precision, tiny_model.precision) == ("bf16", "fp32", "fp32")
    monkeypatch.setenv(P.CPU_BF16_ENV, "0")
    assert segment(tiny_model, ct, text="liver", zoom_in=False, progress=False).precision == "fp32"


def test_inference_state_restores_the_model_even_when_the_block_raises():
    from segevol_fast import SegVol, SegVolConfig
    from segevol_fast.inference.precision import inference_state

    with torch.device("meta"):
        model = SegVol(SegVolConfig.tiny())
    model.train()
    with inference_state(model, "bf16"):
        assert not model.training and model.precision == "bf16"
    assert model.training and model.precision == "fp32"
    model.eval()
    model.set_precision("fp16")
    with pytest.raises(RuntimeError, match="boom"), inference_state(model, "fp32"):
        assert model.precision == "fp32"
        raise RuntimeError("boom")
    assert not model.training and model.precision == "fp16"
