"""The adaptation study's summaries (bench/adaptation_study.py): where a learned router sends each
evaluation image, and per-cell statistics over seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from segevol_fast import adapters
from segevol_fast.adapters.mixture import IDENTITY


def router_decisions(model, dataset) -> dict | None:
    """{modality: {"images": n, expert or "identity": fraction of those images}} of the model's
    mixture on the whole volumes of `dataset` resized to the window (what the resized evaluation
    routes), or None for a model without a mixture."""
    counts: dict[str, dict[str, int]] = {}
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            route = adapters.batch_route(model, sample["image"][None], [sample["modality"]])
            if route is None:
                return None
            index = int(route.index[0]) if route.index is not None else int(route.gates[0].argmax())
            chosen = IDENTITY if index < 0 else route.names[index]
            row = counts.setdefault(sample["modality"], {IDENTITY: 0, **{n: 0 for n in route.names}})
            row[chosen] += 1
    return {
        m: {"images": sum(row.values()), **{k: v / sum(row.values()) for k, v in row.items()}}
        for m, row in counts.items()
    }


def spread(values: Sequence[float]) -> dict:
    """mean, std (population), min, max and the values of one cell over seeds (nan ignored)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "values": list(values)}
    a = np.asarray(finite, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std()),
        "min": float(a.min()),
        "max": float(a.max()),
        "values": list(values),
    }


def over_seeds(runs: Sequence[dict]) -> dict:
    """The runs' nested {name: ... {key: number}} dicts (same keys in each) as one dict of
    `spread`s at the leaves."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: over_seeds([r[k] for r in runs]) for k in first}
    return spread([float(r) for r in runs])


def kept(after: dict, before: dict) -> float:
    """Dice after adaptation over the base's, summed over the prompt kinds (nan without a base Dice)."""
    base = sum(v for v in before.values() if not math.isnan(v))
    return sum(v for v in after.values() if not math.isnan(v)) / base if base > 0 else math.nan


def table(report: dict, cell: str = "resized") -> str:
    """A plain-text table of the mean ± std per method and evaluation set (mean over prompt kinds)."""
    lines = []
    for name, r in report["methods"].items():
        parts = []
        for group, cols in r["summary"][cell].items():
            means = [c["mean"] for c in cols.values()]
            stds = [c["std"] for c in cols.values()]
            parts.append(f"{group} {np.nanmean(means):.3f}±{np.nanmean(stds):.3f}")
        lines.append(f"{name:16s} " + "  ".join(parts))
    return "\n".join(lines)
