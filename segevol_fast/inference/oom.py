"""Out-of-memory recovery for `mode="fast"`: smaller batches, then stitching on the host, then a clear error.

The memory plan is an estimate; another process on the GPU, fragmentation or a driver can still make
a CUDA allocation fail. `run_fast` then keeps going instead of losing the work done so far:

1. the encoder ran out: free what can be freed, halve the window batch (for the rest of the call)
   and encode the same windows again;
2. the decoder ran out: likewise halve the decode batch and decode the same prompts again;
3. either at batch 1 already, or the stitching itself ran out (row sums, coarse results): run the
   call again with stitching on the host (the plan's `stitch_device` = CPU) at batch 1;
4. that fails too: `DeviceOutOfMemoryError`, saying what was tried.

None of these changes the result beyond float rounding of batched GEMMs (window and decode batches
and the stitch device are not inputs of the arithmetic; see tests/inference/test_oom_retry.py).
Every change is appended to a list the caller reads back (`res.plan["oom_retries"]`).
"""

from __future__ import annotations

import gc
from dataclasses import replace
from typing import Callable, Optional, TypeVar

import torch

from ..errors import DeviceOutOfMemoryError
from .budget import Plan, format_bytes

# torch.cuda.OutOfMemoryError is an alias of this class (older torch: only the cuda name exists)
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
HOST = torch.device("cpu")
T = TypeVar("T")


class HostStitchNeeded(Exception):
    """Internal: batches are at 1 and the device is still short; run again stitching on the host."""


def free_memory(device: torch.device) -> None:
    """Release what the failed attempt held: Python cycles, then CUDA's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _short(message: str) -> str:
    return message.strip().splitlines()[0][:200] if message.strip() else "out of memory"


class Retries:
    """The plan a fast run currently uses, and the log of what out-of-memory errors changed in it.

    plan: the current plan (a new frozen `Plan` after each change); log: list of dicts
    {"stage", "change", "error"} that the caller passed in and reads back.
    """

    def __init__(self, plan: Plan, log: Optional[list] = None):
        self.plan = plan
        self.log = log if log is not None else []

    def attempt(self, stage: str, fn: Callable[[], T]) -> Optional[T]:
        """fn(), or None after an out-of-memory error, once the batch of `stage` ("encoder" or
        "decoder") has been halved: the caller then repeats the same work with the new plan.
        Raises HostStitchNeeded when that batch is already 1."""
        error = None
        try:
            return fn()
        except OutOfMemoryError as err:
            # keep only the text: the traceback pins the failed call's tensors until it is dropped
            error = f"{type(err).__name__}: {err}"
        free_memory(self.plan.device)
        field = "window_batch" if stage == "encoder" else "decode_batch"
        old = getattr(self.plan, field)
        if old <= 1:
            raise HostStitchNeeded(error)
        self._change(stage, field, max(1, old // 2), error)
        return None

    def to_host(self, error: str) -> None:
        """Stitch on the host at batch 1 from now on; DeviceOutOfMemoryError when that is already so."""
        free_memory(self.plan.device)
        if self.plan.stitch_device.type == HOST.type and self.plan.window_batch == self.plan.decode_batch == 1:
            tried = "; ".join(r["change"] for r in self.log) or "nothing smaller was left to try"
            raise DeviceOutOfMemoryError(
                f"out of {self.plan.device} memory even with window batch 1, decode batch 1 and stitching on the "
                f"host (tried: {tried}). Last error: {_short(error)}. Pass a smaller max_memory so the plan leaves "
                f"room for other users of the device (planned peak {format_bytes(self.plan.estimated_peak_bytes)}), "
                "segment fewer prompts per call, free device memory held elsewhere, or run on the CPU."
            )
        self.plan = replace(self.plan, stitch_device=HOST, window_batch=1, decode_batch=1)
        self.log.append(
            {
                "stage": "stitching",
                "change": "stitching on the host at window and decode batch 1, call restarted",
                "error": _short(error),
            }
        )

    def _change(self, stage: str, field: str, new: int, error: str) -> None:
        old = getattr(self.plan, field)
        self.plan = replace(self.plan, **{field: new})
        self.log.append({"stage": stage, "change": f"{field.replace('_', ' ')} {old} -> {new}", "error": _short(error)})
