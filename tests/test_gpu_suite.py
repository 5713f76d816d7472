"""bench/gpu_suite.py runs only on a CUDA machine, where a broken provider or case builder would
cost a scarce GPU session. Here every op's suite runs on the CPU at tiny sizes with timing off:
each provider must execute and every checked one pass the 2x rule against float64 (Triton backends
run in the interpreter; fp32/fp16 only, since bf16 is wrong there)."""

from __future__ import annotations

import pytest
import torch

from bench import gpu_suite

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("op", list(gpu_suite.SPECS))
def test_suite_runs_and_checks_every_provider_on_cpu(op):
    rows = gpu_suite.run_op(
        gpu_suite.SPECS[op], None, device="cpu", small=True, timed=False, dtypes=(torch.float32, torch.float16)
    )
    assert rows and all(r["op"] == op for r in rows)
    failed = [
        (r["provider"], r["dtype"], r.get("passes"), r.get("error", r.get("max_err"))) for r in rows if not r["ok"]
    ]
    assert not failed
    providers = {r["provider"] for r in rows}
    assert any(p.startswith(("segevol_fast", "op_")) for p in providers), providers
    assert any(r["checked"] for r in rows)


def test_ratios_pair_rows_of_the_same_case():
    rows = [
        {"op": "x", "provider": "base", "shape": [1], "dtype": "f", "median_ms": 2.0},
        {"op": "x", "provider": "ours", "shape": [1], "dtype": "f", "median_ms": 1.0},
        {"op": "x", "provider": "ours", "shape": [2], "dtype": "f", "median_ms": 1.0},
    ]
    gpu_suite.ratios(rows, "base")
    assert rows[1]["speedup_vs_base"] == 2.0 and "speedup_vs_base" not in rows[2]
    gpu_suite.ratios(rows, "base", speedup=False)
    assert rows[1]["time_vs_base"] == 0.5
