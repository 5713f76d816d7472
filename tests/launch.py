"""Running the package in fresh processes, one or several under torchrun, as the distributed tests do."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
# what torchrun sets for its workers: a test run itself under torchrun must not pass its own on
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_python(target: list[str], args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    """`python <target> <args>` (target: ["-m", module] or [script]) in one process, or in `nproc`
    under `torchrun --standalone` (which picks a free rendezvous port itself); one OpenMP thread
    per process, the repository first on PYTHONPATH, Python's fault handler on, output captured."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    # PYTHONFAULTHANDLER: a child that dies of a signal prints every thread's Python stack first
    env.update(
        OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    )
    return subprocess.run(
        launcher + target + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
