"""What every `segevol-fast` command shares: exit codes, the sample-data folder, the device, the
model (official weights or a loudly announced random one), the checks of weights, tokenizer and
adapter files made before anything slow runs, and warnings printed as one line each."""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import warnings
from typing import Iterator, Optional

from ..errors import UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DATA_ENV = "SEGEVOL_DATA"  # the folder of sample data (the demo CT, labels.json, clip_tokenizer/)
RANDOM_NOTE = "random weights: masks are meaningless"


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '1.5GiB' -> 1610612736, '512MB', '1000' (bytes) -> int bytes.

    The same reading as segment(max_memory=...) (`budget.parse_memory`), reported as argparse's error."""
    from ..errors import MemorySpecError
    from ..inference.budget import parse_memory

    try:
        return parse_memory(text)
    except MemorySpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def segment_fn():
    """inference.segment.segment, imported on first use: `--help` and `info` need neither it nor torch."""
    from ..inference.segment import segment

    return segment


def resolve_device(name: Optional[str]) -> str:
    import torch

    from ..errors import InvalidArgumentError
    from ..inference.arguments import check_device

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_device(name)  # "gpu7", "cuda:5" on a one-GPU machine: a usage error, not a torch RuntimeError
    except InvalidArgumentError as exc:
        raise UsageError(f"--device {name}: {exc}") from None
    return name


def data_dir() -> Optional[pathlib.Path]:
    """$SEGEVOL_DATA, or None: an installed package knows no data folder of its own."""
    folder = os.environ.get(DATA_ENV)
    return pathlib.Path(folder).expanduser() if folder else None


def sample_tokenizer() -> Optional[pathlib.Path]:
    """The sample data's clip_tokenizer/ folder (None without $SEGEVOL_DATA)."""
    data = data_dir()
    return None if data is None else data / "clip_tokenizer"


def loud_random_notice(config_name: str) -> None:
    from tqdm import tqdm  # tqdm.write: the notice goes above a progress line instead of into it

    bar = "!" * 78
    tqdm.write(
        f"{bar}\n!! RANDOM WEIGHTS ({config_name} architecture): the masks are MEANINGLESS.\n"
        "!! This run only exercises the pipeline: timing, memory, files written.\n"
        "!! For real masks get the official weights (run `segevol-fast segment` without\n"
        f"!! --random-weights to see how).\n{bar}",
        file=sys.stderr,
    )


def build_model(weights: Optional[pathlib.Path], config_name: str, tokenizer, device: str):
    """weights None -> a randomly initialised model of the named architecture ('official'/'tiny')."""
    import torch

    from ..model import SegVolConfig
    from ..segvol import SegVol

    if weights is not None:
        return SegVol.from_pretrained(weights, tokenizer=tokenizer, device=device)
    torch.manual_seed(0)  # the same random model on every run, so timings and outputs repeat
    config = SegVolConfig.tiny() if config_name == "tiny" else SegVolConfig()
    return SegVol(config, tokenizer=tokenizer).to(device).eval()


def model_files(args: argparse.Namespace, *, text: bool) -> tuple[Optional[pathlib.Path], Optional[pathlib.Path]]:
    """(weights, tokenizer folder) of the run, found and checked before any scan is read, for one
    scan and cohorts alike: the weights exist (None with --random-weights), a --tokenizer folder
    holds tokenizer files, and text prompts (`text`) have a tokenizer. UsageError otherwise."""
    from ..model.weights import find_tokenizer, find_weights

    tok = pathlib.Path(args.tokenizer).expanduser() if args.tokenizer else None
    if tok is not None and find_tokenizer(tok) != (tok.parent if tok.is_file() else tok):
        raise UsageError(f"--tokenizer {args.tokenizer}: no tokenizer.json (or vocab.json + merges.txt) there")
    weights = None if args.random_weights else find_weights(args.weights, download=args.download)
    tok_dir = find_tokenizer(args.tokenizer, weights, sample_tokenizer())
    if text and tok_dir is None:
        raise UsageError(
            "text prompts need the CLIP tokenizer files (tokenizer.json, or vocab.json + merges.txt): "
            f"put them next to the weights, pass --tokenizer DIR, or set {DATA_ENV} to a folder holding "
            "clip_tokenizer/"
        )
    return weights, tok_dir


def adapter_file(args: argparse.Namespace) -> Optional[str]:
    """--adapter FILE as an absolute path, checked to exist before anything is read."""
    if args.adapter is None:
        return None
    path = pathlib.Path(args.adapter).expanduser()
    if not path.is_file():
        raise UsageError(
            f"--adapter {args.adapter}: no such file; give an adapter file written by "
            "segevol_fast.adapters.save_adapter (.safetensors)"
        )
    return str(path.resolve())


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of the commands that run the model (segment, demo)."""
    p.add_argument(
        "--weights",
        metavar="PATH",
        help="folder or file with the official SegVol weights "
        "(default: $SEGEVOL_WEIGHTS, then the Hugging Face cache of BAAI/SegVol)",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="when no local weights are found, download BAAI/SegVol from the Hugging Face Hub "
        "(needs network access and huggingface_hub)",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(
        "--mode",
        choices=["fast", "exact"],
        default="fast",
        help="fast (default): shared zoom-out encoding, batched windows; exact: the official pipeline step by step",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="skip the weights and use a randomly initialised model (masks are meaningless)",
    )
    p.add_argument("--no-zoom-in", action="store_true", help="zoom-out pass only (faster, coarser)")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="autocast precision (default auto: fast mode in bf16 on CUDA and on CPUs with bf16 "
        "instructions, float32 otherwise; `segevol-fast info` says which)",
    )
    fast = p.add_argument_group("fast mode's zoom-in approximations (docs/benchmarks.md: their measured agreement)")
    fast.add_argument(
        "--approximations",
        choices=["default", "none"],
        default="default",
        help="default: those whose agreement with exact mode was measured to hold; none: the official zoom-in",
    )
    fast.add_argument("--overlap", type=float, help="window overlap of the zoom-in grid (official 0.5)")
    fast.add_argument("--no-token-subset", action="store_true", help="encode every token of a window")
    fast.add_argument("--no-skip-empty", action="store_true", help="encode windows without coarse foreground too")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def approximations_from_args(args: argparse.Namespace):
    """segment(approximations=...) from the run options: "none", or the defaults with the flags'
    changes (a dict)."""
    if args.approximations == "none":
        return "none"
    changes = {}
    if args.overlap is not None:
        changes["overlap"] = args.overlap
    if args.no_token_subset:
        changes["token_subset"] = False
    if args.no_skip_empty:
        changes["skip_empty"] = False
    return changes or "default"


@contextlib.contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """While a command runs, print each warning as `segevol-fast <command>: warning: <message>`
    (above any progress line), not Python's "file:line: Category: message" plus a source line;
    code that imports segevol_fast keeps the standard form."""
    saved = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        from tqdm import tqdm

        text = " ".join(str(message).split())  # one line, whatever the message holds
        tqdm.write(f"segevol-fast {command}: warning: {text}", file=file or sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        if warnings.showwarning is show:
            warnings.showwarning = saved
