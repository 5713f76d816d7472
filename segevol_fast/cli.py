"""`segevol-fast` / `python -m segevol_fast`: command-line entry point.

Subcommands:
    segment  segment organs in a NIfTI file or DICOM folder by text, boxes and/or points
    demo     segment liver, spleen and kidneys in the shared real CT (or a synthetic phantom)
    vocabulary  the structure names SegVol is known to have been trained on (text prompts)
    info     versions, build flags, devices and selected kernel backends (paste into bug reports)

Exit codes: 0 success; 1 the input or the run failed (unreadable volume, prompt outside the
volume, memory budget cannot be met, ...); 2 usage or setup error (bad arguments, no weights,
no tokenizer for text prompts, CUDA asked for but absent); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import sys
import warnings
from typing import Iterator, Optional

from .errors import SegVolFastError, UsageError, WeightsNotFoundError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DATA_ENV = "SEGEVOL_DATA"  # the folder of sample data (the demo CT, labels.json, clip_tokenizer/)
DEMO_FILE = "ct_abdomen_sm.nii.gz"
# prompt text -> TotalSegmentator class name in labels.json "ct" (and in the phantom)
DEMO_ORGANS = {"liver": "liver", "spleen": "spleen", "left kidney": "kidney_left", "right kidney": "kidney_right"}
RANDOM_NOTE = "random weights: masks are meaningless"


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '1.5GiB' -> 1610612736, '512MB', '1000' (bytes) -> int bytes.

    The same reading as segment(max_memory=...) (`budget.parse_memory`), reported as argparse's error."""
    from .errors import MemorySpecError
    from .inference.budget import parse_memory

    try:
        return parse_memory(text)
    except MemorySpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---------------------------------------------------------------------- shared helpers
def _segment_fn():
    # lazy: importing the inference stack (and torch) is not needed for `--help` or `info`
    from .inference.segment import segment

    return segment


def _resolve_device(name: Optional[str]) -> str:
    import torch

    from .errors import InvalidArgumentError
    from .inference.arguments import check_device

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_device(name)  # "gpu7", "cuda:5" on a one-GPU machine: a usage error, not a torch RuntimeError
    except InvalidArgumentError as exc:
        raise UsageError(f"--device {name}: {exc}") from None
    return name


def _peak_memory_bytes(device: str) -> int:
    """Process peak: CUDA max allocated on a GPU, else the max resident set size."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated())
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


def _loud_random_notice(config_name: str) -> None:
    from tqdm import tqdm  # tqdm.write: the notice goes above a progress line instead of into it

    bar = "!" * 78
    tqdm.write(
        f"{bar}\n!! RANDOM WEIGHTS ({config_name} architecture): the masks are MEANINGLESS.\n"
        "!! This run only exercises the pipeline: timing, memory, files written.\n"
        "!! For real masks get the official weights (run `segevol-fast segment` without\n"
        f"!! --random-weights to see how).\n{bar}",
        file=sys.stderr,
    )


def _build_model(weights: Optional[pathlib.Path], config_name: str, tokenizer, device: str):
    """weights None -> a randomly initialised model of the named architecture ('official'/'tiny')."""
    import torch

    from .model import SegVolConfig
    from .segvol import SegVol

    if weights is not None:
        return SegVol.from_pretrained(weights, tokenizer=tokenizer, device=device)
    torch.manual_seed(0)  # the same random model on every run, so timings and outputs repeat
    config = SegVolConfig.tiny() if config_name == "tiny" else SegVolConfig()
    return SegVol(config, tokenizer=tokenizer).to(device).eval()


def _model_files(args: argparse.Namespace, *, text: bool) -> tuple[Optional[pathlib.Path], Optional[pathlib.Path]]:
    """(weights, tokenizer folder) of the run, found and checked before any scan is read, for one
    scan and cohorts alike: the weights exist (None with --random-weights), a --tokenizer folder
    holds tokenizer files, and text prompts (`text`) have a tokenizer. UsageError otherwise."""
    from .model.weights import find_tokenizer, find_weights

    tok = pathlib.Path(args.tokenizer).expanduser() if args.tokenizer else None
    if tok is not None and find_tokenizer(tok) != (tok.parent if tok.is_file() else tok):
        raise UsageError(f"--tokenizer {args.tokenizer}: no tokenizer.json (or vocab.json + merges.txt) there")
    weights = None if args.random_weights else find_weights(args.weights, download=args.download)
    tok_dir = find_tokenizer(args.tokenizer, weights, _sample_tokenizer())
    if text and tok_dir is None:
        raise UsageError(
            "text prompts need the CLIP tokenizer files (tokenizer.json, or vocab.json + merges.txt): "
            f"put them next to the weights, pass --tokenizer DIR, or set {DATA_ENV} to a folder holding "
            "clip_tokenizer/"
        )
    return weights, tok_dir


def _adapter_file(args: argparse.Namespace) -> Optional[str]:
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


def _display(args: argparse.Namespace):
    """The run's one progress display (drawn unless --quiet; timed either way)."""
    from .inference.progress import Progress

    return Progress(enabled=not args.quiet)


def _report(result, seconds: float, device: str, out: pathlib.Path, timings: Optional[dict] = None) -> None:
    """Volumes, time (`timings`: the whole run's stages, loading and saving included; default the
    result's own), peak memory, notes."""
    width = max([len(k) for k in result.masks] + [8])
    for label, ml in result.volumes_ml().items():
        print(f"  {label:<{width}} {ml:10.1f} mL")
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in (result.timings if timings is None else timings).items())
    print(f"time: {seconds:.2f} s" + (f" ({stages})" if stages else ""))
    peak = result.peak_memory_bytes
    what = "GPU max allocated" if device.startswith("cuda") else "process max RSS"
    line = f"peak memory: {_peak_memory_bytes(device) / 2**20:.0f} MiB ({what})"
    if peak is not None:
        line += f"; segment() reports {peak / 2**20:.0f} MiB"
    print(line)
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {out}")


def _output_path(out: pathlib.Path) -> pathlib.Path:
    """Check that the result can be written to `out` (OutputError otherwise) before anything slow runs."""
    from .io.output import check_output_path

    check_output_path(out)
    return out


def _write(result, out: pathlib.Path, volume, preview: bool, random_weights: bool) -> None:
    """Masks, summary and preview in one all-or-nothing transaction (`segevol_fast.io.output`)."""
    if random_weights:  # the CLI knows it built a random model: say so in every file written
        result.random_weights = True
    result.save(out, preview=preview, volume=volume)


def _input_stem(path: str) -> str:
    """Default output folder name: a NIfTI file's name without .nii(.gz), a DICOM series folder's
    name (also when one of its files is given), file-name safe; '.' gives the current folder's name."""
    from .inference.result_files import safe_label
    from .io.paths import is_nifti_path

    p = pathlib.Path(os.path.abspath(path))
    if is_nifti_path(p):
        stem = re.sub(r"\.nii(\.gz)?$", "", p.name, flags=re.I)
    else:
        stem = p.parent.name if p.is_file() else p.name
    return safe_label(stem) if stem else "input"


# ---------------------------------------------------------------------- segment
def _prompt_arguments(args: argparse.Namespace) -> dict:
    """segment()'s text / box / points / point_labels from the flags, checked (PromptError)."""
    import numpy as np

    from .inference.prompts import check_prompt_arguments

    prompts = dict(
        text=args.text or None,
        box=np.asarray(args.box, dtype=np.float64) if args.box else None,
        points=np.asarray(args.points, dtype=np.float64) if args.points else None,
        # floats: "1.0" (the official code's labels) is accepted, 0.5 refused with a clear message
        point_labels=np.asarray(args.point_labels, dtype=np.float64) if args.point_labels else None,
    )
    check_prompt_arguments(**prompts)
    return prompts


def _cmd_segment(args: argparse.Namespace) -> int:
    from .inference.adapter_scope import adapter_for, file_note
    from .inference.cohort import MANIFEST_SUFFIXES, is_cohort_input
    from .io import load_volume

    has = args.text or args.box or args.points
    manifest = pathlib.Path(args.input).suffix.lower() in MANIFEST_SUFFIXES
    if is_cohort_input(args.input) and (has or manifest):  # a manifest's rows may carry their own prompts
        return _cmd_cohort(args, _prompt_arguments(args) if has else {})
    if not has:
        raise UsageError("give at least one prompt: --text NAME..., --box i0 j0 k0 i1 j1 k1, or --points i j k")
    if args.point_labels and not args.points:
        raise UsageError("--point-labels given without --points")
    prompts = _prompt_arguments(args)  # checked here: a bad prompt fails before the scan and model load
    out = _output_path(pathlib.Path(args.out) if args.out else pathlib.Path("segevol_out") / _input_stem(args.input))
    device = _resolve_device(args.device)
    adapter_file = _adapter_file(args)
    weights, tok_dir = _model_files(args, text=bool(args.text))
    display = _display(args)  # one progress display for the run; its timings include loading and saving
    display.stage("load scan")
    volume = load_volume(args.input, modality=args.modality, series=args.series)
    if weights is None:
        _loud_random_notice(args.config)
    display.stage("load model")
    model = _build_model(weights, args.config, tok_dir, device)
    adapter = adapter_for(model, adapter_file, {})
    result = _segment_fn()(
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
        adapter=adapter,
    )
    if adapter_file is not None:
        result.notes.append(file_note(adapter, adapter_file))
    if weights is None and not any("meaningless" in n for n in result.notes):
        result.notes.append(RANDOM_NOTE)
    display.stage("save")
    _write(result, out, volume, args.preview, random_weights=weights is None)
    display.close()
    _report(result, display.seconds, device, out, display.timings)
    return EXIT_OK


def _cmd_cohort(args: argparse.Namespace, prompts: dict) -> int:
    """`segevol-fast segment FOLDER|GLOB|MANIFEST`: every scan into <out>/<name>/, resumable, with
    <out>/cohort_summary.csv; exit 1 when some scan failed (all the others are still done)."""
    from . import distributed
    from .inference.cohort import SUMMARY, cohort_items, segment_cohort

    items = cohort_items(args.input, **prompts, modality=args.modality, adapter=_adapter_file(args))
    out = pathlib.Path(args.out) if args.out else pathlib.Path("segevol_out") / "cohort"
    device = _resolve_device(args.device)
    weights, tok_dir = _model_files(args, text=any(it.text for it in items if it.error is None))
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
        _loud_random_notice(args.config)
    model = _build_model(weights, args.config, tok_dir, device)
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


# ---------------------------------------------------------------------- demo
def _data_dir() -> Optional[pathlib.Path]:
    """$SEGEVOL_DATA, or None: an installed package knows no data folder of its own."""
    folder = os.environ.get(DATA_ENV)
    return pathlib.Path(folder).expanduser() if folder else None


def _sample_tokenizer() -> Optional[pathlib.Path]:
    """The sample data's clip_tokenizer/ folder (None without $SEGEVOL_DATA)."""
    data = _data_dir()
    return None if data is None else data / "clip_tokenizer"


def _demo_input():
    """(volume, ground-truth labels (X, Y, Z), {class name: id}, description)."""
    import numpy as np

    from .io import load_volume

    data = _data_dir()
    ct = None if data is None else data / DEMO_FILE
    if ct is not None and ct.is_file() and (data / "labels.json").is_file():
        import nibabel as nib

        labels = np.asarray(nib.load(str(data / DEMO_FILE.replace(".nii.gz", "_labels.nii.gz"))).dataobj)
        ids = {name: int(i) for i, name in json.loads((data / "labels.json").read_text())["ct"].items()}
        return load_volume(ct, modality="ct"), labels, ids, f"real CT {ct}"
    from .phantom import make_phantom

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


def _cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses

    from .model.weights import find_tokenizer, find_weights

    out = _output_path(pathlib.Path(args.out))
    device = _resolve_device(args.device)
    weights = None
    if not args.random_weights:
        try:
            weights = find_weights(args.weights, download=args.download)
        except WeightsNotFoundError:
            if args.weights:  # asked for these weights explicitly: do not silently go random
                raise
    config_name = "official" if args.full else "tiny"
    display = _display(args)  # one progress display for the run; its timings include loading and saving
    display.stage("load scan")
    volume, labels, ids, source = _demo_input()
    organs = [o for o in DEMO_ORGANS if (labels == ids.get(DEMO_ORGANS[o], -1)).any()]
    display.print(
        f"demo input: {source}, shape {volume.shape}, spacing {tuple(round(s, 3) for s in volume.spacing)} mm"
    )
    if weights is None:
        _loud_random_notice(config_name)
    else:
        display.print(f"weights: {weights}")
    display.stage("load model")
    model = _build_model(weights, config_name, find_tokenizer(weights, _sample_tokenizer()), device)
    use_text = model.tokenizer is not None
    if not use_text:
        display.print("no CLIP tokenizer found: prompting with the ground-truth boxes instead of text", file=sys.stderr)
    result = _segment_fn()(
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
    _write(result, out, volume, preview=True, random_weights=weights is None)
    display.close()
    for organ, mask in result.masks.items():
        print(f"  Dice vs ground truth, {organ:<12} {_dice(mask, labels == ids[DEMO_ORGANS[organ]]):.3f}")
    _report(result, display.seconds, device, out, display.timings)
    if weights is None:
        print(f"!! {RANDOM_NOTE.upper()} !!", file=sys.stderr)
    return EXIT_OK


def _cmd_vocabulary(args: argparse.Namespace) -> int:
    from .vocabulary import NAMES, format_vocabulary

    print("\n".join(sorted(NAMES)) if args.plain else format_vocabulary())
    return EXIT_OK


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import format_info, info

    d = info()
    print(json.dumps(d, indent=2, default=str) if args.json else format_info(d))
    return EXIT_OK


# ---------------------------------------------------------------------- parser
def _add_common(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _version() -> str:
    from .version import __version__

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
    parser = _Parser(
        prog="segevol-fast",
        description="Fast SegVol 3-D medical segmentation.",
        epilog="exit codes: 0 ok, 1 input/run failed, 2 usage or setup error",
    )
    parser.add_argument("--version", action="version", version=f"segevol-fast {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

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
        "(LoRA, bottleneck or mixture; .safetensors) to run with; in a cohort, a manifest row's adapter "
        "column (a file, relative to the manifest's folder) replaces it for that scan",
    )
    p.add_argument("--preview", action="store_true", help="also write a PNG slice montage")
    p.add_argument("--probabilities", action="store_true", help="also write per-mask probability maps (float32)")
    _add_common(p)
    p.set_defaults(func=_cmd_segment)

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
    _add_common(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "vocabulary",
        help="list the structure names SegVol is known to have been trained on",
        description="Structure names known from SegVol's training data (a known subset; see "
        "docs/official-pipeline.md §8). Text prompts outside it run, with a VocabularyWarning.",
    )
    p.add_argument("--plain", action="store_true", help="one name a line, sorted, nothing else")
    p.set_defaults(func=_cmd_vocabulary)

    p = sub.add_parser(
        "finetune",
        help="adapt SegVol to new data (LoRA or full fine-tuning; runs under torchrun)",
        description="Fine-tune on Decathlon / nnU-Net / M3D-Seg folders or image+label pairs with the "
        "official loss and prompt mix; `torchrun --nproc-per-node N segevol-fast finetune ...` "
        "runs the same command data-parallel.",
    )
    from .train.cli_finetune import add_finetune_arguments, run_finetune

    add_finetune_arguments(p)
    p.set_defaults(func=run_finetune)

    p = sub.add_parser("info", help="print versions, devices and kernel backends")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)
    return parser


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .inference.progress import closing_displays

    try:
        with _one_line_warnings(args.command), closing_displays():  # a failed run ends its progress line first
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


if __name__ == "__main__":
    sys.exit(main())
