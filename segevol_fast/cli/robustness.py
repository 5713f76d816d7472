"""`segevol-fast eval-robustness`: Dice under rotated scans and jittered prompts
(`segevol_fast.eval.robustness`; docs/robustness.md).

    segevol-fast eval-robustness --data /data/Task09_Spleen --weights BAAI/SegVol --out robustness/
    segevol-fast eval-robustness --image ct.nii.gz --label ct_labels.nii.gz --label-map labels.json \\
        --label-map-key ct --modality ct --weights BAAI/SegVol --rotations published --out robustness/

Writes robustness.csv, robustness.json and robustness.png into --out, with cases/ holding every
finished case: run the same command again to continue an interrupted run; --restart discards the
finished cases of other settings. Prints the summary table at the end.
"""

from __future__ import annotations

import argparse

from ..errors import InvalidArgumentError, UsageError
from .cases import add_case_arguments, add_model_arguments, cases_from_arguments, model_from_arguments
from .common import EXIT_OK, adapter_file, loud_random_notice, resolve_device
from .finetune_validation import count, positive_int

ROTATION_SETS = ("published", "sweep", "none")


def add_subcommand(sub) -> None:
    p = sub.add_parser(
        "eval-robustness",
        help="Dice under rotated scans and jittered box / point prompts, per prompt type",
        description="Segment labelled cases as stored, rotated (the published protocol and a sweep about each "
        "world axis) and with jittered box corners and clicks; write the Dice table, its summary and a plot. "
        "Resumable: rerun the same command to continue.",
    )
    add_case_arguments(p)
    m = add_model_arguments(p)
    m.add_argument("--adapter", metavar="FILE", help="an adapter file (segevol_fast.adapters.save_adapter) to run with")
    e = p.add_argument_group("evaluation")
    e.add_argument(
        "--rotations",
        nargs="+",
        choices=ROTATION_SETS,
        default=["published", "sweep"],
        help="published: 45 degrees about the long axis and 0.1 rad about the others; sweep: each of "
        "--sweep-angles about each of --sweep-axes; none: no rotation (default published sweep)",
    )
    e.add_argument(
        "--sweep-angles", nargs="+", type=float, metavar="DEG", help="default -90 -45 -30 -15 -5 5 15 30 45 90"
    )
    e.add_argument("--sweep-axes", default="xyz", metavar="AXES", help="world axes of the sweep, e.g. z (default xyz)")
    e.add_argument(
        "--box-jitter",
        nargs="*",
        type=count,
        metavar="VOXELS",
        help="box corner jitters (default 1 5 10 50; the flag alone: none)",
    )
    e.add_argument(
        "--point-jitter",
        nargs="*",
        type=count,
        metavar="VOXELS",
        help="click jitters (default 1 5 10; the flag alone: none)",
    )
    e.add_argument(
        "--prompts", nargs="+", metavar="TYPE", help="prompt types (default text box points text+box text+points)"
    )
    e.add_argument("--points", type=positive_int, default=1, metavar="N", help="clicks per organ (default 1)")
    e.add_argument("--tta", type=positive_int, metavar="K", help="segment with K views rotated about the long axis")
    e.add_argument("--seed", type=count, default=0, help="seed of clicks and jitters (default 0)")
    e.add_argument("--no-zoom-in", action="store_true", help="zoom-out pass only (faster, coarser)")
    e.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="as segment's")
    e.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    e.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads of torch (default: torch's)")
    e.add_argument("--out", required=True, metavar="DIR", help="output folder (tables, plot, finished cases)")
    e.add_argument("--restart", action="store_true", help="discard finished cases of earlier runs in --out")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_robustness)


def _rotations(args) -> list:
    from ..eval.rotation import PUBLISHED, SWEEP_DEG, sweep

    if "none" in args.rotations and len(args.rotations) > 1:
        raise UsageError(f"--rotations none excludes the others, got {' '.join(args.rotations)}")
    chosen = [PUBLISHED] if "published" in args.rotations else []
    if "sweep" in args.rotations:
        try:
            chosen += sweep(args.sweep_angles or SWEEP_DEG, args.sweep_axes)
        except InvalidArgumentError as exc:
            raise UsageError(f"--sweep-angles / --sweep-axes: {exc}") from None
    return chosen


def run_robustness(args: argparse.Namespace) -> int:
    import torch

    from ..eval.robustness import BOX_JITTER, POINT_JITTER, PROMPTS, robustness

    if not args.data and not args.image:
        raise UsageError("nothing to evaluate: give --data ROOT or --image/--label pairs")
    unknown = [p for p in args.prompts or () if p not in PROMPTS]
    if unknown:
        raise UsageError(f"--prompts: {unknown[0]!r} is not a prompt type; choose from {' '.join(PROMPTS)}")
    rotations = _rotations(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    adapter = adapter_file(args)
    device = resolve_device(args.device)
    cases = cases_from_arguments(args, args.data, args.image, args.label, "evaluation data")
    if args.random_weights:
        loud_random_notice(args.config)
    model = model_from_arguments(args, device)
    report = robustness(
        model,
        cases,
        rotations=rotations,
        box_jitter=BOX_JITTER if args.box_jitter is None else args.box_jitter,
        point_jitter=POINT_JITTER if args.point_jitter is None else args.point_jitter,
        prompts=args.prompts or PROMPTS,
        points=args.points,
        adapter=adapter,
        tta=args.tta,
        out_dir=args.out,
        seed=args.seed,
        zoom_in=not args.no_zoom_in,
        precision=args.precision,
        progress=not args.quiet,
        restart=args.restart,
    )
    print(report.table())
    print(f"wrote {args.out}/robustness.csv, robustness.json and robustness.png")
    return EXIT_OK
