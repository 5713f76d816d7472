"""What every benchmark result file records about its run, and where the file goes.

A figure is only meaningful with its setting: when, on which host and CPU, with how many cores and
torch threads, under which torch. `environment(**fields)` is that header plus the script's own
fields; `write_results` names the file `<prefix>-<date>[-<suffix>].json` in the results folder
(bench/results by default), so runs on other days or with other cases never overwrite each other.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import platform
import re
from typing import Union


def cpu_model_name() -> str:
    """The CPU's marketing name (/proc/cpuinfo on Linux, platform.processor() elsewhere)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor()


def device_slug(device: str = "cpu") -> str:
    """The results-file prefix for a device: "cpu", or the GPU's name ("NVIDIA-H200")."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return dev.type
    return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(dev)).strip("-")


def environment(**fields) -> dict:
    """The run's header (UTC date, host, CPU, cores, torch version and threads) followed by `fields`."""
    import torch

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **fields,
    }


def write_results(out: dict, directory: Union[str, os.PathLike], prefix: str, suffix: str = "") -> pathlib.Path:
    """Write `out` as `<directory>/<prefix>-<today>[-<suffix>].json` (folders made); returns the path."""
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    file = path / f"{prefix}-{dt.date.today().isoformat()}{'-' + suffix if suffix else ''}.json"
    file.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {file}")
    return file
