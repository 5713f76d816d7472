"""The contract every op keeps (../shared/DESIGN.md "Ops"), run once per entry of SPECS.

For each op: every available backend x dtype x odd shapes x (non-)contiguous inputs against the
op's reference in float64 (tests/numerics.py rule), torch.library.opcheck (schema, fake kernel,
autograd registration), gradcheck of the autograd formula, torch.compile(fullgraph=True) tracing,
the autocast policy, and the eager bypass that never imports torch._dynamo.

Adding an op: its folder's spec.py (segevol_fast/ops/<op>/spec.py) is picked up here by itself.
Op-specific checks (equivalences, error messages, regressions) stay in tests/ops/test_<op>.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from segevol_fast import _native, ops
from segevol_fast.ops import _backend, _op
from segevol_fast.ops._spec import OpSpec, all_specs, cast_floats
from tests.numerics import assert_matches_reference

# The Triton interpreter computes bf16 silently wrong: never test bf16 there.
DTYPES = {
    "ref": [torch.float32, torch.float16, torch.bfloat16],
    "native": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
    "triton": [torch.float32, torch.float16],
}

SPECS = all_specs()  # one per registered op: segevol_fast/ops/<op>/spec.py


# ---------------------------------------------------------------------------- helpers
def _device_for(backend: str) -> str:
    # native CUDA kernels have their own GPU tests (tests/ops/test_<op>.py, marked gpu)
    return "cuda" if torch.cuda.is_available() and backend == "triton" else "cpu"


def _require(spec: OpSpec, backend: str, device: str) -> None:
    reason = _backend._REGISTRY[spec.name][backend].why_not(device)
    if reason is not None:
        pytest.skip(f"{spec.name}: {backend} unavailable on {device}: {reason}")


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values, reversed memory order and every other element of a twice-as-wide buffer."""
    if t.dim() == 0:
        return t
    wide = (*t.shape[:-1], 2 * t.shape[-1])
    rev = list(reversed(range(t.dim())))
    buf = torch.empty([wide[i] for i in rev], dtype=t.dtype, device=t.device).permute(rev)
    view = buf[..., ::2]
    view.copy_(t)
    assert not view.is_contiguous() or t.numel() <= 1
    return view


def _as_tuple(result) -> tuple:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def _layout(args, layout: str):
    if layout == "contiguous":
        return args
    return tuple(_non_contiguous(a) if isinstance(a, torch.Tensor) else a for a in args)


def _with_grad(spec: OpSpec, args):
    return tuple(
        a.detach().requires_grad_() if i in spec.grad_args and a is not None else a for i, a in enumerate(args)
    )


def _backend_dtype_params():
    for spec in SPECS:
        for backend in spec.backends:
            if backend == "ref":
                continue  # the ref backend *is* the same-dtype reference: that check could not fail
            for dtype in DTYPES[backend]:
                yield pytest.param(spec, backend, dtype, id=f"{spec.name}-{backend}-{str(dtype)[6:]}")


def _spec_backend_params(backends=("ref", "native", "triton")):
    return [pytest.param(s, b, id=f"{s.name}-{b}") for s in SPECS for b in s.backends if b in backends]


_SPEC_IDS = [pytest.param(s, id=s.name) for s in SPECS]


# ---------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("layout", ["contiguous", "non_contiguous"])
@pytest.mark.parametrize("case_index", range(max(len(s.cases) for s in SPECS)))
@pytest.mark.parametrize("spec,backend,dtype", list(_backend_dtype_params()))
def test_backend_matches_float64_reference(spec, backend, dtype, case_index, layout):
    if case_index >= len(spec.cases):
        pytest.skip(f"{spec.name} has {len(spec.cases)} cases")
    device = _device_for(backend)
    _require(spec, backend, device)
    exact_args = spec.make_args(spec.cases[case_index], device)
    cast = cast_floats(exact_args, dtype)
    with ops.use_backend(backend):
        out = spec.fn(*_layout(cast, layout))
    same_dtype = spec.ref(*cast)
    exact = spec.ref(*exact_args)
    assert_matches_reference(out, same_dtype, exact, f"{spec.name} {backend} {dtype} {layout}")


# ---------------------------------------------------------------------------- registration
@pytest.mark.parametrize("spec", _SPEC_IDS)
def test_registered_as_custom_op_and_native_op(spec):
    assert hasattr(torch.ops.segevol_fast, spec.name)
    assert spec.name in ops.registered_ops()
    assert spec.op.custom_op is not None
    if "native" in spec.backends and spec.native_in_csrc and os.environ.get("SEGEVOL_FAST_REQUIRE_NATIVE") == "1":
        # the native op comes from csrc/op_list.h: a listed op is both compiled and reported
        assert spec.name in _native.native_ops()
        assert hasattr(torch.ops.segevol_fast_C, spec.name)


@pytest.mark.parametrize("spec,backend", _spec_backend_params())
def test_opcheck(spec, backend):
    _require(spec, backend, "cpu")
    dtype = torch.float64 if torch.float64 in DTYPES[backend] else torch.float32
    args = _with_grad(spec, cast_floats(spec.make_args(spec.tiny_case, "cpu"), dtype))
    with ops.use_backend(backend):
        torch.library.opcheck(getattr(torch.ops.segevol_fast, spec.name).default, args)


@pytest.mark.parametrize("spec,backend", _spec_backend_params(("ref", "native")))
def test_gradcheck(spec, backend):
    # The autograd formula is the op's own (not autograd through the reference), whatever the
    # forward backend: check it against finite differences in float64.
    _require(spec, backend, "cpu")
    args = spec.make_args(spec.tiny_case, "cpu")
    inputs = tuple(args[i].detach().requires_grad_() for i in spec.grad_args if args[i] is not None)
    slots = [i for i in spec.grad_args if args[i] is not None]

    def call(*grad_inputs):
        full = list(args)
        for i, t in zip(slots, grad_inputs):
            full[i] = t
        return spec.fn(*full)

    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(call, inputs)


@pytest.mark.parametrize("spec", _SPEC_IDS)
def test_torch_compile_traces_forward_and_backward(spec):
    args = _with_grad(spec, cast_floats(spec.make_args(spec.cases[0], "cpu"), torch.float32))

    def f(*a):
        return torch.relu(spec.fn(*a)).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(*args)
    want = f(*args)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got, [args[i] for i in spec.grad_args])
    ref_grads = torch.autograd.grad(want, [args[i] for i in spec.grad_args])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


# ---------------------------------------------------------------------------- policies
@pytest.mark.parametrize("spec,backend", _spec_backend_params(("ref", "native")))
def test_autocast_does_not_change_the_op_precision(spec, backend):
    # The op owns its precision: inside torch.autocast it still computes in its inputs' dtype.
    _require(spec, backend, "cpu")
    args = cast_floats(spec.make_args(spec.cases[0], "cpu"), torch.float32)
    with ops.use_backend(backend):
        plain = spec.fn(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = spec.fn(*args)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", _SPEC_IDS)
def test_eager_inference_never_imports_dynamo(spec):
    # torch.library.custom_op imports torch._dynamo (~200 MB resident) on its first call; an
    # inference process that never compiles must not pay that (it is a tenth of a 2 GB budget)
    code = (
        "import sys, torch\n"
        "from segevol_fast.ops._spec import spec\n"
        f"spec = spec({spec.name!r})\n"
        "fp = lambda a: isinstance(a, torch.Tensor) and a.is_floating_point()\n"
        "args = tuple(a.float() if fp(a) else a for a in spec.make_args(spec.cases[0], 'cpu'))\n"
        "with torch.inference_mode():\n"
        "    spec.fn(*args)\n"
        "with torch.no_grad():\n"
        "    spec.fn(*(torch.nn.Parameter(a) if fp(a) else a for a in args))\n"
        "spec.fn(*args)\n"
        "print('dynamo' if 'torch._dynamo' in sys.modules else 'clean')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip().splitlines()[-1] == "clean"


@pytest.mark.parametrize("spec", _SPEC_IDS)
def test_eager_bypass_equals_the_custom_op_and_autograd_goes_through_it(spec, monkeypatch):
    args = cast_floats(spec.make_args(spec.cases[0], "cpu"), torch.float32)
    # The scaffold's Op returns what the custom op returns (one tensor or a tuple: flash_attention
    # gives (out, lse)); the public function may return a part of it.
    direct = _as_tuple(spec.op(*args))
    via_op = _as_tuple(getattr(torch.ops.segevol_fast, spec.name)(*args))
    assert len(direct) == len(via_op) and all(torch.equal(a, b) for a, b in zip(direct, via_op))
    assert torch.equal(spec.fn(*args), direct[0])

    calls = []
    real = spec.op.custom_op
    monkeypatch.setattr(spec.op, "custom_op", lambda *a: calls.append(a) or real(*a))
    spec.fn(*_with_grad(spec, args))  # autograd to record: through the op
    assert len(calls) == 1
    with torch.no_grad():
        spec.fn(*_with_grad(spec, args))  # nothing to record: direct
    assert len(calls) == 1


# ---------------------------------------------------------------------------- CUDA device guard
def test_device_guard_makes_the_tensors_cuda_device_current():
    # Constructing the guard needs no GPU; entering it does (covered by the gpu test below).
    guard = _op.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(_op.device_guard(torch.device("cpu")), torch.cuda.device)


@pytest.mark.gpu
@pytest.mark.parametrize("spec,backend", _spec_backend_params(("native", "triton")))
def test_runs_on_a_non_current_cuda_device(spec, backend):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    _require(spec, backend, "cuda")
    exact_args = spec.make_args(spec.cases[0], "cuda:1")
    cast = cast_floats(exact_args, torch.float32)
    with torch.cuda.device(0), ops.use_backend(backend):
        out = spec.fn(*cast)
    assert out.device == torch.device("cuda", 1)
    assert_matches_reference(out, spec.ref(*cast), spec.ref(*exact_args), f"{spec.name} {backend} cuda:1")
