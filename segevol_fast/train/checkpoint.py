"""Trainer checkpoint files and the global RNG states they carry.

A checkpoint is one `torch.save` dict (see `Trainer.state_dict`) tagged with `FORMAT`, written
atomically and fsynced (a checkpoint must survive the crash it exists for), read back with
weights_only=True. The global torch / numpy / Python generators (LoRA dropout draws from them) are
saved per rank so a resumed run continues bit for bit.
"""

from __future__ import annotations

import os
import pathlib
import random

import numpy as np
import torch

from ..errors import CheckpointError
from ..io.output import write_file_atomic

FORMAT = "segevol_fast.trainer/1"


def write_checkpoint(path, state: dict) -> pathlib.Path:
    """Write `state` to `path` atomically (temporary file in the same folder, fsync, rename)."""
    path = pathlib.Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    write_file_atomic(path, write)
    return path


def read_checkpoint(path) -> dict:
    """The state dict of a trainer checkpoint; CheckpointError for a missing, damaged or foreign file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for damaged files
        raise CheckpointError(f"{path} cannot be read as a trainer checkpoint: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a segevol_fast trainer checkpoint")
    return state


def seed_global_rngs(seed: int) -> None:
    """Seed torch, numpy and Python's global generators (what e.g. LoRA dropout draws from), so a
    run is the same every time; resuming replaces them with the checkpoint's states."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
