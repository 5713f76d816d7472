"""A run's output on the command line: the progress display, the output folder checked before
anything slow runs, the result written all or nothing, and the printed summary (volumes, time,
peak memory, notes)."""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Optional


def progress_display(args: argparse.Namespace):
    """The run's one progress display (drawn unless --quiet; timed either way)."""
    from ..inference.progress import Progress

    return Progress(enabled=not args.quiet)


def output_path(out: pathlib.Path) -> pathlib.Path:
    """Check that the result can be written to `out` (OutputError otherwise) before anything slow runs."""
    from ..io.output import check_output_path

    check_output_path(out)
    return out


def write_result(result, out: pathlib.Path, volume, preview: bool, random_weights: bool) -> None:
    """Masks, summary and preview in one all-or-nothing transaction (`segevol_fast.io.output`)."""
    if random_weights:  # the CLI knows it built a random model: say so in every file written
        result.random_weights = True
    result.save(out, preview=preview, volume=volume)


def peak_memory_bytes(device: str) -> int:
    """Process peak: CUDA max allocated on a GPU, else the max resident set size."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated())
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


def print_report(result, seconds: float, device: str, out: pathlib.Path, timings: Optional[dict] = None) -> None:
    """Volumes, time (`timings`: the whole run's stages, loading and saving included; default the
    result's own), peak memory, notes."""
    width = max([len(k) for k in result.masks] + [8])
    for label, ml in result.volumes_ml().items():
        print(f"  {label:<{width}} {ml:10.1f} mL")
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in (result.timings if timings is None else timings).items())
    print(f"time: {seconds:.2f} s" + (f" ({stages})" if stages else ""))
    peak = result.peak_memory_bytes
    what = "GPU max allocated" if device.startswith("cuda") else "process max RSS"
    line = f"peak memory: {peak_memory_bytes(device) / 2**20:.0f} MiB ({what})"
    if peak is not None:
        line += f"; segment() reports {peak / 2**20:.0f} MiB"
    print(line)
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {out}")
