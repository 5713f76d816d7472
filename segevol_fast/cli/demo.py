"""`segevol-fast demo`: liver, spleen and kidneys in the shared real CT (or, without it, a synthetic
phantom), with the official weights when found and a random model otherwise; prints Dice against
the ground truth."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from ..errors import WeightsNotFoundError
from .common import (
    DATA_ENV,
    EXIT_OK,
    RANDOM_NOTE,
    add_run_options,
    approximations_from_args,
    build_model,
    data_dir,
    loud_random_notice,
    resolve_device,
    sample_tokenizer,
    segment_fn,
)
from .report import output_path, print_report, progress_display, write_result

DEMO_FILE = "ct_abdomen_sm.nii.gz"
# prompt text -> TotalSegmentator class name in labels.json "ct" (and in the phantom)
DEMO_ORGANS = {"liver": "liver", "spleen": "spleen", "left kidney": "kidney_left", "right kidney": "kidney_right"}


def demo_input():
    """(volume, ground-truth labels (X, Y, Z), {class name: id}, description)."""
    import numpy as np

    from ..io import load_volume

    data = data_dir()
    ct = None if data is None else data / DEMO_FILE
    if ct is not None and ct.is_file() and (data / "labels.json").is_file():
        import nibabel as nib

        labels = np.asarray(nib.load(str(data / DEMO_FILE.replace(".nii.gz", "_labels.nii.gz"))).dataobj)
        ids = {name: int(i) for i, name in json.loads((data / "labels.json").read_text())["ct"].items()}
        return load_volume(ct, modality="ct"), labels, ids, f"real CT {ct}"
    from ..phantom import make_phantom

    volume, labels, names = make_phantom()
    why = (
        f"no {ct}"
        if ct is not None
        else f"set {DATA_ENV} to a folder holding {DEMO_FILE}, its _labels file and labels.json for the real CT"
    )
    return volume, labels, {n: i for i, n in names.items()}, f"synthetic phantom ({why})"


def _boxes_from_labels(labels, ids: dict, organs: list[str]):
    """(N, 6) inclusive voxel boxes (i0, j0, k0, i1, j1, k1) of each organ's ground truth."""
    import numpy as np

    boxes = []
    for organ in organs:
        idx = np.argwhere(labels == ids[DEMO_ORGANS[organ]])
        boxes.append(np.concatenate([idx.min(0), idx.max(0)]))
    return np.asarray(boxes, dtype=np.float64)


def _dice(a, b) -> float:
    import numpy as np

    s = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 2.0 * int(np.count_nonzero(a & b)) / s if s else 1.0


def run_demo(args: argparse.Namespace) -> int:
    import dataclasses

    from ..model.weights import find_tokenizer, find_weights

    out = output_path(pathlib.Path(args.out))
    device = resolve_device(args.device)
    weights = None
    if not args.random_weights:
        try:
            weights = find_weights(args.weights, download=args.download)
        except WeightsNotFoundError:
            if args.weights:  # asked for these weights explicitly: do not silently go random
                raise
    config_name = "official" if args.full else "tiny"
    display = progress_display(args)  # one progress display for the run; its timings include loading and saving
    display.stage("load scan")
    volume, labels, ids, source = demo_input()
    organs = [o for o in DEMO_ORGANS if (labels == ids.get(DEMO_ORGANS[o], -1)).any()]
    display.print(
        f"demo input: {source}, shape {volume.shape}, spacing {tuple(round(s, 3) for s in volume.spacing)} mm"
    )
    if weights is None:
        loud_random_notice(config_name)
    else:
        display.print(f"weights: {weights}")
    display.stage("load model")
    model = build_model(weights, config_name, find_tokenizer(weights, sample_tokenizer()), device)
    use_text = model.tokenizer is not None
    if not use_text:
        display.print("no CLIP tokenizer found: prompting with the ground-truth boxes instead of text", file=sys.stderr)
    result = segment_fn()(
        model,
        volume,
        text=organs if use_text else None,
        box=None if use_text else _boxes_from_labels(labels, ids, organs),
        modality="ct",
        mode=args.mode,
        zoom_in=not args.no_zoom_in,
        device=device,
        progress=display,
        precision=args.precision,
        approximations=approximations_from_args(args),
    )
    if not use_text:  # box prompts come back as "box 0", ...: give them the organs' names
        result = dataclasses.replace(
            result,
            masks=dict(zip(organs, result.masks.values())),
            probabilities=None if result.probabilities is None else dict(zip(organs, result.probabilities.values())),
        )
    if weights is None and not any("meaningless" in n for n in result.notes):
        result.notes.append(RANDOM_NOTE)
    display.stage("save")
    write_result(result, out, volume, preview=True, random_weights=weights is None)
    display.close()
    for organ, mask in result.masks.items():
        print(f"  Dice vs ground truth, {organ:<12} {_dice(mask, labels == ids[DEMO_ORGANS[organ]]):.3f}")
    print_report(result, display.seconds, device, out, display.timings)
    if weights is None:
        print(f"!! {RANDOM_NOTE.upper()} !!", file=sys.stderr)
    return EXIT_OK


def add_subcommand(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="segment liver, spleen and kidneys in a sample CT",
        description=f"Segments {', '.join(DEMO_ORGANS)} in ${DATA_ENV}/{DEMO_FILE} (`make demo` sets "
        f"{DATA_ENV}=../shared/data) or, when absent, a synthetic phantom. "
        "Uses the official weights when found, else a random model (tiny unless --full).",
    )
    p.add_argument("--out", default="segevol_out/demo", metavar="DIR", help="output folder (default segevol_out/demo)")
    p.add_argument(
        "--full",
        action="store_true",
        help="with random weights, use the official architecture "
        "(181 M parameters, ~2 GB RAM) instead of the tiny one. Measured on 2 CPU cores: ~32 s on the "
        "shared CT, ~60 s on the phantom; the tiny model is slower with zoom-in (its 8x32x32 windows "
        "number in the hundreds) and takes ~5 s with --no-zoom-in",
    )
    add_run_options(p)
    p.set_defaults(func=run_demo)
