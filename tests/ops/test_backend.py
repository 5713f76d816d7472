"""Backend dispatch: defaults per device, forcing by env var and context manager, clear errors."""

from __future__ import annotations

import os

import pytest
import torch

from segevol_fast import _native, ops
from segevol_fast.errors import BackendUnavailableError
from segevol_fast.ops import _backend


def test_native_extension_loaded_when_required():
    # `make test` sets SEGEVOL_FAST_REQUIRE_NATIVE=1 so that a broken build fails CI instead of
    # silently falling back to the reference.
    if os.environ.get("SEGEVOL_FAST_REQUIRE_NATIVE") != "1":
        pytest.skip("SEGEVOL_FAST_REQUIRE_NATIVE is not set")
    assert _native.native() is not None, _native.native_import_error()
    info = _native.native().build_info()
    # (each op's presence in info["ops"] is checked by tests/ops/test_op_contract.py)
    if torch.version.cuda is None:  # a CPU torch can never have CUDA kernels
        assert info["cuda"] is False


def test_cpu_default_is_native_when_built_else_ref(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    expected = "native" if _native.native() is not None else "ref"
    assert ops.select("patch_embed", "cpu") == expected


def test_cuda_default_order_prefers_native_then_triton(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    impls = dict(_backend._REGISTRY["patch_embed"])
    monkeypatch.setitem(
        _backend._REGISTRY,
        "patch_embed",
        {
            **impls,
            "native": _backend._Impl(impls["native"].fn, lambda dev: "not built"),
            "triton": _backend._Impl(impls["triton"].fn, _backend.always),
        },
    )
    assert ops.select("patch_embed", "cuda") == "triton"
    monkeypatch.setitem(
        _backend._REGISTRY,
        "patch_embed",
        {**impls, "native": _backend._Impl(impls["native"].fn, _backend.always)},
    )
    assert ops.select("patch_embed", "cuda") == "native"


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "ref")
    assert ops.select("patch_embed", "cpu") == "ref"
    monkeypatch.setenv(_backend.ENV_VAR, "auto")
    assert ops.forced_backend() is None


def test_bad_env_var_is_an_error(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "cudnn")
    with pytest.raises(BackendUnavailableError, match="not a backend"):
        ops.select("patch_embed", "cpu")


def test_context_manager_wins_over_env_and_restores(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "native")
    with ops.use_backend("ref"):
        assert ops.select("patch_embed", "cpu") == "ref"
        with ops.use_backend(None):
            assert ops.forced_backend() == "native"
        assert ops.forced_backend() == "ref"
    assert ops.forced_backend() == "native"


def test_unknown_backend_name_rejected():
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.use_backend("cuda"):
            pass


def test_forcing_native_without_extension_explains_how_to_build(monkeypatch):
    monkeypatch.setattr(_native, "native", lambda: None)
    monkeypatch.setattr(_native, "native_import_error", lambda: "ImportError: no _C")
    with ops.use_backend("native"), pytest.raises(BackendUnavailableError, match="make build"):
        ops.select("patch_embed", "cpu")


def test_forcing_native_cuda_on_cpu_only_build_says_so():
    if _native.native() is None or _native.native_has_cuda():
        pytest.skip("needs a CPU-only native build")
    with ops.use_backend("native"), pytest.raises(BackendUnavailableError, match="without CUDA"):
        ops.select("patch_embed", "cuda")


def test_forcing_native_on_a_build_without_the_op_says_rebuild(monkeypatch):
    # A _C built from older sources lacks ops listed in today's csrc/op_list.h: the native backend
    # of such an op must count as unavailable (auto falls back) and say so when forced.
    if _native.native() is None:
        pytest.skip("needs the native extension")
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setattr(_native, "native_ops", lambda: frozenset())
    assert ops.select("patch_embed", "cpu") == "ref"
    with ops.use_backend("native"), pytest.raises(BackendUnavailableError, match="has no op 'patch_embed'"):
        ops.select("patch_embed", "cpu")
