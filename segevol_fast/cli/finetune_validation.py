"""How `segevol-fast finetune` validates on held-out data, keeps its best checkpoint and stops
early: the flags, the `TrainConfig` fields they set, and the run summary's account of the best
validation (docs/adapters.md, "Validation, best checkpoint and run logs").

`--eval-mode segment` validates by what a user runs, `model.segment()`'s zoom-out-zoom-in, and is
the Dice worth choosing a checkpoint by. The default stays `TrainConfig`'s "resized", the cheap
check: segment validation runs one zoom-in per organ and prompt type (per click for points), which
on a CPU takes many minutes for one abdominal scan with 30 organs, even with the tiny model, so a
default that every run, quick check and test pays would make the command slow where it was fast.
Every flag's default is the `TrainConfig` default.
"""

from __future__ import annotations

import argparse
import math
import pathlib

EVAL_MODES = ("resized", "segment")
EVAL_PROMPTS = ("text", "box", "point", "jittered_box")  # segment: text box point; resized: text box jittered_box
BEST_METRICS = ("dice", *(f"dice_{p}" for p in EVAL_PROMPTS))


def positive_int(text: str) -> int:
    value = _number(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def count(text: str) -> int:
    value = _number(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def non_negative(text: str) -> float:
    value = _number(text, float, "a number")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def add_validation_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of validation (with --eval-data / --eval-image), the best checkpoint and early stopping."""
    v = p.add_argument_group("validation (with --eval-data or --eval-image)")
    v.add_argument(
        "--eval-every", type=count, default=0, metavar="N", help="steps between validations (0: at the end only)"
    )
    v.add_argument(
        "--eval-mode",
        choices=EVAL_MODES,
        default="resized",
        help="resized (default): each held-out scan resized whole to the model's window and decoded once, cheap "
        "but blind to the zoom-in; segment: model.segment()'s zoom-out-zoom-in on each scan as stored, scored "
        "on its own grid, as you will run it (recommended for choosing a checkpoint; not the default because "
        "it runs a zoom-in per organ and prompt type: minutes per scan on a CPU, see --no-eval-zoom-in and "
        "--eval-prompts)",
    )
    v.add_argument(
        "--eval-prompts",
        nargs="+",
        choices=EVAL_PROMPTS,
        metavar="PROMPT",
        help="prompt types to score (default all of the mode's: segment text box point; resized text box jittered_box)",
    )
    v.add_argument(
        "--eval-points",
        type=positive_int,
        default=1,
        metavar="N",
        help="positive clicks per organ of the point prompt (segment; default 1)",
    )
    v.add_argument(
        "--eval-zoom-in",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="segment validation runs the zoom-in as segment() does (default); --no-eval-zoom-in: zoom-out "
        "only, faster",
    )
    v.add_argument(
        "--eval-jitter", type=count, default=5, metavar="N", help="voxels of the jittered-box prompt (resized)"
    )
    best = "what picks the best validation: dice (default, the mean over organs and prompt types) or dice_<prompt>"
    v.add_argument("--best-metric", choices=BEST_METRICS, default="dice", help=best + ", a validated prompt type")
    v.add_argument(
        "--save-best",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write OUT/best/ (the checkpoint, best.json, the adapter file) at every new best (default on)",
    )
    v.add_argument(
        "--patience",
        type=count,
        default=0,
        metavar="N",
        help="stop after N validations in a row without a new best (default 0: never stop early)",
    )
    v.add_argument(
        "--min-delta",
        type=non_negative,
        default=0.0,
        metavar="D",
        help="how much a validation must beat the best by to count as a new best (default 0)",
    )


def validation_fields(args: argparse.Namespace) -> dict:
    """The TrainConfig fields the validation flags set; UsageError, naming the flags, for prompt
    types the mode does not score and a --best-metric of a prompt type not validated."""
    from ..errors import UsageError
    from ..train.validation import MODES

    scored = MODES[args.eval_mode]
    prompts = scored if args.eval_prompts is None else tuple(args.eval_prompts)
    other = [k for k in prompts if k not in scored]
    if other:
        raise UsageError(
            f"--eval-prompts {other[0]}: --eval-mode {args.eval_mode} scores {', '.join(scored)}"
            f" ({other[0]} needs --eval-mode {next(m for m in MODES if other[0] in MODES[m])})"
        )
    if len(set(prompts)) != len(prompts):
        raise UsageError(f"--eval-prompts {' '.join(prompts)}: name each prompt type once")
    metrics = ["dice", *(f"dice_{k}" for k in prompts)]
    if args.best_metric not in metrics:
        raise UsageError(
            f"--best-metric {args.best_metric}: that prompt type is not validated; use one of {', '.join(metrics)}"
        )
    return {
        "eval_every": args.eval_every,
        "eval_mode": args.eval_mode,
        "eval_prompts": None if args.eval_prompts is None else tuple(args.eval_prompts),
        "eval_points": args.eval_points,
        "eval_zoom_in": args.eval_zoom_in,
        "eval_jitter": args.eval_jitter,
        "best_metric": args.best_metric,
        "save_best": args.save_best,
        "patience": args.patience,
        "min_delta": args.min_delta,
    }


def best_summary(trainer, result_name: str) -> dict | None:
    """The best validation of a finished run: step, metric, value, and where its weights are
    (OUT/best/<result_name>, or its checkpoint.pt when the method wrote no adapter file; None
    with --no-save-best). None when the run never validated."""
    if trainer.best.best_step is None:
        return None
    folder = trainer.best_dir()
    saved = None
    if trainer.config.save_best and folder is not None:
        saved = folder / result_name
        saved = str(saved if saved.is_file() else folder / "checkpoint.pt")
    return {
        "step": trainer.best.best_step,
        "metric": trainer.config.best_metric,
        "value": trainer.best.best,
        "path": saved,
    }


def best_line(best: dict, stopped_early: bool, step: int) -> str:
    """One line for a person: the best validation and where it is, and whether the run stopped early."""
    where = f" -> {best['path']}" if best["path"] else " (not saved: --no-save-best)"
    stop = f"; stopped early at step {step} (--patience)" if stopped_early else ""
    return f"best validation: {best['metric']} {best['value']:.4f} at step {best['step']}{where}{stop}"


def result_name(path: str) -> str:
    """The file name of the method's result (adapter_<name>.safetensors), as best/ holds it too."""
    return pathlib.Path(path).name
