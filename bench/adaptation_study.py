"""The adaptation study in miniature: a base trained on CT, adapted to MRI by every method.

    python bench/adaptation_study.py                      # small config, shared data, ~15 min on 2 cores
    python bench/adaptation_study.py --base-only          # (re)train and save only the CT base
    python bench/adaptation_study.py --config official --weights SegVol_v1.pth \
        --ct-root CT_DATASET --mr-root MR_DATASET --device cuda

1. Base: `SegVolConfig.small()` from random weights (seed), every parameter trained on the shared
   CT volumes (ct_abdomen_sm and the DICOM series) with the official loss and prompt mix; saved to
   <out>/base (`save_pretrained`; the command regenerates it bit for bit on the same machine).
   With --weights the base is loaded instead (the full config on real data, e.g. on a GPU).
2. Methods, each from the same base, trained the same number of steps:
   LoRA, bottleneck adapters (trained on the MRI only); mixture of adapters with tag routing
   (MRI -> its expert, CT -> the identity; MRI only); mixture with a learned top-1 router, and
   context priors in both variants (trained on CT + MRI, modality-balanced: they must learn when
   to act).
3. Dice before and after, on CT and on MRI, with text, ground-truth box and jittered box prompts
   (`Trainer.evaluate`: whole volumes resized to the model's window, logits > 0 vs the label).

The shared data holds one MRI volume, so MRI Dice is measured on the volume the methods adapt on
(fitting, not generalisation), and CT Dice on the base's own training volumes (what each method
keeps of the base). Results -> <out>/study.json and bench/results/cpu-adaptation-study-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
import warnings

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.environment import environment, write_results  # noqa: E402
from segevol_fast import SegVol, SegVolConfig, adapters  # noqa: E402
from segevol_fast.train.cases import cases_from_files, discover_cases  # noqa: E402
from segevol_fast.train.datasets import SegmentationDataset  # noqa: E402
from segevol_fast.train.trainer import TrainConfig, Trainer  # noqa: E402

DATA = pathlib.Path(os.environ.get("SEGEVOL_DATA", REPO.parent / "shared" / "data"))
# TotalSegmentator ids shared by the "total" (CT) and "total_mr" (MRI) tasks for these organs
ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 6: "stomach"}
PROMPTS = ("text", "box", "jittered_box")


def dataset_cases(args):
    """(CT cases, MRI cases): the shared volumes, or Decathlon / nnU-Net / M3D-Seg folders."""
    if not (args.ct_root or args.mr_root):
        return shared_cases(DATA)
    if not (args.ct_root and args.mr_root):
        raise SystemExit("give both --ct-root and --mr-root (or neither: the shared data)")
    return discover_cases(args.ct_root, modality="ct"), discover_cases(args.mr_root, modality="mri")


def task_names(cases) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n for c in cases for n in c.label_map.values()))


def shared_cases(data: pathlib.Path):
    ct = cases_from_files(
        [
            (data / "ct_abdomen_sm.nii.gz", data / "ct_abdomen_sm_labels.nii.gz"),
            (data / "ct_abdomen_dicom", data / "ct_abdomen_dicom_labels.nii.gz"),
        ],
        ORGANS,
        "ct",
        "shared-ct",
    )
    mr = cases_from_files(
        [(data / "mr_abdomen_sm.nii.gz", data / "mr_abdomen_sm_labels.nii.gz")], ORGANS, "mri", "shared-mr"
    )
    return ct, mr


def _datasets(cases, size, seed, train=True):
    return SegmentationDataset(cases, size, train=train, seed=seed, unknown_labels="ignore")


def _config(args, steps: int, lr: float, out: pathlib.Path) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=args.batch_size,
        lr=lr,
        weight_decay=1e-5,
        warmup_steps=max(1, steps // 20),
        min_lr_ratio=0.1,
        grad_clip=1.0,
        seed=args.seed,
        box_jitter=args.train_jitter,
        eval_jitter=args.eval_jitter,
        out_dir=str(out),
        log_every=10,
    )


def evaluate(trainer: Trainer, datasets: dict) -> dict:
    return {
        name: trainer.evaluate(ds, prompts=PROMPTS, jitter=trainer.config.eval_jitter)["mean"]
        for name, ds in datasets.items()
    }


def base_model(args, ct_cases, out: pathlib.Path) -> SegVol:
    cfg = SegVolConfig.small() if args.config == "small" else SegVolConfig()
    folder = out / "base"
    if args.weights:
        return SegVol.from_pretrained(args.weights, tokenizer=DATA / "clip_tokenizer", device=args.device)
    if (folder / "config.json").exists() and not args.retrain_base:
        return SegVol.from_pretrained(folder, device=args.device)
    torch.manual_seed(args.seed)
    model = SegVol(cfg, tokenizer=DATA / "clip_tokenizer").to(args.device)
    model.text_encoder.set_trainable(clip=False, dim_align=True)  # CLIP frozen, as officially
    train = _datasets(ct_cases, cfg.spatial_size, args.seed)
    t = time.perf_counter()
    Trainer(model, _config(args, args.base_steps, args.base_lr, out / "base_run"), train).fit(progress=not args.quiet)
    print(f"base: {args.base_steps} steps in {time.perf_counter() - t:.0f} s", flush=True)
    model.eval()
    model.save_pretrained(folder)
    model.weights_source = str(folder)
    return model


METHODS = {
    # name: (attach(model), train on "mr" or "ct+mr")
    "lora": (lambda m: adapters.add_lora(m, "mr", adapters.LoraConfig(rank=8, alpha=8, rslora=True)), "mr"),
    "bottleneck": (lambda m: adapters.add_bottleneck(m, "mr", adapters.BottleneckConfig(dim=16)), "mr"),
    "mixture_tag": (
        lambda m: adapters.add_mixture(
            m,
            "moa",
            adapters.MixtureConfig(
                experts=("mr",),
                routing="tag",
                tags={"ct": "identity", "mri": "mr"},
                lora=adapters.LoraConfig(rank=8, alpha=8, rslora=True),
            ),
        ),
        "mr",
    ),
    "mixture_top1": (
        lambda m: adapters.add_mixture(
            m,
            "moa",
            adapters.MixtureConfig(
                experts=("a", "b"), routing="top1", lora=adapters.LoraConfig(rank=8, alpha=8, rslora=True)
            ),
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
}


def run_method(name: str, args, base_folder_or_model, train_sets: dict, evals, out: pathlib.Path, tasks) -> dict:
    model = _fresh_base(args, base_folder_or_model)
    model.study_tasks = tasks  # the structure names the priors get tokens for
    attach, data = METHODS[name]
    attach(model)
    params = adapters.adapter_parameters(model)
    trainer = Trainer(model, _config(args, args.adapt_steps, args.adapt_lr, out / name), train_sets[data])
    t = time.perf_counter()
    trainer.fit(progress=not args.quiet)
    seconds = time.perf_counter() - t
    model.eval()
    return {
        "trained_on": data,
        "trainable_parameters": sum(p.numel() for p in params),
        "train_seconds": seconds,
        "dice": evaluate(trainer, evals),
    }


def _fresh_base(args, base):
    folder, model = base
    m = SegVol.from_pretrained(folder, device=args.device) if folder is not None else model
    m.eval()
    return m


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=["small", "official"], default="small")
    p.add_argument("--weights", help="a base checkpoint instead of training one (official config)")
    p.add_argument("--ct-root", help="a CT dataset folder (Decathlon / nnU-Net / M3D-Seg) instead of the shared CT")
    p.add_argument("--mr-root", help="an MRI dataset folder instead of the shared MRI")
    p.add_argument("--out", default=str(REPO / "segevol_out" / "study"))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--base-steps", type=int, default=400)
    p.add_argument("--adapt-steps", type=int, default=150)
    p.add_argument("--base-lr", type=float, default=1e-3)
    p.add_argument("--adapt-lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--train-jitter", type=int, default=2)
    p.add_argument("--eval-jitter", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--base-only", action="store_true")
    p.add_argument("--retrain-base", action="store_true")
    p.add_argument(
        "--results", default=str(REPO / "bench" / "results"), help="where the dated JSON goes ('' = nowhere)"
    )
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args()
    # the label files hold many more TotalSegmentator ids than the five organs studied: dropped on purpose
    warnings.filterwarnings("ignore", message=".*are not in the label map.*", category=UserWarning)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ct_cases, mr_cases = dataset_cases(args)
    base = base_model(args, ct_cases, out)
    if args.base_only:
        return 0
    size = base.config.spatial_size
    # built once: every method trains and is evaluated on the same prepared volumes
    evals = {
        "ct": _datasets(ct_cases, size, args.seed, train=False),
        "mr": _datasets(mr_cases, size, args.seed, train=False),
    }
    train_sets = {"mr": _datasets(mr_cases, size, args.seed), "ct+mr": _datasets(ct_cases + mr_cases, size, args.seed)}
    before = evaluate(Trainer(base, _config(args, 1, 1e-4, out / "eval_base"), evals["ct"]), evals)
    print("base", json.dumps(before), flush=True)
    folder = None if args.weights else out / "base"
    results = {}
    for name in args.methods:
        results[name] = run_method(name, args, (folder, base), train_sets, evals, out, task_names(ct_cases + mr_cases))
        print(name, json.dumps(results[name]), flush=True)
    report = environment(
        args=vars(args),
        config=args.config,
        organs=list(task_names(ct_cases + mr_cases)),
        base=before,
        methods=results,
        total_seconds=time.perf_counter() - t0,
    )
    (out / "study.json").write_text(json.dumps(report, indent=2))
    if args.results:
        write_results(report, args.results, "cpu-adaptation-study")
    print(f"total {report['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
