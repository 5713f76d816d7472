"""The adaptation study in miniature: a base trained on CT, adapted to MRI by every method, scored
on MRI volumes no adaptation step saw, over several seeds.

    python bench/adaptation_study.py                      # small config, shared data, 3 seeds, ~37 min on 2 cores
    python bench/adaptation_study.py --quick              # a few steps, one seed: checks the pipeline
    python bench/adaptation_study.py --base-only          # (re)train and save only the CT base
    python bench/adaptation_study.py --config official --weights SegVol_v1.pth \
        --ct-root CT_DATASET --mr-root MR_DATASET --device cuda

1. Base: `SegVolConfig.small()` from random weights (the first seed), every parameter trained on
   the shared CT volumes (ct_abdomen_sm and the DICOM series) with the official loss and prompt
   mix; saved to <out>/base (`save_pretrained`; the command regenerates it bit for bit on the same
   machine) and reused by later runs. With --weights the base is loaded instead.
2. Methods, each from the same base, each seed: LoRA, bottleneck adapters and the tag-routed
   mixture (MRI -> its expert, CT -> the identity) train on the adaptation MRI; the learned top-1
   router, both context priors and a control, LoRA trained on CT + MRI, train on CT + MRI drawn
   modality-balanced. Equal budgets: every method takes the same number of optimiser steps
   (--adapt-steps) of the same number of images per step (--batch-size), so a CT + MRI method
   sees half as many MRI images as an MRI-only one.
3. What is held out (bench/study_data.py): the methods adapt on the abdominal MR, the spine T2
   and the left hemisphere of the MNI152 T1. Held out from adaptation: the spine T1 (same subject,
   another contrast) and the right hemisphere (the template is nearly symmetric: a weak held-out
   set). MRI Dice on the adaptation volumes is reported as fitting ("mr_fit"); CT Dice is on the
   base's own training volumes and measures what a method keeps of the base.
4. Dice, two ways. Resized (`Trainer.evaluate`, cheap): whole volumes resized to the model's
   window, logits > 0 against the label, text / ground-truth box / jittered box prompts, on CT,
   mr_fit and mr_heldout. Real inference on the held-out volumes (`validation.segment_validation`,
   what TrainConfig(eval_mode="segment") runs): `model.segment()` zoom-out-zoom-in on the volumes
   as stored, text / box / point prompts, scored on the stored grid (1-2 s a volume on the small
   config with one thread on the shared 2-core VM; --no-segment-eval skips it).
5. Every cell over the seeds: mean, std, min, max and the values. The base is one (first seed);
   the seeds vary the adapters' initialisation, the samples and the prompts, not the base.
   A model with a mixture also reports its router's decisions: the fraction of each modality's
   evaluation images sent to each expert or to the identity. For the tag mixture these are set by
   its tags (CT -> identity, so its CT Dice equals the base's by construction).

Results -> <out>/study.json and bench/results/cpu-adaptation-study-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.environment import environment, write_results  # noqa: E402
from bench.shared_data import DATA  # noqa: E402
from bench.study_data import study_data  # noqa: E402
from bench.study_report import kept, over_seeds, router_decisions, table  # noqa: E402
from bench.study_setup import study_process, study_train_config  # noqa: E402
from segevol_fast import SegVol, SegVolConfig, adapters  # noqa: E402
from segevol_fast.train.datasets import SegmentationDataset  # noqa: E402
from segevol_fast.train.trainer import TrainConfig, Trainer  # noqa: E402
from segevol_fast.train.validation import segment_validation  # noqa: E402

PROMPTS = ("text", "box", "jittered_box")  # resized evaluation
SEGMENT_PROMPTS = ("text", "box", "point")  # real inference on the held-out volumes
# measured on the shared 2-core VM with one thread, small config, batch 2: for the estimate printed
# at the start (the measured rate of the first run is printed with a new estimate)
SECONDS_PER_STEP = 0.7
SECONDS_PER_SEGMENT_VOLUME = 2.0
SECONDS_PER_RESIZED_SET = 1.0


def task_names(cases) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n for c in cases for n in c.label_map.values()))


def _dataset(cases, size, seed, train=True):
    return SegmentationDataset(cases, size, train=train, seed=seed, unknown_labels="ignore")


def _config(args, steps: int, lr: float, seed: int, out: pathlib.Path) -> TrainConfig:
    return study_train_config(
        steps,
        lr,
        seed,
        out,
        batch_size=args.batch_size,
        min_lr_ratio=0.1,
        box_jitter=args.train_jitter,
        eval_jitter=args.eval_jitter,
    )


def evaluate(trainer: Trainer, args, evals: dict, heldout_cases) -> dict:
    """{"resized": {set: {prompt: Dice}}, "resized_per_organ": ..., "segment": {"mr_heldout":
    {prompt: Dice}}, "segment_per_organ": ..., "router": {set: decisions} (mixtures only)}."""
    model = trainer.model
    resized = {name: trainer.evaluate(ds, prompts=PROMPTS, jitter=args.eval_jitter) for name, ds in evals.items()}
    result = {
        "resized": {name: r["mean"] for name, r in resized.items()},
        "resized_per_organ": {name: r["per_organ"] for name, r in resized.items()},
    }
    if args.segment_eval and heldout_cases:
        seg = segment_validation(model, heldout_cases, SEGMENT_PROMPTS, zoom_in=True)
        result["segment"] = {"mr_heldout": seg["mean"]}
        result["segment_per_organ"] = {"mr_heldout": seg["per_organ"]}
    decisions = {name: router_decisions(model, ds) for name, ds in evals.items()}
    if any(d is not None for d in decisions.values()):
        result["router"] = decisions
    return result


def base_model(args, ct_cases, out: pathlib.Path) -> SegVol:
    if args.weights:
        return SegVol.from_pretrained(args.weights, tokenizer=DATA / "clip_tokenizer", device=args.device)
    cfg = SegVolConfig.small() if args.config == "small" else SegVolConfig()
    folder = out / "base"
    if (folder / "config.json").exists() and not args.retrain_base:
        return SegVol.from_pretrained(folder, device=args.device)
    torch.manual_seed(args.seed)
    model = SegVol(cfg, tokenizer=DATA / "clip_tokenizer").to(args.device)
    model.text_encoder.set_trainable(clip=False, dim_align=True)  # CLIP frozen, as officially
    train = _dataset(ct_cases, cfg.spatial_size, args.seed)
    t = time.perf_counter()
    config = _config(args, args.base_steps, args.base_lr, args.seed, out / "base_run")
    Trainer(model, config, train).fit(progress=not args.quiet)
    print(f"base: {args.base_steps} steps in {time.perf_counter() - t:.0f} s", flush=True)
    model.eval()
    model.save_pretrained(folder)
    model.weights_source = str(folder)
    return model


def _lora():
    return adapters.LoraConfig(rank=8, alpha=8, rslora=True)


METHODS = {
    # name: (attach(model), train on "mr" or "ct+mr")
    "lora": (lambda m: adapters.add_lora(m, "mr", _lora()), "mr"),
    "bottleneck": (lambda m: adapters.add_bottleneck(m, "mr", adapters.BottleneckConfig(dim=16)), "mr"),
    "mixture_tag": (
        lambda m: adapters.add_mixture(
            m,
            "moa",
            adapters.MixtureConfig(experts=("mr",), routing="tag", tags={"ct": "identity", "mri": "mr"}, lora=_lora()),
        ),
        "mr",
    ),
    "mixture_top1": (
        lambda m: adapters.add_mixture(
            m, "moa", adapters.MixtureConfig(experts=("a", "b"), routing="top1", lora=_lora())
        ),
        "ct+mr",
    ),
    "priors_additive": (
        lambda m: adapters.add_context_priors(
            m, "priors", adapters.ContextPriorConfig(variant="additive", tasks=m.study_tasks)
        ),
        "ct+mr",
    ),
    "priors_hermes": (
        lambda m: adapters.add_context_priors(
            m, "priors", adapters.ContextPriorConfig(variant="hermes", tasks=m.study_tasks)
        ),
        "ct+mr",
    ),
    # the control: plain LoRA given the CT too, as SegEVOLution's CT + MRI LoRA was
    "lora_ct_mr": (lambda m: adapters.add_lora(m, "mr", _lora()), "ct+mr"),
}


def fresh_base(args, out: pathlib.Path) -> SegVol:
    source = args.weights or out / "base"
    tokenizer = DATA / "clip_tokenizer" if args.weights else None
    model = SegVol.from_pretrained(source, tokenizer=tokenizer, device=args.device)
    model.eval()
    return model


def run_method(name: str, seed: int, args, train_sets: dict, evals, heldout, out: pathlib.Path, tasks) -> dict:
    model = fresh_base(args, out)
    model.study_tasks = tasks  # the structure names the priors get tokens for
    attach, data = METHODS[name]
    torch.manual_seed(seed)  # the adapters' initialisation differs per seed
    attach(model)
    params = adapters.adapter_parameters(model)
    config = _config(args, args.adapt_steps, args.adapt_lr, seed, out / f"{name}_seed{seed}")
    trainer = Trainer(model, config, train_sets[data])
    t = time.perf_counter()
    trainer.fit(progress=not args.quiet)
    seconds = time.perf_counter() - t
    model.eval()
    return {
        "trained_on": data,
        "trainable_parameters": sum(p.numel() for p in params),
        "train_seconds": seconds,
        **evaluate(trainer, args, evals, heldout),
    }


def summarize_method(runs: list[dict], before: dict) -> dict:
    """Per-seed runs -> the cells over seeds (mean, std, min, max, values)."""
    cells = {"resized": [r["resized"] for r in runs]}
    if "segment" in runs[0]:
        cells["segment"] = [r["segment"] for r in runs]
    summary = {k: over_seeds(v) for k, v in cells.items()}
    summary["ct_kept"] = over_seeds([kept(r["resized"]["ct"], before["resized"]["ct"]) for r in runs])
    summary["train_seconds"] = over_seeds([r["train_seconds"] for r in runs])
    if "router" in runs[0]:
        summary["router"] = over_seeds([r["router"] for r in runs])
    return summary


def estimate_seconds(args, base_trained: bool, sets: int, heldout: int) -> float:
    runs = len(args.methods) * args.seeds
    train = args.adapt_steps * runs + (0 if base_trained else args.base_steps)
    segment = (runs + 1) * heldout * SECONDS_PER_SEGMENT_VOLUME if args.segment_eval else 0.0
    scale = args.batch_size / 2
    return train * SECONDS_PER_STEP * scale + segment + (runs + 1) * sets * SECONDS_PER_RESIZED_SET


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=["small", "official"], default="small")
    p.add_argument("--weights", help="a base checkpoint instead of training one (official config)")
    p.add_argument("--ct-root", help="a CT dataset folder (Decathlon / nnU-Net / M3D-Seg) instead of the shared CT")
    p.add_argument("--mr-root", help="an MRI dataset folder instead of the shared MRI (every 5th case held out)")
    p.add_argument("--out", default=str(REPO / "segevol_out" / "study"))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--base-steps", type=int, default=400)
    p.add_argument("--adapt-steps", type=int, default=120)
    p.add_argument("--base-lr", type=float, default=1e-3)
    p.add_argument("--adapt-lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--train-jitter", type=int, default=2)
    p.add_argument("--eval-jitter", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="the first seed (and the base's)")
    p.add_argument("--seeds", type=int, help="how many seeds: --seed, --seed + 1, ... (default 3, --quick 1)")
    p.add_argument("--no-segment-eval", dest="segment_eval", action="store_false", help="resized evaluation only")
    p.add_argument("--quick", action="store_true", help="2 base and 2 adaptation steps, one seed: a pipeline check")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default). 1 because the 2-core VM is shared: there a training step "
        "took 0.7 s on one thread and 3 s on two",
    )
    p.add_argument("--base-only", action="store_true")
    p.add_argument("--retrain-base", action="store_true")
    p.add_argument(
        "--results", default=str(REPO / "bench" / "results"), help="where the dated JSON goes ('' = nowhere)"
    )
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.base_steps, args.adapt_steps = min(args.base_steps, 2), min(args.adapt_steps, 2)
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    study_process(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = study_data(DATA, out, args.ct_root, args.mr_root)
    base_trained = bool(args.weights) or ((out / "base" / "config.json").exists() and not args.retrain_base)
    if not args.base_only:
        guess = estimate_seconds(args, base_trained, 3, len(data.heldout))
        print(
            f"estimate: ~{guess / 60:.0f} min ({len(args.methods)} methods x {args.seeds} seeds x "
            f"{args.adapt_steps} steps{'' if base_trained else f' + {args.base_steps} base steps'})",
            flush=True,
        )
    base = base_model(args, data.ct, out)
    if args.base_only:
        return 0
    size = base.config.spatial_size
    # built once: every method trains and is evaluated on the same prepared volumes
    evals = {
        "ct": _dataset(data.ct, size, args.seed, train=False),
        "mr_fit": _dataset(data.adapt, size, args.seed, train=False),
    }
    if data.heldout:
        evals["mr_heldout"] = _dataset(data.heldout, size, args.seed, train=False)
    seeds = list(range(args.seed, args.seed + args.seeds))
    before = evaluate(
        Trainer(base, _config(args, 1, 1e-4, args.seed, out / "eval_base"), evals["ct"]), args, evals, data.heldout
    )
    print("base", json.dumps(before["resized"]), flush=True)
    tasks = task_names(data.ct + data.adapt + data.heldout)
    # one pair of training sets per seed, shared by the methods (each case is preprocessed once)
    train_sets = {
        seed: {"mr": _dataset(data.adapt, size, seed), "ct+mr": _dataset(data.ct + data.adapt, size, seed)}
        for seed in seeds
    }
    results = {}
    for name in args.methods:
        runs = []
        for seed in seeds:
            t = time.perf_counter()
            runs.append(run_method(name, seed, args, train_sets[seed], evals, data.heldout, out, tasks))
            print(name, seed, json.dumps(runs[-1]["resized"]), f"{runs[-1]['train_seconds']:.0f} s", flush=True)
            if len(results) == 0 and len(runs) == 1:
                left = (len(args.methods) * len(seeds) - 1) * (time.perf_counter() - t)
                print(
                    f"measured: {runs[0]['train_seconds'] / args.adapt_steps:.2f} s a step; ~{left / 60:.0f} min left",
                    flush=True,
                )
        results[name] = {
            "trained_on": runs[0]["trained_on"],
            "trainable_parameters": runs[0]["trainable_parameters"],
            "summary": summarize_method(runs, before),
            "runs": dict(zip(map(str, seeds), runs)),
        }
    report = environment(
        args=vars(args),
        config=args.config,
        protocol={
            "data": data.layout,
            "held_out": "mr_heldout: volumes no adaptation step sees; mr_fit: the adaptation volumes (fitting); "
            "ct: the base's training volumes (what is kept)",
            "seeds": seeds,
            "base_seed": args.seed,
            "steps_per_method": args.adapt_steps,
            "images_per_step": args.batch_size,
            "resized_prompts": list(PROMPTS),
            "segment_prompts": list(SEGMENT_PROMPTS) if args.segment_eval and data.heldout else [],
            "by_construction": "mixture_tag routes CT to the identity expert: its CT Dice is the base's",
        },
        organs=list(tasks),
        base=before,
        methods=results,
        total_seconds=time.perf_counter() - t0,
    )
    (out / "study.json").write_text(json.dumps(report, indent=2))
    if args.results:
        write_results(report, args.results, "cpu-adaptation-study")
    print(table(report))
    print(f"total {report['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
