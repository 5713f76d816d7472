"""`segevol-fast finetune`: fine-tune SegVol (LoRA by default; bottleneck adapters, a mixture of
adapters, context priors or the whole model with --method, see finetune_methods.py) on a dataset
folder or image/label files, on one process or under torchrun.

    segevol-fast finetune --data /data/Task07_Pancreas --weights BAAI/SegVol --steps 2000 --out runs/p
    segevol-fast finetune --image mr.nii.gz --label mr_labels.nii.gz --label-map labels.json \\
        --label-map-key mr --modality mri --random-weights --config tiny --tokenizer clip_tokenizer \\
        --steps 50 --out runs/toy
    torchrun --nproc-per-node 4 -m segevol_fast finetune ...            # DDP: the same command

Writes into --out: train_log.csv/.jsonl, eval_log.* and best/ (the best validation's checkpoint,
best.json and adapter file; with --eval-data / --eval-image, flags in finetune_validation.py),
checkpoint_<step>.pt (resume with --resume), and the result: adapter_<name>.safetensors (every
adapter method; `adapters.load_adapter` and `segment --adapter` read it) or model/ (full
fine-tuning, `SegVol.from_pretrained` reads it); with --export merged also merged/, the LoRA folded
into a plain model. It prints where the best validation's weights are, and whether the run stopped
early, then the run's summary as one JSON line.

`python -m segevol_fast.cli.finetune` runs the same command directly (the torchrun target of the
distributed tests).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from ..errors import SegVolFastError, UsageError
from .cases import add_case_arguments, add_model_arguments, cases_from_arguments, model_from_arguments
from .finetune_methods import add_method_arguments, attach_method, check_export, export_merged, save_method
from .finetune_validation import (
    add_validation_arguments,
    best_line,
    best_summary,
    positive_int,
    result_name,
    validation_fields,
)


def add_finetune_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the finetune options to a (sub)parser and return it."""
    d = add_case_arguments(p)
    d.add_argument(
        "--eval-data", nargs="+", action="extend", metavar="ROOT", default=[], help="held-out dataset folders"
    )
    d.add_argument("--eval-image", action="append", default=[], metavar="PATH", help="held-out image (repeat)")
    d.add_argument("--eval-label", action="append", default=[], metavar="PATH", help="its label map (repeat)")
    d.add_argument("--rotation-deg", type=float, default=0.0, help="random rotation augmentation (degrees)")

    add_model_arguments(p)
    add_method_arguments(p)

    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=4, help="images per step, across all processes")
    t.add_argument(
        "--accumulate",
        type=positive_int,
        default=1,
        metavar="N",
        help="micro-batches per step: each process holds batch-size / (processes * N) images at a time and "
        "the step's gradient is the whole batch's (default 1)",
    )
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--weight-decay", type=float, default=1e-5)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--min-lr-ratio", type=float, default=0.0)
    t.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (default off)")
    t.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    t.add_argument("--grad-checkpointing", action="store_true")
    t.add_argument("--seed", type=int, default=2023)
    t.add_argument("--categories-per-image", type=int, default=None, help="default all non-empty (official)")
    t.add_argument("--mixes", nargs="+", metavar="MIX", help="prompt mixes (default the official six)")
    t.add_argument("--box-jitter", type=int, default=0, help="box jitter in training prompts (voxels)")
    t.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end only)")
    t.add_argument("--log-every", type=int, default=1)
    t.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log to OUT/tensorboard (needs the tensorboard package: pip install 'segevol_fast[tensorboard]')",
    )
    t.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    t.add_argument("--device", choices=["cpu", "cuda"], help="default CUDA when available")
    t.add_argument("--out", required=True, metavar="DIR", help="output folder (logs, checkpoints, the adapter)")
    t.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint_<step>.pt")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_validation_arguments(p)
    return p


def add_subcommand(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="adapt SegVol to new data (LoRA, bottleneck, mixture, context priors or full fine-tuning; "
        "runs under torchrun)",
        description="Fine-tune on Decathlon / nnU-Net / M3D-Seg folders or image+label pairs with the "
        "official loss and prompt mix; `torchrun --nproc-per-node N segevol-fast finetune ...` "
        "runs the same command data-parallel.",
    )
    add_finetune_arguments(p)
    p.set_defaults(func=run_finetune)


# ------------------------------------------------------------------------------ building blocks
def _train_config(args):
    from ..train.trainer import TrainConfig

    fields = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "warmup_steps": args.warmup_steps,
        "min_lr_ratio": args.min_lr_ratio,
        "grad_clip": args.grad_clip,
        "amp": args.amp,
        "grad_checkpointing": args.grad_checkpointing,
        "seed": args.seed,
        "categories_per_image": args.categories_per_image,
        "box_jitter": args.box_jitter,
        "accumulate": args.accumulate,
        "save_every": args.save_every,
        "log_every": args.log_every,
        "tensorboard": args.tensorboard,
        "out_dir": args.out,
        "workers": args.workers,
        **validation_fields(args),
    }
    if args.mixes:
        fields["mixes"] = tuple(args.mixes)
    try:
        return TrainConfig(**fields)
    except SegVolFastError as exc:
        raise UsageError(str(exc)) from exc


# ------------------------------------------------------------------------------ the command
def run_finetune(args: argparse.Namespace) -> int:
    """Run `segevol-fast finetune`; returns the exit code (0). Errors are segevol_fast errors
    (UsageError for bad arguments), reported by the caller."""
    from .. import distributed
    from ..train.datasets import SegmentationDataset
    from ..train.trainer import Trainer

    if not args.data and not args.image:
        raise UsageError("nothing to train on: give --data ROOT or --image/--label pairs")
    config = _train_config(args)
    check_export(args)
    env = distributed.init_from_env(device=args.device)
    clean = False
    try:
        train_cases = cases_from_arguments(args, args.data, args.image, args.label, "training data")
        eval_cases = cases_from_arguments(args, args.eval_data, args.eval_image, args.eval_label, "evaluation data")
        model = model_from_arguments(args, env.device)
        attach_method(args, model, train_cases + eval_cases)
        size = model.config.spatial_size
        train = SegmentationDataset(train_cases, size, train=True, seed=args.seed, rotation_deg=args.rotation_deg)
        evals = SegmentationDataset(eval_cases, size, train=False) if eval_cases else None
        trainer = Trainer(model, config, train, evals)
        if args.resume:
            trainer.resume(args.resume)
        trainer.fit(progress=not args.quiet)
        if distributed.is_main():
            _write_result(args, model, trainer)
        clean = True
    finally:
        distributed.shutdown(clean)
    return 0


def _write_result(args, model, trainer) -> None:
    """Write the result (and the merged model with --export merged), then print a line for a person
    about the best validation and, last, the run's summary as one JSON line."""
    out = pathlib.Path(args.out)
    result = save_method(args, model, out)
    best = best_summary(trainer, result_name(result))
    summary = {
        "steps": trainer.step,
        "result": str(result),
        "last_loss": trainer.history[-1]["loss"] if trainer.history else None,
        "eval": trainer.eval_history[-1] if trainer.eval_history else None,
        "best": best,
        "stopped_early": trainer.stopped_early,
    }
    if args.export == "merged":
        summary["merged"] = export_merged(args, model, out)
    if best is not None:
        print(best_line(best, trainer.stopped_early, trainer.step))
    print(json.dumps(summary))


def main(argv: list[str] | None = None) -> int:
    parser = add_finetune_arguments(
        argparse.ArgumentParser(prog="segevol-fast finetune", description="Fine-tune SegVol.")
    )
    args = parser.parse_args(argv)
    try:
        return run_finetune(args)
    except UsageError as exc:
        print(f"segevol-fast finetune: error: {exc}", file=sys.stderr)
        return 2
    except SegVolFastError as exc:
        print(f"segevol-fast finetune: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
