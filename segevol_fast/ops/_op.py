"""The scaffold every op stands on: backends, torch custom op, fake, autograd, autocast, eager bypass.

`define_op(...)` turns an op's pieces into one callable `Op`. Calling it runs the backend that
`_backend.select` picks for the device of the op's first tensor argument, either directly (plain
eager inference, see `plain_eager_call`) or through the registered custom op
`torch.ops.segevol_fast.<name>` (autograd, tracing, torch.compile). Either way the backend runs

  * with autocast disabled: every backend computes in its inputs' dtype (fp32 accumulation for
    16-bit inputs), so backends agree with each other inside `torch.autocast` too; callers who
    want bf16 pass bf16 tensors;
  * under a CUDA device guard for CUDA tensors: Triton launches on the *current* device, so a
    tensor on cuda:1 must make cuda:1 current (the native CUDA kernels guard themselves as well).

Adding an op `foo` (the folder layout is in ops/README.md, the recipe in docs/ops.md; each step below is
a few lines of ops/foo/op.py, and `patch_embed/op.py` is the worked example):

  1. `foo_ref(...)`: plain PyTorch, readable, the definition of correct. Its positional
     arguments are the op's schema arguments, in order.
  2. Backend functions with those same positional arguments (only the ones that exist):
     `_native(*args)` calls `torch.ops.segevol_fast_C.foo(*args)`; `_triton(*args)` imports its
     kernel module (ops/foo/triton_kernel.py) lazily (Triton is optional) and launches it. Arguments arrive validated.
     Where PyTorch itself already ships the best compiled CPU kernel (attention: ATen's fused
     SDPA), pass a Python function calling it as `native_cpu=` instead of writing C++: it is the
     op's "native" backend on CPU tensors (no _C kernel, no step 6); CUDA tensors then go to
     Triton, else ref.
  3. `_fake(*args)`: empty output(s) of the right shape, dtype and device (`x.new_empty(...)`),
     for torch.compile and opcheck; no data is read. An op with several outputs (schema
     "-> (Tensor, Tensor)") returns a tuple from every backend and the fake, and so does its `Op`;
     the public function returns what callers need (flash_attention: out of (out, lse)).
  4. Autograd, if training needs it: `_setup_context(ctx, inputs, output)` saves what the
     backward needs (outputs too, e.g. statistics a fused backward reuses; mark those that are not
     differentiable with `ctx.mark_non_differentiable`); `_backward(ctx, *grads)` gets one grad
     per output and returns one gradient per schema argument (None for non-tensors and inputs
     that need none, see `ctx.needs_input_grad`).
  5. One registration call at module level:

         _FOO = define_op(
             "foo", "(Tensor x, Tensor w, float s) -> Tensor",
             ref=foo_ref, native=_native, triton=_triton, fake=_fake,
             setup_context=_setup_context, backward=_backward,
         )

     and the public `foo(...)`: validate the arguments with typed errors
     (`segevol_fast.errors.ShapeError`), normalise them to the schema's types (list[int] for
     int[], float for float) and `return _FOO(*args)`. Export both from ops/foo/__init__.py and
     import them in ops/__init__.py (that import line is the op's registration).
  6. Native kernels: one line `X(foo, "(Tensor x, ...) -> Tensor")` in csrc/op_list.h (the same
     schema string) and a folder csrc/foo/ with cpu/*.cpp and cuda/*.cu + cuda/*_cuda.cpp, each
     ending in `TORCH_LIBRARY_IMPL(segevol_fast_C, CPU|CUDA, m) { m.impl("foo", ...); }`.
  7. ops/foo/spec.py: `SPEC = OpSpec(...)` (see `_spec`): odd-shaped cases and an argument
     maker, from which tests/ops/test_op_contract.py runs every backend x dtype x odd shapes x
     non-contiguous inputs against the float64 reference, opcheck, gradcheck, torch.compile and
     the eager bypass; and the benchmark workloads (baselines, FLOP/byte model) that
     bench/bench_ops.py and bench/gpu_suite.py time. Op-specific cases go in tests/ops/test_foo.py.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
import torch.utils._python_dispatch as _python_dispatch

from .. import _native
from . import _backend

NAMESPACE = "segevol_fast"

# Types the eager bypass accepts as plain data; any other Tensor subclass (FakeTensor, DTensor,
# a functional tensor, ...) carries semantics that only the dispatcher honours.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` current while a backend runs, when it is a CUDA device (Triton launches on
    the current device, not on its tensors' device); a no-op elsewhere."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def plain_eager_call(args: tuple) -> bool:
    """True when the custom-op dispatcher would add nothing: no autograd to record (grad mode off
    or no tensor argument requiring grad) and nothing tracing (not compiling, no dispatch mode,
    plain tensors or Parameters only). Then the op calls its backend function directly.

    Why bother: `torch.library.custom_op` wraps the kernel in `torch._dynamo.disable`, which
    imports torch._dynamo (sympy, inductor, torch.distributed, ...) on the first call: about 200 MB
    of resident memory in an inference process that never compiles, a tenth of a 2 GB budget.
    `torch.utils._python_dispatch` is private, but it is where torch keeps the mode stack and it
    is cheap to import; a public equivalent would need torch._dynamo again.
    """
    if torch.compiler.is_compiling() or _python_dispatch._get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    return all(type(a) in _PLAIN and not (grad and a.requires_grad) for a in args if isinstance(a, torch.Tensor))


class Op:
    """One op: its backends, its torch custom op and the entry point that picks between them."""

    def __init__(self, name: str, ref: Callable, custom_op: Any):
        self.name = name
        self.ref = ref
        self.custom_op = custom_op  # torch.library.CustomOpDef; tests may swap it for a recorder

    def device_of(self, args: tuple) -> torch.device:
        """The device that chooses the backend: the first tensor argument's."""
        for a in args:
            if isinstance(a, torch.Tensor):
                return a.device
        raise TypeError(f"op {self.name!r} was called without a tensor argument")

    def run_backend(self, *args):
        """Run the selected backend on schema-ordered arguments, with autocast off and the
        arguments' CUDA device current."""
        device = self.device_of(args)
        impl = _backend.implementation(self.name, device.type)
        with torch.autocast(device_type=device.type, enabled=False), device_guard(device):
            return impl(*args)

    def __call__(self, *args):
        if plain_eager_call(args):
            return self.run_backend(*args)
        return self.custom_op(*args)


def _why_not_native_for(name: str) -> Callable[[str], Optional[str]]:
    def why_not(device_type: str) -> Optional[str]:
        reason = _backend.why_not_native(device_type)
        if reason is None and name not in _native.native_ops():
            return f"segevol_fast._C has no op {name!r} (it was built from older sources). {_native.build_hint()}"
        return reason

    return why_not


def _cpu_only(name: str) -> Callable[[str], Optional[str]]:
    def why_not(device_type: str) -> Optional[str]:
        if device_type == "cpu":
            return None
        return (
            f"op {name!r} has a native backend for CPU tensors only (PyTorch's own kernel); "
            f"on {device_type} use the triton or ref backend"
        )

    return why_not


def define_op(
    name: str,
    schema: str,
    *,
    ref: Callable,
    fake: Callable,
    native: Optional[Callable] = None,
    triton: Optional[Callable] = None,
    native_cpu: Optional[Callable] = None,
    setup_context: Optional[Callable] = None,
    backward: Optional[Callable] = None,
) -> Op:
    """Register `name`'s backends and the custom op `torch.ops.segevol_fast.<name>`.

    Args:
        name: op name; also the native op's name in csrc/op_list.h.
        schema: "(args) -> returns" in torch's schema language, e.g.
            "(Tensor x, Tensor? bias, int[] size, float scale) -> Tensor". Every backend, `ref`
            and `fake` take these arguments positionally, in this order.
        ref: the plain-PyTorch definition; always available.
        fake: shapes/dtypes of the outputs without computing them (torch.compile, opcheck).
        native: calls torch.ops.segevol_fast_C.<name>; available when _C is built with it
            (and with CUDA kernels, for CUDA tensors).
        triton: launches the Triton kernel; available where Triton runs (CUDA, or CPU under
            TRITON_INTERPRET=1).
        native_cpu: instead of `native`, a Python function into a compiled PyTorch kernel that
            serves as the "native" backend for CPU tensors only; always available there.
        setup_context, backward: the autograd formula (both or neither), as in
            `torch.library.register_autograd`.
    """
    if (setup_context is None) != (backward is None):
        raise ValueError(f"op {name!r}: give both setup_context and backward, or neither")
    if native is not None and native_cpu is not None:
        raise ValueError(f"op {name!r}: give native (a _C kernel) or native_cpu (a PyTorch one), not both")
    _backend.register(name, "ref", ref, _backend.always)
    if native is not None:
        _backend.register(name, "native", native, _why_not_native_for(name))
    if native_cpu is not None:
        _backend.register(name, "native", native_cpu, _cpu_only(name))
    if triton is not None:
        _backend.register(name, "triton", triton, _backend.why_not_triton)

    op: Op = Op(name, ref, None)
    # The custom op's kernel is the same backend dispatch the eager bypass runs.
    custom = torch.library.custom_op(f"{NAMESPACE}::{name}", op.run_backend, mutates_args=(), schema=schema)
    custom.register_fake(fake)
    if backward is not None:
        custom.register_autograd(backward, setup_context=setup_context)
    op.custom_op = custom
    return op
