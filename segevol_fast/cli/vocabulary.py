"""`segevol-fast vocabulary`: the structure names SegVol is known to have been trained on (text
prompts outside them run, with a VocabularyWarning)."""

from __future__ import annotations

import argparse

from .common import EXIT_OK


def run_vocabulary(args: argparse.Namespace) -> int:
    from ..vocabulary import NAMES, format_vocabulary

    print("\n".join(sorted(NAMES)) if args.plain else format_vocabulary())
    return EXIT_OK


def add_subcommand(sub) -> None:
    p = sub.add_parser(
        "vocabulary",
        help="list the structure names SegVol is known to have been trained on",
        description="Structure names known from SegVol's training data (a known subset; see "
        "docs/official-pipeline.md §8). Text prompts outside it run, with a VocabularyWarning.",
    )
    p.add_argument("--plain", action="store_true", help="one name a line, sorted, nothing else")
    p.set_defaults(func=run_vocabulary)
