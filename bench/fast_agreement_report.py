"""The fast-mode agreement benchmark's report (bench/fast_agreement.py): one markdown row per (model,
case, variant) over seeds and organs, and the defaults verdict, all read from the JSON alone.

Verdict: an approximation may be on by default only where, alone on top of the official zoom-in,
its least Dice against exact mode over every case, organ and seed is >= TRAINED_MIN_DICE on the
trained model and >= RANDOM_MIN_DICE on random weights (random masks have ragged, noisy borders:
a looser bound; the trained model's real boundaries are what users meet).
"""

from __future__ import annotations

import json
import pathlib
import statistics

TRAINED_MIN_DICE = 0.99
RANDOM_MIN_DICE = 0.98
MB = 2**20


def _span(values) -> str:
    """One value, or "low-high" when seeds differ."""
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def rows(out: dict) -> list[dict]:
    """One row per (model label, case, variant), its seeds and organs pooled, in run order."""
    groups: dict[tuple, list[dict]] = {}
    for run in out["runs"]:
        for case, part in run["cases"].items():
            for record in part["variants"]:
                groups.setdefault((run["label"], case, record["variant"]), []).append(record)
    table = []
    for (label, case, variant), records in groups.items():
        dice = [d for r in records for d in r["dice_vs_exact"].values()]
        table.append(
            {
                "model": label,
                "case": case,
                "variant": variant,
                "runs": len(records),
                "windows": f"{_span([r['windows_official'] for r in records])}→"
                f"{_span([r['windows_encoded'] for r in records])}",
                "tokens": f"{_span([r['tokens_official'] for r in records])}→"
                f"{_span([r['tokens_encoded'] for r in records])}",
                "seconds": statistics.mean(r["seconds"] for r in records),
                "speed_ratio": statistics.mean(r["speed_ratio"] for r in records),
                "peak_mb": max((r["peak_memory_bytes"] or 0) for r in records) / MB,
                "dice_min": min(dice),
                "dice_mean": statistics.mean(dice),
                "dice_vs_none_min": min(d for r in records for d in r["dice_vs_none"].values()),
                "dice_vs_labels_mean": _mean_or_none(
                    [d for r in records for d in r.get("dice_vs_labels", {}).values()]
                ),
                "prob_diff_mean": statistics.mean(d for r in records for d in r["prob_abs_diff_mean"].values()),
                "prob_diff_max": max(d for r in records for d in r["prob_abs_diff_max"].values()),
            }
        )
    return table


def _mean_or_none(values: list) -> "float | None":
    return statistics.mean(values) if values else None


def verdict(out: dict) -> dict:
    """{approximation: least Dice vs exact on the trained and random models, whether it may be on,
    and (for reading) least Dice vs fast "none": the approximation's own share of the difference}."""
    least: dict[str, dict[str, float]] = {name: {} for name in out["alone"]}
    for run in out["runs"]:
        kind = "trained" if run["model"] == "small" else "random"
        for part in run["cases"].values():
            for record in part["variants"]:
                if record["variant"] in least:
                    for key, against in ((kind, "dice_vs_exact"), (f"{kind}_vs_none", "dice_vs_none")):
                        worst = min(record[against].values())
                        least[record["variant"]][key] = min(worst, least[record["variant"]].get(key, 1.0))
    bounds = {"trained": TRAINED_MIN_DICE, "random": RANDOM_MIN_DICE}
    return {
        name: {**v, "on": bool(v) and all(v[k] >= bound for k, bound in bounds.items() if k in v)}
        for name, v in least.items()
    }


def markdown(out: dict) -> str:
    """The table and the verdict, as printed and saved beside the JSON."""
    lines = [
        "| model | case | variant | windows official→encoded | tokens official→encoded | time s | ×exact | "
        "peak MB | Dice vs exact min / mean | Dice vs none min | mean / max abs Δp | Dice vs labels mean |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows(out):
        lines.append(
            f"| {r['model']} | {r['case']} | {r['variant']} | {r['windows']} | {r['tokens']} | {r['seconds']:.1f} | "
            f"{r['speed_ratio']:.2f} | {r['peak_mb']:.0f} | {r['dice_min']:.4f} / {r['dice_mean']:.4f} | "
            f"{r['dice_vs_none_min']:.4f} | {r['prob_diff_mean']:.2e} / {r['prob_diff_max']:.2f} | "
            f"{'—' if r['dice_vs_labels_mean'] is None else format(r['dice_vs_labels_mean'], '.3f')} |"
        )
    lines += [
        "",
        f"Defaults verdict (each approximation alone; least Dice vs exact over cases, organs, seeds; on by "
        f"default only if trained >= {TRAINED_MIN_DICE} and random >= {RANDOM_MIN_DICE}):",
        "",
        "| approximation | trained model | random weights | on by default | vs fast none: trained | random |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in verdict(out).items():
        cells = [
            f"{v[k]:.4f}" if k in v else "not run" for k in ("trained", "random", "trained_vs_none", "random_vs_none")
        ]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {'yes' if v['on'] else 'no'} | {cells[2]} | {cells[3]} |")
    lines += ["", *[f"- {note}" for note in out.get("notes", [])]]
    return "\n".join(lines)


def write_report(out: dict, path: pathlib.Path) -> None:
    """The JSON (with its rows and verdict) at `path`, the markdown beside it (.md)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**out, "table": rows(out), "verdict": verdict(out)}, indent=2, default=str))
    path.with_suffix(".md").write_text(markdown(out) + "\n")
    print(f"wrote {path} and {path.with_suffix('.md').name}", flush=True)
