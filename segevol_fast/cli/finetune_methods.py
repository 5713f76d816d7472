"""What `segevol-fast finetune --method` trains, and its flags. Every adapter is built through the
public API of `segevol_fast.adapters` (docs/adapters.md); "full" trains the whole model.

    lora        LoRA on SegEVOLution's targets, r 16, alpha 16, rsLoRA: the settings of SegEVOLution's
                training runs (its code defaults to r 8 / alpha 8, every job passes 16 / 16)
    bottleneck  Medical SAM Adapter style bottlenecks beside each encoder block's attention and MLP
    mixture     LoRA or bottleneck experts plus the identity expert, routed by modality tag
                (default: SegEVOLution's switch, CT -> identity, MRI -> one expert) or learned
    priors      context priors, one per modality and one per task; the tasks default to the
                structure names of the training and evaluation label maps
    rotation    a rotation-robust branch beside the patch embedding (pair it with --rotation-deg)
    full        every weight of the model

--export merged (LoRA only) also folds the trained LoRA into the weights and writes a plain model.

The flags' defaults are None where they fall back to the config class's own default, so the two
never disagree.
"""

from __future__ import annotations

import argparse
import pathlib

from ..errors import SegVolFastError, UsageError

METHODS = ("lora", "bottleneck", "mixture", "priors", "rotation", "full")
EXPORTS = ("adapter", "merged")
MODALITIES = ("ct", "mri")
IDENTITY = "identity"  # the mixture's base-model expert (adapters.mixture)


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    """--method and the flags of each method."""
    m = p.add_argument_group("method")
    m.add_argument(
        "--method",
        choices=METHODS,
        default="lora",
        help="what to train: lora (default), bottleneck, mixture, priors (context priors), rotation (a rotation-robust "
        "patch branch), or full fine-tuning",
    )
    m.add_argument(
        "--adapter-name", default="default", help="name of the adapter (and of its file, adapter_<name>.safetensors)"
    )
    m.add_argument(
        "--export",
        choices=EXPORTS,
        default="adapter",
        help="adapter (default): the adapter file alone; merged (--method lora): also fold the trained LoRA into "
        "the weights and write OUT/merged, a plain model SegVol.from_pretrained loads with no adapter code",
    )

    lora = p.add_argument_group("LoRA (--method lora, and the experts of --method mixture)")
    lora.add_argument(
        "--lora-rank", type=int, default=16, help="rank r (default 16, as in SegEVOLution's training runs)"
    )
    lora.add_argument("--lora-alpha", type=float, default=16.0, help="alpha (default 16, as in SegEVOLution)")
    lora.add_argument(
        "--rslora",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="scale alpha / sqrt(r) instead of alpha / r (default on: rsLoRA, SegEVOLution's choice)",
    )
    lora.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input (default 0)")

    bottleneck = p.add_argument_group("bottleneck (--method bottleneck, and its experts in --method mixture)")
    bottleneck.add_argument("--bottleneck-dim", type=int, metavar="N", help="bottleneck width (default 64)")
    bottleneck.add_argument(
        "--bottleneck-scale",
        type=float,
        metavar="S",
        help="factor on the adapter beside the MLP (default 0.5, as in Medical SAM Adapter)",
    )
    bottleneck.add_argument(
        "--bottleneck-layout",
        choices=["stream", "msa"],
        help="where the attention-side adapter reads: stream (default; the residual stream after the attention's "
        "residual add) or msa (the attention output before it, as Medical SAM Adapter; MSA's width is "
        "--bottleneck-dim 192)",
    )

    mixture = p.add_argument_group("mixture (--method mixture)")
    mixture.add_argument(
        "--expert-kind", choices=["lora", "bottleneck"], default="lora", help="what each expert is (default lora)"
    )
    mixture.add_argument(
        "--experts", nargs="+", metavar="NAME", default=["mri"], help="expert names (default one expert, mri)"
    )
    mixture.add_argument(
        "--routing",
        choices=["tag", "top1", "soft"],
        default="tag",
        help="tag (default): by the scan's modality, see --tag; top1: a learned router picks one expert "
        "(or the identity) per image; soft: every expert, weighted by the learned router",
    )
    mixture.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="MODALITY=EXPERT",
        help=f"tag routing: the expert a modality goes to, or {IDENTITY} for the base model (repeat; default "
        f"ct={IDENTITY} and each expert named after a modality takes that modality: SegEVOLution's switch, "
        "CT keeps the base model, MRI gets the adapter)",
    )
    mixture.add_argument(
        "--balance-weight",
        type=float,
        metavar="W",
        help="factor on the top1 router's load-balancing loss (default 0.01, Switch Transformer style)",
    )

    priors = p.add_argument_group("context priors (--method priors)")
    priors.add_argument(
        "--priors-variant",
        choices=["additive", "hermes"],
        default="additive",
        help="additive (default): SegEVOLution's, one token per modality and per task; hermes: Hermes' "
        "10 tokens per modality, two-way attention, modality-classification loss",
    )
    priors.add_argument(
        "--tasks",
        nargs="+",
        metavar="NAME",
        help="the tasks (structure names) to learn a prior for (default: every name in the training and "
        "evaluation label maps)",
    )

    rotation = p.add_argument_group("rotation-robust branch (--method rotation)")
    rotation.add_argument(
        "--rotation-group",
        choices=["c4", "box"],
        help="rotations the branch's features ignore: c4 (default; the 90-degree turns about the scan's long "
        "axis) or box (every rotation of the patch box)",
    )
    rotation.add_argument(
        "--rotation-features", type=int, metavar="F", help="invariant features per token (default 32)"
    )


def attach_method(args: argparse.Namespace, model, cases: list) -> None:
    """Attach what --method trains to `model` (nothing for full fine-tuning); `cases` are the
    training and evaluation cases (their modalities and structure names). UsageError for flags
    that do not make a valid adapter."""
    from .. import adapters

    name = args.adapter_name
    try:
        if args.method == "lora":
            adapters.add_lora(model, name, _lora_config(args))
        elif args.method == "bottleneck":
            adapters.add_bottleneck(model, name, _bottleneck_config(args))
        elif args.method == "mixture":
            adapters.add_mixture(model, name, _mixture_config(args, cases))
        elif args.method == "priors":
            adapters.add_context_priors(model, name, _priors_config(args, cases))
        elif args.method == "rotation":
            adapters.add_rotation_branch(model, name, _rotation_config(args))
    except SegVolFastError as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"--method {args.method}: {exc}") from exc


def save_method(args: argparse.Namespace, model, out: pathlib.Path) -> str:
    """Write what was trained into `out`: adapter_<name>.safetensors (`adapters.load_adapter` and
    `segevol-fast segment --adapter` read it) or, for full fine-tuning, model/
    (`SegVol.from_pretrained` reads it). Returns its path."""
    from .. import adapters

    if args.method == "full":
        path = str(out / "model")
        model.save_pretrained(path)
        return path
    return adapters.save_adapter(model, args.adapter_name, out / f"adapter_{args.adapter_name}.safetensors")


def check_export(args: argparse.Namespace) -> None:
    """UsageError, before any training, for an --export the method cannot give."""
    if args.export == "merged" and args.method != "lora":
        why = (
            "--method full already writes the whole model (OUT/model)"
            if args.method == "full"
            else f"a {args.method} adapter cannot be folded into the weights"
        )
        raise UsageError(f"--export merged needs --method lora: {why}")


def export_merged(args: argparse.Namespace, model, out: pathlib.Path) -> str:
    """Fold the trained LoRA into the weights for good (`adapters.merge_and_unload`) and write the
    model to out/merged (`save_pretrained`, read by `SegVol.from_pretrained`). Call it after the
    adapter file is written: the model has no adapter afterwards. Returns the folder."""
    from .. import adapters

    adapters.merge_and_unload(model, args.adapter_name)
    path = str(out / "merged")
    model.save_pretrained(path)
    return path


def _lora_config(args: argparse.Namespace):
    from ..adapters import LoraConfig

    return LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, rslora=args.rslora, dropout=args.lora_dropout)


def _bottleneck_config(args: argparse.Namespace):
    from ..adapters import BottleneckConfig

    given = {"dim": args.bottleneck_dim, "scale": args.bottleneck_scale, "layout": args.bottleneck_layout}
    return BottleneckConfig(**{k: v for k, v in given.items() if v is not None})


def _mixture_config(args: argparse.Namespace, cases: list):
    from ..adapters import MixtureConfig

    tags = _tags(args) if args.routing == "tag" else {}
    if tags:
        missing = sorted({c.modality for c in cases} - set(tags))
        if missing:
            raise UsageError(
                f"--method mixture: no --tag for modality {missing[0]!r} of the training data; "
                f"tags: {', '.join(f'{k}={v}' for k, v in sorted(tags.items()))}"
            )
    expert = {"lora": _lora_config(args)} if args.expert_kind == "lora" else {"bottleneck": _bottleneck_config(args)}
    optional = {} if args.balance_weight is None else {"balance_weight": args.balance_weight}
    return MixtureConfig(
        experts=tuple(args.experts), kind=args.expert_kind, routing=args.routing, tags=tags, **expert, **optional
    )


def _tags(args: argparse.Namespace) -> dict[str, str]:
    """--tag MODALITY=EXPERT pairs, or by default CT -> identity and each expert named after a
    modality -> that modality."""
    if not args.tag:
        tags = {m: m for m in MODALITIES if m in args.experts}
        return {"ct": IDENTITY, **tags}
    tags = {}
    for pair in args.tag:
        modality, sep, expert = pair.partition("=")
        if not sep or not modality or not expert:
            raise UsageError(f"--tag {pair}: expected MODALITY=EXPERT, e.g. mri={args.experts[0]} or ct={IDENTITY}")
        if modality not in MODALITIES:
            raise UsageError(f"--tag {pair}: the modality must be one of {', '.join(MODALITIES)}")
        tags[modality] = expert
    return tags


def _priors_config(args: argparse.Namespace, cases: list):
    from ..adapters import ContextPriorConfig

    names = list(dict.fromkeys(name for c in cases for name in c.label_map.values()))
    missing = [n for n in names if args.tasks and n not in args.tasks]
    if missing:  # the trainer gives every prompt its structure's task prior
        raise UsageError(
            f"--tasks has no {missing[0]!r}, a structure of the training data; add it or leave --tasks out"
        )
    return ContextPriorConfig(variant=args.priors_variant, tasks=tuple(args.tasks or names))


def _rotation_config(args: argparse.Namespace):
    from ..adapters import RotationBranchConfig

    given = {"group": args.rotation_group, "features": args.rotation_features}
    return RotationBranchConfig(**{k: v for k, v in given.items() if v is not None})
