"""The robustness figure: three panels of mean Dice, one line per prompt type.

1. Dice against the rotation angle of the single-axis rotations (the sweep), a line per prompt type
   and axis (solid x, dashed y, dotted z); the unperturbed Dice is drawn at 0 degrees (a circle)
   and the other rotations (the published protocol: several axes at once) at their largest angle
   (a star, labelled with the rotation's name).
2. Dice against the box jitter (voxels), the unperturbed Dice at 0.
3. Dice against the point jitter (voxels), likewise.

matplotlib is imported here only, on the Agg backend (no display needed): `pip install
'segevol_fast[eval]'`.
"""

from __future__ import annotations

import io
import os
from typing import Union

from ..errors import MissingDependencyError
from ..inference.result_files import write_bytes_atomic

PathLike = Union[str, os.PathLike]
AXIS_STYLES = {"x": "-", "y": "--", "z": ":"}


def require_matplotlib():
    """The matplotlib module, or MissingDependencyError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(
            "the robustness plot needs matplotlib: pip install 'segevol_fast[eval]' (or pip install matplotlib)"
        ) from None
    return matplotlib


def _pyplot():
    require_matplotlib().use("Agg", force=False)  # a figure file, no window: works without a display
    import matplotlib.pyplot as plt

    return plt


def plot_robustness(report, path: PathLike) -> None:
    """Write the three-panel PNG of `report` (a RobustnessReport) to `path`, whole or not at all."""
    plt = _pyplot()
    summary = report.summary
    prompts = list(dict.fromkeys(s["prompt"] for s in summary))
    colours = {p: f"C{n}" for n, p in enumerate(prompts)}
    none = {s["prompt"]: s["dice"] for s in summary if s["perturbation"] == "none"}

    fig, panels = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    angles = {name: a for name, a in report.settings.get("rotations", [])}
    _rotation_panel(panels[0], summary, colours, none, angles)
    _jitter_panel(panels[1], summary, colours, none, "box_jitter", "box corner jitter (voxels)")
    _jitter_panel(panels[2], summary, colours, none, "point_jitter", "click jitter (voxels)")
    for ax in panels:
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("mean Dice")
        ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def _rotation_panel(ax, summary, colours, none, angles: dict) -> None:
    ax.set_title("rotation")
    ax.set_xlabel("angle (degrees)")
    rotations = [s for s in summary if s["perturbation"] == "rotation"]
    for prompt, colour in colours.items():
        for axis, style in AXIS_STYLES.items():
            line = sorted((s["angle_deg"], s["dice"]) for s in rotations if s["prompt"] == prompt and s["axis"] == axis)
            if line and prompt in none:  # the sweep passes through the unperturbed scan at 0 degrees
                line = sorted(line + [(0.0, none[prompt])])
            if line:  # colour says the prompt, line style the axis: one legend entry each, not one per pair
                ax.plot(*zip(*line), style, color=colour, marker=".")
        if prompt in none:
            ax.plot([0.0], [none[prompt]], "o", color=colour, markeredgecolor="black")
    named = set()
    for s in rotations:
        if s["angle_deg"] is None and s["axis"]:  # about several axes at once, e.g. the published protocol
            angle = max((abs(a) for a in angles.get(s["setting"], ())), default=0.0)
            ax.plot([angle], [s["dice"]], "*", color=colours[s["prompt"]], markersize=12, markeredgecolor="black")
            if s["setting"] not in named:
                named.add(s["setting"])
                ax.annotate(s["setting"], (angle, s["dice"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    for prompt, colour in colours.items():
        if any(s["prompt"] == prompt for s in rotations):
            ax.plot([], [], "-", color=colour, label=prompt)
    for axis, style in AXIS_STYLES.items():
        if any(s["axis"] == axis for s in rotations):
            ax.plot([], [], style, color="black", label=f"about {axis}")
    if none:
        ax.plot([], [], "o", color="white", markeredgecolor="black", label="none (as stored)")
    if named:
        ax.plot(
            [],
            [],
            "*",
            color="white",
            markeredgecolor="black",
            markersize=12,
            label="several axes, at the largest angle",
        )
    _legend_or_note(ax, "no rotations", below=True)


def _jitter_panel(ax, summary, colours, none, perturbation: str, xlabel: str) -> None:
    ax.set_title(perturbation.replace("_", " "))
    ax.set_xlabel(xlabel)
    for prompt, colour in colours.items():
        line = sorted(
            (s["voxels"], s["dice"]) for s in summary if s["perturbation"] == perturbation and s["prompt"] == prompt
        )
        if not line:
            continue
        if prompt in none:
            line = [(0, none[prompt])] + line
            ax.plot([0], [none[prompt]], "o", color=colour, markeredgecolor="black")
        ax.plot(*zip(*line), "-", color=colour, marker=".", label=prompt)
    _legend_or_note(ax, f"no {perturbation.replace('_', ' ')} settings")


def _legend_or_note(ax, note: str, below: bool = False) -> None:
    if ax.get_legend_handles_labels()[0] and below:  # many entries: under the panel, off the lines
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4)
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, color="grey")
