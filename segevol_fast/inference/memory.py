"""Measuring the peak memory of a call: device memory on CUDA, process memory (RSS) on CPU.

The CPU peak comes from sampling the resident set size every few milliseconds on a background
thread (`ru_maxrss` cannot be reset, so it cannot bound one call inside a long-lived process). A
sampler can miss a spike shorter than its interval; allocations here live for whole windows (tens
of milliseconds at least), so the error is small, and the benchmarks also report ru_maxrss of a
fresh process as a second, spike-proof figure.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    """Resident set size of this process in bytes: /proc/self/statm, else the (peak) ru_maxrss,
    which can only over-state it. The planner and the measurement both read it here."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


class PeakMemory:
    """Context manager: `with PeakMemory(device) as pm: ...; pm.peak` in bytes.

    CUDA: `torch.cuda.max_memory_allocated` after a reset (tensor memory on that device).
    CPU: the highest sampled RSS of the process during the block (everything: weights, Python,
    allocator caches), plus the value at entry and exit.
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.002):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak: Optional[int] = None
        self.baseline: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._max = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._max = max(self._max, current_rss())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            self.baseline = self._max = current_rss()
            self._thread = threading.Thread(target=self._sample, name="segevol-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak = max(self._max, current_rss())
