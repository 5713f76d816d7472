"""CPU timings of every op with pytest-benchmark: `make bench`.

One benchmark per op x workload x provider, all taken from the op's spec (segevol_fast/ops/<op>/
spec.py, "cpu" size: a SegVol window where it fits, float32): the op on its CPU backends next to
the baselines it replaces, each provider checked against the op's reference in the same dtype.
Ops whose spec asks for it (attention) run on one thread, so the figure is the kernels', not the
core count's.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.harness import cpu_backends
from segevol_fast.ops._spec import all_specs, spec


@functools.lru_cache(maxsize=None)
def _workloads(op: str) -> list:
    return list(spec(op).workloads("cpu", "cpu", (torch.float32,), cpu_backends(op)))


def _params():
    for s in all_specs():
        for i, w in enumerate(_workloads(s.name)):
            for provider in w.providers:
                yield pytest.param(s.name, i, provider, id=f"{s.name}-{_label(w.row)}-{provider}")


def _label(row: dict) -> str:
    """ "shape=[1,12,2048,2048,64],dtype=float32,passes=forward": the row as one test-id word."""
    return ",".join(f"{k}={v}".replace(" ", "").replace("torch.", "") for k, v in row.items() if v is not None)


@pytest.fixture
def threads(request):
    old = torch.get_num_threads()
    yield lambda n: torch.set_num_threads(n or old)
    torch.set_num_threads(old)


@pytest.mark.parametrize("op,index,provider", list(_params()))
def test_op(benchmark, threads, op, index, provider):
    s, w = spec(op), _workloads(op)[index]
    p = w.providers[provider]
    threads(s.cpu_threads)
    benchmark.group = f"{op} {_label(w.row)} cpu" + (f" {s.cpu_threads} thread(s)" if s.cpu_threads else "")
    benchmark.extra_info.update(gflop=w.flops / 1e9, **w.row)
    out = benchmark.pedantic(p.fn, rounds=w.rounds, iterations=1, warmup_rounds=max(1, w.rounds // 5))
    if p.expected is not None:
        torch.testing.assert_close(out, p.expected.same, rtol=1e-4, atol=1e-3)
