"""The contract every op keeps (../shared/DESIGN.md "Ops"), run once per entry of SPECS.

For each op: every available backend x dtype x odd shapes x (non-)contiguous inputs against the
op's reference in float64 (tests/numerics.py rule), torch.library.opcheck (schema, fake kernel,
autograd registration), gradcheck of the autograd formula, torch.compile(fullgraph=True) tracing,
the autocast policy, and the eager bypass that never imports torch._dynamo.

Adding an op: append an `OpSpec` to SPECS. Op-specific checks (equivalences, error messages,
regressions) stay in tests/ops/test_<op>.py.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from segevol_fast import _native, ops
from segevol_fast.ops import _backend, _op
from tests.numerics import assert_matches_reference

# The Triton interpreter computes bf16 silently wrong: never test bf16 there.
_ALL_DTYPES = {
    "ref": [torch.float32, torch.float16, torch.bfloat16],
    "native": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
    "triton": [torch.float32, torch.float16],
}


@dataclass(frozen=True)
class OpSpec:
    """What the contract needs to know about one op.

    make_args(case, device) returns the op's schema-ordered positional arguments with every
    floating tensor in float64; the tests cast them. The public entry point, the reference and
    `torch.ops.segevol_fast.<name>` all accept these arguments positionally.
    """

    name: str
    module: str                      # where the public op lives (its `_OP` is the scaffold's Op)
    cases: list                      # odd shapes: not multiples of any block size
    make_args: Callable[[object, str], tuple]
    grad_args: tuple[int, ...]       # positions of differentiable tensor arguments
    tiny_case: object                # small enough for gradcheck in float64
    backends: tuple[str, ...] = ("ref", "native", "triton")
    dtypes: dict = field(default_factory=lambda: _ALL_DTYPES)
    native_in_C: bool = True         # False: "native" is PyTorch's own CPU kernel (define_op native_cpu=)

    @property
    def op(self) -> Callable:
        return getattr(ops, self.name)

    @property
    def ref(self) -> Callable:
        return getattr(ops, f"{self.name}_ref")

    @property
    def op_def(self) -> _op.Op:
        return importlib.import_module(self.module)._OP


# ---------------------------------------------------------------------------- op specs
def _patch_embed_args(case, device):
    shape, patch, E = case
    B, C, D, H, W = shape
    N = (D // patch[0]) * (H // patch[1]) * (W // patch[2])
    K = patch[0] * patch[1] * patch[2] * C
    f64 = dict(device=device, dtype=torch.float64)
    x = torch.randn(shape, **f64)
    w = torch.randn(E, K, **f64) / K**0.5
    return (x, w, torch.randn(E, **f64), torch.randn(1, N, E, **f64), list(patch), 0.37, -1.25)


def _flash_attention_args(case, device):
    (B, H, Sq, Sk, D), scale, kv = case
    f64 = dict(device=device, dtype=torch.float64)
    q, k, v = (torch.randn(B, H, S, D, **f64) for S in (Sq, Sk, Sk))
    kv_len = None if kv is None else torch.tensor(kv, device=device)
    return (q, k, v, scale, kv_len)


def _lora_linear_args(case, device):
    lead, K, N, r, out_slice = case
    f64 = dict(device=device, dtype=torch.float64)
    n = N if out_slice is None else out_slice[1] - out_slice[0]
    x = torch.randn(*lead, K, **f64)
    w = torch.randn(N, K, **f64) / K**0.5
    a = torch.randn(r, K, **f64) / K**0.5
    b = torch.randn(n, r, **f64) / r**0.5
    return (x, w, torch.randn(N, **f64), a, b, 0.7, list(out_slice or (0, N)))


SPECS = [
    OpSpec(
        name="patch_embed",
        module="segevol_fast.ops.patch_embed.op",
        # (B, C, D, H, W), patch, E: a remainder on every axis, batch 3, C > 1, E not a block size
        # and one volume that is exactly one patch (no remainder, N = 1)
        cases=[((3, 1, 9, 35, 33), (4, 16, 16), 48), ((2, 2, 8, 20, 18), (2, 4, 3), 20), ((1, 1, 4, 16, 16), (4, 16, 16), 16)],
        make_args=_patch_embed_args,
        grad_args=(0, 1, 2, 3),
        tiny_case=((2, 2, 5, 6, 7), (2, 3, 2), 6),
    ),
    OpSpec(
        name="flash_attention",
        module="segevol_fast.ops.flash_attention.op",
        # ((B, H, Sq, Sk, D), scale, kv_len per row): tails of every 16-block, Sq < Sk and Sq > Sk,
        # one query, a row with no valid key (0) and one longer than Sk (clamped)
        cases=[((2, 3, 19, 37, 24), 0.3, [37, 5]), ((1, 2, 33, 17, 64), None, None),
               ((2, 1, 1, 40, 32), None, [0, 50])],
        make_args=_flash_attention_args,
        grad_args=(0, 1, 2),
        tiny_case=((2, 1, 3, 5, 4), None, [5, 2]),
        native_in_C=False,
    ),
]
SPECS.append(
    OpSpec(
        name="lora_linear",
        module="segevol_fast.ops.lora_linear.op",
        # ((leading dims), K, N, r, out_slice): odd K/N/rows, ranks 2/5/16 (rank 1 in test_lora_linear:
        # a (n, 1) B cannot be made non-contiguous), a middle slice
        # (the v third of a qkv-like output) and the whole output; W is frozen (not a grad arg)
        cases=[((2, 19), 37, 45, 5, (30, 45)), ((33,), 20, 18, 2, None), ((3, 2, 7), 24, 51, 16, (17, 34))],
        make_args=_lora_linear_args,
        grad_args=(0, 2, 3, 4),
        tiny_case=((2, 3), 5, 7, 2, (2, 6)),
        native_in_C=False,
    )
)
def _routed_lora_linear_args(case, device):
    lengths, K, N, r, E, routing = case
    f64 = dict(device=device, dtype=torch.float64)
    M = sum(lengths)
    segments = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    x = torch.randn(M, K, **f64)
    w = torch.randn(N, K, **f64) / K**0.5
    a = torch.randn(E, r, K, **f64) / K**0.5
    b = torch.randn(E, N, r, **f64) / r**0.5
    if routing == "soft":
        idx, gates = None, torch.softmax(torch.randn(len(lengths), E, **f64), -1)
    else:
        idx, gates = torch.tensor(routing, device=device), None
    return (x, w, torch.randn(N, **f64), a, b, segments, idx, gates, 0.7)


SPECS.append(
    OpSpec(
        name="routed_lora_linear",
        module="segevol_fast.ops.routed_lora_linear.op",
        # (segment lengths, K, N, r, E, "soft" or adapter per segment): soft mixtures (the first
        # case and tiny_case, so gates are a grad arg everywhere) and hard routing with a base-only
        # (-1) and an empty segment; odd K/N/rows
        cases=[((7, 0, 12), 37, 45, 5, 3, "soft"), ((5, 9, 0, 4), 20, 18, 2, 3, [2, -1, 0, 2]),
               ((33,), 24, 51, 16, 2, [1])],
        make_args=_routed_lora_linear_args,
        grad_args=(0, 2, 3, 4, 7),
        tiny_case=((2, 0, 3), 5, 7, 2, 3, "soft"),
        native_in_C=False,
    )
)

SPEC_BY_NAME = {s.name: s for s in SPECS}


# ---------------------------------------------------------------------------- helpers
def _device_for(backend: str) -> str:
    # native CUDA kernels have their own GPU tests (tests/ops/test_<op>.py, marked gpu)
    return "cuda" if torch.cuda.is_available() and backend == "triton" else "cpu"


def _require(spec: OpSpec, backend: str, device: str) -> None:
    reason = _backend._REGISTRY[spec.name][backend].why_not(device)
    if reason is not None:
        pytest.skip(f"{spec.name}: {backend} unavailable on {device}: {reason}")


def _cast(args, dtype):
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


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
            for dtype in spec.dtypes[backend]:
                yield pytest.param(spec, backend, dtype, id=f"{spec.name}-{backend}-{str(dtype)[6:]}")


def _spec_backend_params(backends=("ref", "native", "triton")):
    return [
        pytest.param(s, b, id=f"{s.name}-{b}") for s in SPECS for b in s.backends if b in backends
    ]


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
    cast = _cast(exact_args, dtype)
    with ops.use_backend(backend):
        out = spec.op(*_layout(cast, layout))
    same_dtype = spec.ref(*cast)
    exact = spec.ref(*exact_args)
    assert_matches_reference(out, same_dtype, exact, f"{spec.name} {backend} {dtype} {layout}")


# ---------------------------------------------------------------------------- registration
@pytest.mark.parametrize("spec", _SPEC_IDS)
def test_registered_as_custom_op_and_native_op(spec):
    assert hasattr(torch.ops.segevol_fast, spec.name)
    assert spec.name in ops.registered_ops()
    assert spec.op_def.custom_op is not None
    if "native" in spec.backends and spec.native_in_C and os.environ.get("SEGEVOL_FAST_REQUIRE_NATIVE") == "1":
        # the native op comes from csrc/op_list.h: a listed op is both compiled and reported
        assert spec.name in _native.native_ops()
        assert hasattr(torch.ops.segevol_fast_C, spec.name)


@pytest.mark.parametrize("spec,backend", _spec_backend_params())
def test_opcheck(spec, backend):
    _require(spec, backend, "cpu")
    dtype = torch.float64 if torch.float64 in spec.dtypes[backend] else torch.float32
    args = _with_grad(spec, _cast(spec.make_args(spec.tiny_case, "cpu"), dtype))
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
        return spec.op(*full)

    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(call, inputs)


@pytest.mark.parametrize("spec", _SPEC_IDS)
def test_torch_compile_traces_forward_and_backward(spec):
    args = _with_grad(spec, _cast(spec.make_args(spec.cases[0], "cpu"), torch.float32))

    def f(*a):
        return torch.relu(spec.op(*a)).sum()

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
    args = _cast(spec.make_args(spec.cases[0], "cpu"), torch.float32)
    with ops.use_backend(backend):
        plain = spec.op(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = spec.op(*args)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", _SPEC_IDS)
def test_eager_inference_never_imports_dynamo(spec):
    # torch.library.custom_op imports torch._dynamo (~200 MB resident) on its first call; an
    # inference process that never compiles must not pay that (it is a tenth of a 2 GB budget)
    code = (
        "import sys, torch\n"
        "from tests.ops.test_op_contract import SPEC_BY_NAME\n"
        f"spec = SPEC_BY_NAME[{spec.name!r}]\n"
        "fp = lambda a: isinstance(a, torch.Tensor) and a.is_floating_point()\n"
        "args = tuple(a.float() if fp(a) else a for a in spec.make_args(spec.cases[0], 'cpu'))\n"
        "with torch.inference_mode():\n"
        "    spec.op(*args)\n"
        "with torch.no_grad():\n"
        "    spec.op(*(torch.nn.Parameter(a) if fp(a) else a for a in args))\n"
        "spec.op(*args)\n"
        "print('dynamo' if 'torch._dynamo' in sys.modules else 'clean')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip().splitlines()[-1] == "clean"


@pytest.mark.parametrize("spec", _SPEC_IDS)
def test_eager_bypass_equals_the_custom_op_and_autograd_goes_through_it(spec, monkeypatch):
    args = _cast(spec.make_args(spec.cases[0], "cpu"), torch.float32)
    # The scaffold's Op returns what the custom op returns (one tensor or a tuple: flash_attention
    # gives (out, lse)); the public function may return a part of it.
    direct = _as_tuple(spec.op_def(*args))
    via_op = _as_tuple(getattr(torch.ops.segevol_fast, spec.name)(*args))
    assert len(direct) == len(via_op) and all(torch.equal(a, b) for a, b in zip(direct, via_op))
    assert torch.equal(spec.op(*args), direct[0])

    calls = []
    real = spec.op_def.custom_op
    monkeypatch.setattr(spec.op_def, "custom_op", lambda *a: calls.append(a) or real(*a))
    spec.op(*_with_grad(spec, args))  # autograd to record: through the op
    assert len(calls) == 1
    with torch.no_grad():
        spec.op(*_with_grad(spec, args))  # nothing to record: direct
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
    cast = _cast(exact_args, torch.float32)
    with torch.cuda.device(0), ops.use_backend(backend):
        out = spec.op(*cast)
    assert out.device == torch.device("cuda", 1)
    assert_matches_reference(out, spec.ref(*cast), spec.ref(*exact_args), f"{spec.name} {backend} cuda:1")
