"""The data and model arguments of the commands that read labelled cases (`finetune`,
`eval-robustness`): dataset folders or image/label pairs with a label map, and a base model from
weights or a random one of a named architecture."""

from __future__ import annotations

import argparse
import json
import pathlib

from ..errors import UsageError

CONFIGS = ("official", "tiny", "small")


def add_case_arguments(p: argparse.ArgumentParser, title: str = "data"):
    """--data, --image/--label, --label-map(-key) and --modality; returns the argument group, for
    the command's own data flags."""
    d = p.add_argument_group(title)
    d.add_argument(
        "--data",
        nargs="+",
        action="extend",
        metavar="ROOT",
        default=[],
        help="dataset folders (MSD / nnU-Net v2 dataset.json, or an M3D-Seg code folder)",
    )
    d.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeat; pairs with --label)")
    d.add_argument("--label", action="append", default=[], metavar="PATH", help="its label map (repeat)")
    d.add_argument("--label-map", metavar="JSON", help="label id -> name for --image/--label, a JSON file")
    d.add_argument("--label-map-key", metavar="KEY", help="take the map under this key of the JSON (e.g. ct, mr)")
    d.add_argument("--modality", choices=["ct", "mri"], help="modality of --image cases (and an override for --data)")
    return d


def add_model_arguments(p: argparse.ArgumentParser):
    """--weights or --random-weights (with --config and --model-seed), and --tokenizer; returns the
    argument group."""
    m = p.add_argument_group("model")
    src = m.add_mutually_exclusive_group()
    src.add_argument("--weights", metavar="PATH", help="base weights (a folder, .pth, safetensors, or BAAI/SegVol)")
    src.add_argument("--random-weights", action="store_true", help="start from a random model (tests, toy runs)")
    m.add_argument("--config", choices=CONFIGS, default="official", help="architecture for --random-weights")
    m.add_argument("--tokenizer", metavar="DIR", help="CLIP tokenizer folder (default: next to the weights)")
    m.add_argument("--model-seed", type=int, default=0, help="seed of --random-weights")
    return m


def label_map(args: argparse.Namespace) -> dict:
    """The --label-map JSON (under --label-map-key when given): label id -> name."""
    if not args.label_map:
        raise UsageError("--image/--label cases need --label-map JSON (label id -> name)")
    path = pathlib.Path(args.label_map)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--label-map {path}: cannot read a JSON object ({exc})") from exc
    if args.label_map_key is not None:
        if args.label_map_key not in data:
            raise UsageError(f"--label-map {path} has no key {args.label_map_key!r}; it has {sorted(data)[:10]}")
        data = data[args.label_map_key]
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise UsageError(f"--label-map {path} must map label ids to names (use --label-map-key for nested maps)")
    return data


def cases_from_arguments(args: argparse.Namespace, roots, images, labels, what: str) -> list:
    """The `Case`s of dataset folders `roots` and of (image, label) file pairs, in that order."""
    from ..train.cases import cases_from_files, discover_cases

    if len(images) != len(labels):
        raise UsageError(f"{what}: {len(images)} images but {len(labels)} label maps; give them in pairs")
    cases = []
    for root in roots:
        cases += discover_cases(root, **({"modality": args.modality} if args.modality else {}))
    if images:
        if args.modality is None:
            raise UsageError("--image cases need --modality ct|mri")
        cases += cases_from_files(
            list(zip(images, labels)), label_map(args), args.modality, pathlib.Path(images[0]).parent.name or "files"
        )
    return cases


def model_from_arguments(args: argparse.Namespace, device):
    """The SegVol of --weights, or a random one of --config seeded by --model-seed, on `device`."""
    import torch

    from ..model import SegVolConfig
    from ..segvol import SegVol  # the network with segment(): what segment validation runs

    if args.random_weights:
        if args.config == "small" and not hasattr(SegVolConfig, "small"):
            raise UsageError("--config small is not available in this version; use tiny or official")
        config = SegVolConfig() if args.config == "official" else getattr(SegVolConfig, args.config)()
        torch.manual_seed(args.model_seed)
        model = SegVol(config, tokenizer=args.tokenizer)
    elif args.weights:
        model = SegVol.from_pretrained(args.weights, tokenizer=args.tokenizer)
    else:
        raise UsageError("give --weights PATH (the base model) or --random-weights")
    return model.to(device)
