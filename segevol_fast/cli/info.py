"""`segevol-fast info`: versions, build flags, devices and selected kernel backends (paste into bug
reports)."""

from __future__ import annotations

import argparse
import json

from .common import EXIT_OK


def run_info(args: argparse.Namespace) -> int:
    from ..info import format_info, info

    d = info()
    print(json.dumps(d, indent=2, default=str) if args.json else format_info(d))
    return EXIT_OK


def add_subcommand(sub) -> None:
    p = sub.add_parser("info", help="print versions, devices and kernel backends")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_info)
