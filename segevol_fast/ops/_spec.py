"""What tests and benchmarks know about an op, kept in the op's folder (ops/<op>/spec.py).

An `OpSpec` has two halves:

  * the contract (tests/ops/test_op_contract.py): odd-shaped `cases`, an argument maker giving the
    schema-ordered arguments in float64, which arguments are differentiable, and a case small
    enough for gradcheck;
  * the benchmark (bench/harness.py on the CPU, bench/gpu_suite.py on CUDA): `workloads(...)`
    yields the measured cases, each with its cost model (FLOPs, compulsory bytes) and its
    providers: the baselines and the op on each backend, every one paired with the answer it is
    checked against.

`all_specs()` finds the spec of every registered op, so an op's folder and its import line in
ops/__init__.py are all the test and benchmark drivers need. Specs are imported by those drivers
only, never by `import segevol_fast`.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from . import _backend
from ._op import Op

# Workload sizes: "gpu" the CUDA suite's, "cpu" the CPU benchmark's (a SegVol window where it
# fits), "tiny" a few kilobytes, for running every provider in tests on the CPU.
SIZES = ("gpu", "cpu", "tiny")


class Expected:
    """The answer a provider is checked against: the op's reference on the workload's inputs in
    their own dtype (`same`) and in float64 (`exact`), each computed once, on first use.

    `reference(dtype)` computes it with every floating input cast to `dtype` (None: as they are).
    """

    def __init__(self, reference: Callable[[Optional[torch.dtype]], Tensor]):
        self._reference = reference

    @functools.cached_property
    def same(self) -> Tensor:
        return self._reference(None)

    @functools.cached_property
    def exact(self) -> Tensor:
        return self._reference(torch.float64)


@dataclass(frozen=True)
class Provider:
    """One way to compute a workload: a zero-argument callable returning the output, and what that
    output must match (None: a floor that computes something else, such as the base GEMM alone;
    timed, not checked)."""

    fn: Callable[[], Tensor]
    expected: Optional[Expected]


@dataclass
class Workload:
    """One measured case. `row` says what it is in a result row (shape, dtype and the op's own
    keys: passes, kv_len, rank, ...); `flops` and `min_bytes` are the cost model (the work of the
    op's GEMMs, the traffic of a fully fused kernel) that rates become TFLOP/s, GB/s and % of peak
    from; `rounds` is how often the CPU benchmark times it."""

    row: dict
    flops: float
    min_bytes: float
    providers: dict[str, Provider]
    rounds: int = 10


@dataclass(frozen=True)
class OpSpec:
    """Everything the contract test and the benchmarks need to know about one op.

    make_args(case, device) returns the op's schema-ordered positional arguments with every
    floating tensor in float64 (the tests cast them); the public function, the reference and
    `torch.ops.segevol_fast.<name>` all accept them positionally.

    workloads(device, size, dtypes, backends) yields the benchmark's `Workload`s at `size` (one of
    SIZES) for each dtype, with the op's providers for `backends`.
    """

    name: str
    fn: Callable  # the public entry point, ops.<name>
    ref: Callable  # ops.<name>_ref
    op: Op  # the scaffold's Op: backends and the custom op
    cases: Sequence[Any]  # odd shapes: not multiples of any block size
    make_args: Callable[[Any, str], tuple]
    grad_args: tuple[int, ...]  # positions of differentiable tensor arguments
    tiny_case: Any  # small enough for gradcheck in float64
    workloads: Callable[[str, str, Sequence[torch.dtype], Sequence[str]], Iterator[Workload]]
    baseline: str  # the provider the suite's ratios compare with
    speedup: bool = True  # ratio as baseline time / time (else time / baseline time)
    native_in_csrc: bool = False  # "native" is a kernel of csrc/<name>/ (else PyTorch's own)
    cpu_threads: Optional[int] = None  # threads for the CPU benchmark (None: torch's default)
    backends: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "backends", tuple(_backend.implemented_backends(self.name)))


def all_specs() -> list[OpSpec]:
    """The spec of every registered op (ops/<name>/spec.py's SPEC), in name order."""
    return [importlib.import_module(f"{__package__}.{name}.spec").SPEC for name in _backend.registered_ops()]


def spec(name: str) -> OpSpec:
    """The spec of op `name` (ops/<name>/spec.py's SPEC)."""
    return importlib.import_module(f"{__package__}.{name}.spec").SPEC


def cast_floats(args: Sequence, dtype: Optional[torch.dtype]) -> tuple:
    """args with every floating tensor cast to dtype (None: unchanged)."""
    if dtype is None:
        return tuple(args)
    return tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def seeded(dtype: torch.dtype, device: str, seed: int = 0) -> Callable[..., Tensor]:
    """A maker of standard-normal tensors, reproducible across devices (drawn on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
