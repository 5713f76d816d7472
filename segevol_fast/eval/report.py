"""The result of a robustness evaluation: one Dice per (case, organ, perturbation setting, prompt
type), its summary, and the table, JSON and plot files made from them.

Row columns (`COLUMNS`): case, organ, perturbation ("none", "rotation", "box_jitter",
"point_jitter"), setting ("none", a rotation's name such as "published" or "z+30", a jitter in
voxels such as "5"), axis (the world axes a rotation turns about, "z" or "xyz"; empty otherwise),
angle_deg (a single-axis rotation's angle), voxels (a jitter's largest move), prompt, dice.

The summary has one entry per (perturbation, setting, prompt): n (rows), dice (their mean) and
drop, the mean over those rows of (Dice of the same case, organ and prompt unperturbed) - (Dice
perturbed). The drop is paired, so an organ that a rotation carried off the grid (skipped, see
`skipped`) does not move it through the other organs' mean.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Union

from ..inference.result_files import write_bytes_atomic

PathLike = Union[str, os.PathLike]
COLUMNS = ("case", "organ", "perturbation", "setting", "axis", "angle_deg", "voxels", "prompt", "dice")
SETTING_COLUMNS = ("perturbation", "setting", "axis", "angle_deg", "voxels")
SKIPPED_COLUMNS = ("case", "organ", "setting")


@dataclass
class RobustnessReport:
    """rows: dicts of `COLUMNS`; skipped: {case, organ, setting} of organs a rotation emptied;
    settings: what the evaluation ran with (rotations, jitters, prompts, seed, ...)."""

    rows: list[dict]
    skipped: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @property
    def summary(self) -> list[dict]:
        """Mean Dice and paired drop per (perturbation, setting, prompt), in the rows' order."""
        unperturbed = {
            (r["case"], r["organ"], r["prompt"]): r["dice"] for r in self.rows if r["perturbation"] == "none"
        }
        groups: dict[tuple, list[dict]] = {}
        for r in self.rows:
            groups.setdefault(tuple(r[c] for c in (*SETTING_COLUMNS, "prompt")), []).append(r)
        out = []
        for key, rows in groups.items():
            drops = [
                unperturbed[k] - r["dice"] for r in rows if (k := (r["case"], r["organ"], r["prompt"])) in unperturbed
            ]
            out.append(
                {
                    **dict(zip((*SETTING_COLUMNS, "prompt"), key)),
                    "n": len(rows),
                    "dice": _mean([r["dice"] for r in rows]),
                    "drop": _mean(drops),
                }
            )
        return out

    def skipped_counts(self) -> dict[str, int]:
        """{setting: organs skipped under it}, for the settings that skipped any."""
        counts: dict[str, int] = {}
        for s in self.skipped:
            counts[s["setting"]] = counts.get(s["setting"], 0) + 1
        return counts

    def to_csv(self, path: PathLike) -> None:
        """The rows as a CSV table (`COLUMNS`; empty cells where a column does not apply)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(["" if r[c] is None else r[c] for c in COLUMNS] for r in self.rows)
        write_bytes_atomic(path, buf.getvalue().encode())

    def to_json(self, path: PathLike) -> None:
        """settings, summary, rows and skipped organs as one JSON object (nan as null)."""
        data = {"settings": self.settings, "summary": self.summary, "rows": self.rows, "skipped": self.skipped}
        write_bytes_atomic(path, (json.dumps(_finite(data), indent=1) + "\n").encode())

    def plot(self, path: PathLike) -> None:
        """The PNG figure of `eval.plot.plot_robustness` (needs matplotlib)."""
        from .plot import plot_robustness

        plot_robustness(self, path)

    def table(self) -> str:
        """The summary as aligned text lines, for a terminal."""
        head = ("perturbation", "setting", "prompt", "n", "dice", "drop")
        lines = [head] + [
            (s["perturbation"], s["setting"], s["prompt"], str(s["n"]), f"{s['dice']:.4f}", f"{s['drop']:+.4f}")
            for s in self.summary
        ]
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        text = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines]
        counts = self.skipped_counts()
        if counts:
            text.append("organs carried off the grid (skipped): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        return "\n".join(text)


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


def _finite(value):
    """JSON has no nan: a mean of nothing is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
