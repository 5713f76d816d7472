"""Shared benchmark harness: the ops' workloads, the backends timed and the accuracy check.

Every op's workloads, baselines and cost model live in its spec (segevol_fast/ops/<op>/spec.py,
see segevol_fast/ops/_spec.py); the drivers only iterate them: bench/bench_ops.py times them on the
CPU through pytest-benchmark (`make bench`), bench/gpu_suite.py checks and times them on CUDA. So
the baselines never drift between the two, and a new op is benchmarked as soon as it has a spec.
"""

from __future__ import annotations

import torch

from segevol_fast.ops import available_backends


def cpu_backends(op: str) -> list[str]:
    """The op's backends the CPU benchmark times: every available one but Triton (the interpreter
    is a test tool, not a kernel)."""
    return [b for b in available_backends(op, "cpu") if b != "triton"]


def suite_backends(op: str, device: str) -> list[str]:
    """The op's backends the GPU suite checks and times: every available one but the reference
    (on a CPU, where tests run the suite, that includes Triton through its interpreter)."""
    return [b for b in available_backends(op, torch.device(device).type) if b != "ref"]


def check(out: torch.Tensor, same: torch.Tensor, exact: torch.Tensor) -> tuple[bool, float, float]:
    """The tests' 2x rule: max|out - exact| <= 2 * max|same - exact| + floor * max|exact|, with
    `same` the reference in out's dtype and `exact` in float64; (passes, error, reference's error)."""
    err = (out.double() - exact).abs().max().item()
    ref_err = (same.double() - exact).abs().max().item()
    floor = (2e-3 if out.dtype == torch.float32 else 1e-2) * exact.abs().max().item()
    return err <= 2 * ref_err + floor, err, ref_err
