"""`segevol-fast` / `python -m segevol_fast`: command-line entry point.

Subcommands, one module each:
    segment     segment organs in a NIfTI file or DICOM folder by text, boxes and/or points (segment.py)
    demo        segment liver, spleen and kidneys in the shared real CT (or a synthetic phantom) (demo.py)
    vocabulary  the structure names SegVol is known to have been trained on (text prompts) (vocabulary.py)
    finetune    adapt SegVol to new data, on one process or under torchrun (finetune.py; what --method
                trains and its flags: finetune_methods.py)
    eval-robustness  Dice under rotated scans and jittered prompts (robustness.py)
    info        versions, build flags, devices and selected kernel backends (paste into bug reports) (info.py)
What they share (model, device, file checks, warnings) is in common.py, the labelled-case and base-model
flags of finetune and eval-robustness in cases.py; a run's output in report.py.

Exit codes: 0 success; 1 the input or the run failed (unreadable volume, prompt outside the
volume, memory budget cannot be met, ...); 2 usage or setup error (bad arguments, no weights,
no tokenizer for text prompts, CUDA asked for but absent); 130 interrupted.
"""

from __future__ import annotations

import argparse
import re
import sys

from ..errors import SegVolFastError, UsageError, WeightsNotFoundError
from .common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, RANDOM_NOTE, one_line_warnings, parse_size

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "RANDOM_NOTE", "build_parser", "main", "parse_size"]


def _version() -> str:
    from ..version import __version__

    return __version__


class _Parser(argparse.ArgumentParser):
    """argparse takes "-1GB" (after --max-memory) or "-1e3" (in --box) for an unknown option, since
    only plain negative numbers count as values, and answers "expected one argument". Here any
    "-" followed by a digit or "." is a value (no option of ours looks like that), so our own
    checks answer it ("memory size must be a positive..."). Subcommand parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")


def build_parser() -> argparse.ArgumentParser:
    # imported here, not at the top: `python -m segevol_fast.cli.finetune` (the torchrun target) then
    # runs that module once, as __main__, instead of after a first import by this package
    from . import demo, finetune, info, robustness, segment, vocabulary

    parser = _Parser(
        prog="segevol-fast",
        description="Fast SegVol 3-D medical segmentation.",
        epilog="exit codes: 0 ok, 1 input/run failed, 2 usage or setup error",
    )
    parser.add_argument("--version", action="version", version=f"segevol-fast {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (segment, demo, vocabulary, finetune, robustness, info):  # the order `--help` lists them in
        command.add_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..inference.progress import closing_displays

    try:
        with one_line_warnings(args.command), closing_displays():  # a failed run ends its progress line first
            return args.func(args)
    except (UsageError, WeightsNotFoundError) as exc:
        print(f"segevol-fast {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SegVolFastError as exc:
        print(f"segevol-fast {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
