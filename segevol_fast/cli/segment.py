"""`segevol-fast segment`: one scan (NIfTI file or DICOM series) by text, boxes and/or points, or
a cohort (a folder of scans, a glob, a .csv / .jsonl manifest) scan by scan, resumable."""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys

from ..errors import UsageError
from .common import (
    EXIT_FAILED,
    EXIT_OK,
    RANDOM_NOTE,
    adapter_file,
    add_run_options,
    approximations_from_args,
    build_model,
    loud_random_notice,
    model_files,
    parse_size,
    resolve_device,
    segment_fn,
)
from .report import output_path, print_report, progress_display, write_result


def input_stem(path: str) -> str:
    """Default output folder name: a NIfTI file's name without .nii(.gz), a DICOM series folder's
    name (also when one of its files is given), file-name safe; '.' gives the current folder's name."""
    from ..inference.result_files import safe_label
    from ..io.paths import is_nifti_path

    p = pathlib.Path(os.path.abspath(path))
    if is_nifti_path(p):
        stem = re.sub(r"\.nii(\.gz)?$", "", p.name, flags=re.I)
    else:
        stem = p.parent.name if p.is_file() else p.name
    return safe_label(stem) if stem else "input"


def prompt_arguments(args: argparse.Namespace) -> dict:
    """segment()'s text / box / points / point_labels from the flags, checked (PromptError)."""
    import numpy as np

    from ..inference.prompts import check_prompt_arguments

    prompts = dict(
        text=args.text or None,
        box=np.asarray(args.box, dtype=np.float64) if args.box else None,
        points=np.asarray(args.points, dtype=np.float64) if args.points else None,
        # floats: "1.0" (the official code's labels) is accepted, 0.5 refused with a clear message
        point_labels=np.asarray(args.point_labels, dtype=np.float64) if args.point_labels else None,
    )
    check_prompt_arguments(**prompts)
    return prompts


def run_segment(args: argparse.Namespace) -> int:
    from ..inference.adapter_scope import attach_for_every_scan, file_note
    from ..inference.cohort import MANIFEST_SUFFIXES, is_cohort_input
    from ..io import load_volume

    has = args.text or args.box or args.points
    manifest = pathlib.Path(args.input).suffix.lower() in MANIFEST_SUFFIXES
    if is_cohort_input(args.input) and (has or manifest):  # a manifest's rows may carry their own prompts
        return run_cohort(args, prompt_arguments(args) if has else {})
    if not has:
        raise UsageError("give at least one prompt: --text NAME..., --box i0 j0 k0 i1 j1 k1, or --points i j k")
    if args.point_labels and not args.points:
        raise UsageError("--point-labels given without --points")
    prompts = prompt_arguments(args)  # checked here: a bad prompt fails before the scan and model load
    out = output_path(pathlib.Path(args.out) if args.out else pathlib.Path("segevol_out") / input_stem(args.input))
    device = resolve_device(args.device)
    adapter = adapter_file(args)
    weights, tok_dir = model_files(args, text=bool(args.text))
    display = progress_display(args)  # one progress display for the run; its timings include loading and saving
    display.stage("load scan")
    volume = load_volume(args.input, modality=args.modality, series=args.series)
    if weights is None:
        loud_random_notice(args.config)
    display.stage("load model")
    model = build_model(weights, args.config, tok_dir, device)
    active, attached = attach_for_every_scan(model, adapter)
    result = segment_fn()(
        model,
        volume,
        **prompts,
        coords=args.coords,
        modality=args.modality,
        mode=args.mode,
        zoom_in=not args.no_zoom_in,
        max_memory=args.max_memory,
        device=device,
        progress=display,
        return_probabilities=args.probabilities,
        precision=args.precision,
        approximations=approximations_from_args(args),
        adapter=active,
    )
    if adapter is not None:
        result.notes.append(file_note(attached, adapter))
    if weights is None and not any("meaningless" in n for n in result.notes):
        result.notes.append(RANDOM_NOTE)
    display.stage("save")
    write_result(result, out, volume, args.preview, random_weights=weights is None)
    display.close()
    print_report(result, display.seconds, device, out, display.timings)
    return EXIT_OK


def run_cohort(args: argparse.Namespace, prompts: dict) -> int:
    """`segevol-fast segment FOLDER|GLOB|MANIFEST`: every scan into <out>/<name>/, resumable, with
    <out>/cohort_summary.csv; exit 1 when some scan failed (all the others are still done)."""
    from .. import distributed
    from ..inference.adapter_scope import applies_to_every_scan
    from ..inference.cohort import SUMMARY, cohort_items, segment_cohort

    adapter = adapter_file(args)
    # context priors apply to every scan while attached: attached once below, not chosen per row
    for_every_scan = adapter is not None and applies_to_every_scan(adapter)
    items = cohort_items(args.input, **prompts, modality=args.modality, adapter=None if for_every_scan else adapter)
    out = pathlib.Path(args.out) if args.out else pathlib.Path("segevol_out") / "cohort"
    device = resolve_device(args.device)
    weights, tok_dir = model_files(args, text=any(it.text for it in items if it.error is None))
    env = distributed.init_from_env(device=device)  # torchrun: shard the cohort over the ranks
    device = str(env.device)
    if env.rank == 0:  # said before the first scan, for whoever watches the start of a long run
        for item in items:
            if item.error is not None:
                print(
                    f"segevol-fast {args.command}: warning: {item.error} (recorded as failed; the other scans run)",
                    file=sys.stderr,
                )
    if weights is None:
        loud_random_notice(args.config)
    model = build_model(weights, args.config, tok_dir, device)
    if for_every_scan:
        from .. import adapters

        adapters.load_adapter(model, adapter)
    rows = segment_cohort(
        model,
        items,
        out,
        preview=args.preview,
        progress=not args.quiet,
        coords=args.coords,
        mode=args.mode,
        zoom_in=not args.no_zoom_in,
        max_memory=args.max_memory,
        device=device,
        return_probabilities=args.probabilities,
        precision=args.precision,
        approximations=approximations_from_args(args),
    )
    distributed.shutdown()
    failed = [r for r in rows if r["status"] == "error"]
    if env.rank == 0:
        print(
            f"cohort: {len(rows) - len(failed)} of {len(rows)} scans done, {len(failed)} failed; wrote {out / SUMMARY}"
        )
        for r in failed:
            print(f"  {r['name']}: {r['error']}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def add_subcommand(sub) -> None:
    p = sub.add_parser(
        "segment",
        help="segment a NIfTI file or DICOM folder",
        description="Segment structures by text, boxes and/or points. Coordinates are voxel indices "
        "(i, j, k) of the stored array, or RAS millimetres with --coords world.",
    )
    p.add_argument(
        "input",
        help="a .nii / .nii.gz file, a DICOM series folder or one of its files; or a cohort: a "
        "folder of scans, a quoted glob, or a .csv / .jsonl manifest (see README)",
    )
    p.add_argument(
        "--text",
        nargs="+",
        action="extend",
        metavar="NAME",
        help='category names, one mask each, e.g. liver spleen "left kidney" (repeatable: '
        "--text liver --text spleen asks for both)",
    )
    p.add_argument(
        "--box",
        nargs=6,
        type=float,
        action="append",
        metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
        help="inclusive box corners; repeat for several (one per --text name, or one shared)",
    )
    p.add_argument(
        "--points",
        nargs=3,
        type=float,
        action="append",
        metavar=("I", "J", "K"),
        help="a point prompt; repeat for several (shared by all text prompts)",
    )
    p.add_argument(
        "--point-labels", nargs="+", type=float, metavar="L", help="1 positive / 0 negative per point (default all 1)"
    )
    p.add_argument("--coords", choices=["voxel", "world"], default="voxel", help="units of --box / --points")
    p.add_argument(
        "--series",
        metavar="UID",
        help="SeriesInstanceUID to read when the DICOM folder holds several "
        "(the error for such a folder lists them; no-series-uid names a series without one)",
    )
    p.add_argument("--modality", choices=["ct", "mri"], help="text template (default: from DICOM, else ct)")
    p.add_argument(
        "--tokenizer", metavar="DIR", help="folder with the CLIP tokenizer files (default: next to the weights)"
    )
    p.add_argument(
        "--config",
        choices=["official", "tiny"],
        default="official",
        help="architecture for --random-weights (default official; tiny = toy widths, pipeline tests)",
    )
    p.add_argument(
        "--out",
        metavar="PATH",
        help="output folder, or a .nii.gz path for one label map (default ./segevol_out/<input name>)",
    )
    p.add_argument("--max-memory", type=parse_size, metavar="SIZE", help="peak memory budget, e.g. 2GB or 1.5GiB")
    p.add_argument(
        "--adapter",
        metavar="FILE",
        help="an adapter file written by segevol_fast.adapters.save_adapter "
        "(LoRA, bottleneck, mixture or context priors; .safetensors) to run with; in a cohort, a manifest "
        "row's adapter column (a file, relative to the manifest's folder) replaces it for that scan, "
        "except context priors, which apply to every scan (a row's adapter then runs with them)",
    )
    p.add_argument("--preview", action="store_true", help="also write a PNG slice montage")
    p.add_argument("--probabilities", action="store_true", help="also write per-mask probability maps (float32)")
    add_run_options(p)
    p.set_defaults(func=run_segment)
