"""Running a benchmark case in a fresh Python process, so that its peak memory (ru_maxrss) is the
case's alone: the child prints one marked JSON line, the parent finds and parses it.

Used by segment_bench.py, calibrate_memory.py, calibrate_segment.py, adapter_bench.py and resource_table.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Optional

MARK = "@@RESULT@@"


def report(result: dict) -> None:
    """In the child: print the case's result as the one line the parent reads."""
    print(MARK + json.dumps(result, default=str), flush=True)


def run_child(script: str, args: list[str], cwd, timeout: Optional[float] = None) -> dict:
    """Run `python script *args` and return the dict its `report` printed; {"error": stderr tail}
    when it printed none (a crash). Raises subprocess.TimeoutExpired after `timeout` seconds."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    line = next((out for out in proc.stdout.splitlines() if out.startswith(MARK)), None)
    return json.loads(line[len(MARK) :]) if line else {"error": proc.stderr[-3000:]}
