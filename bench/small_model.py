"""The small trained model: `SegVolConfig.small()` trained from random weights on the shared real
volumes, the closest thing to real weights that this repository can make (the official weights
cannot be downloaded here). Studies that need masks with real boundaries use it (the robustness
study, bench/robustness_study.py); it is a miniature, no substitute for the official weights.

    python bench/small_model.py                    # train (or reuse) and report; ~1 s a step on one core
    python bench/small_model.py --leave-one-out    # + one model per left-out volume, same budget
    python bench/small_model.py --quick            # a few steps: checks the pipeline

Data (bench/shared_data.py, SEGEVOL_DATA): ct_abdomen_sm, the DICOM CT series and mr_abdomen_sm,
with every labelled structure that covers at least MIN_FRACTION of its volume (smaller ones, a few
voxels, do not survive the resize to the model's 16x64x64 window). Training: every parameter, the
CLIP text tower included (random here, unlike the official frozen pretrained one), the official loss
and six prompt mixes, the official augmentation (resize or foreground crop, flips, intensity) plus
rotations about the longitudinal axis; deterministic for a seed on one machine and thread count.
Validation every --eval-every steps (resized, text / box / jittered box, on the training volumes):
the curve is <out>/run/eval_log.csv.

Report: Dice of real inference (`model.segment()` zoom-out-zoom-in on each volume as stored,
`train.validation.segment_validation`) per organ and prompt type (text, box, point), on the
training volumes; with --leave-one-out also on each volume by a model that never saw it.
-> <out>/report.json, <out>/curve.png and bench/results/cpu-small-model-<date>.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.environment import environment, write_results  # noqa: E402
from bench.shared_data import DATA  # noqa: E402
from bench.study_setup import line_chart, study_process, study_train_config  # noqa: E402
from segevol_fast import SegVol, SegVolConfig  # noqa: E402
from segevol_fast.train.cases import Case, cases_from_files  # noqa: E402
from segevol_fast.train.datasets import SegmentationDataset  # noqa: E402
from segevol_fast.train.trainer import Trainer  # noqa: E402
from segevol_fast.train.validation import segment_validation  # noqa: E402

OUT = REPO / "segevol_out" / "small_model"
MIN_FRACTION = 0.005  # of the volume's voxels: structures kept for training and report
VOLUMES = (  # (image, labels, modality, key in labels.json)
    ("ct_abdomen_sm.nii.gz", "ct_abdomen_sm_labels.nii.gz", "ct", "ct"),
    ("ct_abdomen_dicom", "ct_abdomen_dicom_labels.nii.gz", "ct", "ct"),
    ("mr_abdomen_sm.nii.gz", "mr_abdomen_sm_labels.nii.gz", "mri", "mr"),
)
LARGE_ORGANS = ("liver", "spleen", "stomach", "left kidney", "right kidney")  # the headline row
PROMPTS = ("text", "box", "point")


def labelled_structures(labels: pathlib.Path, names: dict, min_fraction: float = MIN_FRACTION) -> dict[int, str]:
    """{label id: TotalSegmentator name} of the structures covering >= min_fraction of the volume."""
    import nibabel as nib

    ids, counts = np.unique(np.asarray(nib.load(str(labels)).dataobj), return_counts=True)
    total = counts.sum()
    return {int(i): names[str(i)] for i, n in zip(ids, counts) if i and n >= min_fraction * total and str(i) in names}


def small_model_cases(data: pathlib.Path = DATA, min_fraction: float = MIN_FRACTION) -> list[Case]:
    """The training cases, one per shared volume (module docstring)."""
    names = json.loads((data / "labels.json").read_text())
    cases = []
    for image, labels, modality, key in VOLUMES:
        structures = labelled_structures(data / labels, names[key], min_fraction)
        cases += cases_from_files([(data / image, data / labels)], structures, modality, image.split(".")[0])
    return cases


def train(cases: list[Case], args, out: pathlib.Path) -> SegVol:
    """Train from random weights (seed args.seed) through every phase of args.phases and save to
    out/model. A phase is (steps, peak lr): warmup then cosine decay, starting from the previous
    phase's weights (a warm restart) with its own sample stream (seed + phase). Each phase's weights
    are kept in out/phase<i> and reused when present, so an interrupted run resumes by phase."""
    if (out / "model" / "config.json").exists() and not args.retrain:
        return _saved(out / "model")
    model = None
    for i, (steps, lr) in enumerate(args.phases, start=1):
        folder = out / f"phase{i}"
        if (folder / "config.json").exists() and not args.retrain:
            model = _saved(folder)
            continue
        if model is None:
            model = untrained_model(args)
        set_trainable(model, args)
        t = time.perf_counter()
        _train_phase(model, cases, args, steps, lr, args.seed + i - 1, out / f"run_phase{i}")
        seconds = time.perf_counter() - t
        print(f"{out.name} phase {i}: {steps} steps in {seconds:.0f} s", flush=True)
        model.eval()
        model.save_pretrained(folder)
        (folder / "train_seconds.txt").write_text(f"{seconds:.1f}\n")
    model.save_pretrained(out / "model")
    model.weights_source = str(out / "model")  # trained weights: segment() must not warn of random ones
    return model


def untrained_model(args) -> SegVol:
    """`SegVolConfig.small()` with random weights drawn from args.seed."""
    torch.manual_seed(args.seed)
    return SegVol(SegVolConfig.small(), tokenizer=DATA / "clip_tokenizer")


def set_trainable(model: SegVol, args) -> None:
    """The CLIP text tower trains unless args.text_tower is 'frozen'; everything else trains as
    built, dim_align included. The official recipe freezes a pretrained CLIP. This tower is
    random: frozen, its pooled output hardly depends on the words (the EOS position sets it:
    'liver', 'colon' and 'stomach' embed at cosine 0.9996), so text prompts cannot tell those
    organs apart."""
    model.text_encoder.set_trainable(clip=args.text_tower == "trained", dim_align=True)


def _saved(folder: pathlib.Path) -> SegVol:
    model = SegVol.from_pretrained(folder)
    model.eval()
    return model


def _train_phase(model: SegVol, cases: list[Case], args, steps: int, lr: float, seed: int, run: pathlib.Path):
    size = model.config.spatial_size
    common = dict(seed=seed, unknown_labels="ignore")
    train_set = SegmentationDataset(cases, size, rotation_deg=args.rotation_deg, **common)
    eval_set = SegmentationDataset(cases, size, train=False, **common)
    config = study_train_config(
        steps,
        lr,
        seed,
        run,
        batch_size=args.batch_size,
        min_lr_ratio=0.02,
        categories_per_image=args.categories_per_image,
        eval_every=args.eval_every,
        eval_jitter=5,
        save_best=False,
        workers=args.workers,
    )
    Trainer(model, config, train_set, eval_dataset=eval_set).fit(progress=not args.quiet)


def scored(model: SegVol, cases: list[Case]) -> dict:
    """Real-inference Dice per organ and prompt type (`segment_validation`), and its means; also
    the means of the zoom-out pass alone (the whole scan resized to the window, as the robustness
    study runs it)."""
    result = segment_validation(model, cases, PROMPTS, zoom_in=True)
    per_case: dict[str, dict] = {}
    for row in result["per_label"]:
        per_case.setdefault(row["case"], {})[row["label"]] = {k: row[k] for k in PROMPTS}
    zoom_out = segment_validation(model, cases, PROMPTS, zoom_in=False)
    return {
        "mean": result["mean"],
        "large_organs": _large_organ_means(result),
        "per_organ": result["per_organ"],
        "per_case": per_case,
        "zoom_out_only": {"mean": zoom_out["mean"], "large_organs": _large_organ_means(zoom_out)},
    }


def _large_organ_means(result: dict) -> dict:
    large = [r for r in result["per_label"] if r["label"] in LARGE_ORGANS]
    return {k: float(np.mean([r[k] for r in large])) if large else float("nan") for k in PROMPTS}


def training_record(out: pathlib.Path) -> dict:
    """Seconds and validation curve (resized Dice on the training volumes) of every phase."""
    import csv

    record = {}
    for run in sorted(out.glob("run_phase*")):
        phase = run.name.removeprefix("run_")
        log = run / "eval_log.csv"
        curve = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(log.open())] if log.exists() else []
        seconds = out / phase / "train_seconds.txt"
        record[phase] = {"seconds": float(seconds.read_text()) if seconds.exists() else None, "curve": curve}
    return record


def curve_plot(record: dict, path: pathlib.Path) -> None:
    """The validation curve over every phase (resized Dice on the training volumes per prompt)."""
    xlabel, ylabel = "optimiser step (phases end at the grey lines)", "mean Dice, training volumes (resized)"
    with line_chart(path, xlabel, ylabel, size=(6, 3.5)) as ax:
        offset, rows = 0.0, []
        for phase in record.values():
            rows += [{**r, "step": r["step"] + offset} for r in phase["curve"]]
            offset = rows[-1]["step"] if rows else offset
            ax.axvline(offset, color="grey", lw=0.5)
        for key in ("dice_text", "dice_box", "dice_jittered_box"):
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker=".", label=key.removeprefix("dice_"))


def markdown(report: dict) -> str:
    """The per-case, per-organ tables of the report, as in docs/benchmarks.md."""
    lines = []
    for title, part in (("training volumes", report["train"]), ("left out", report.get("leave_one_out"))):
        if not part:
            continue
        per_case = part["per_case"] if "per_case" in part else {c: v["per_case"][c] for c, v in part.items()}
        lines += [f"\n{title}:\n", "| volume | structure | " + " | ".join(PROMPTS) + " |", "|---|---|" + "---|" * 3]
        for case, organs in per_case.items():
            for organ, dice in organs.items():
                lines.append(f"| {case} | {organ} | " + " | ".join(f"{dice[k]:.2f}" for k in PROMPTS) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(OUT))
    p.add_argument(
        "--phases",
        nargs="+",
        default=["2000:1e-3", "2000:1e-3", "3000:1e-3"],
        metavar="STEPS:LR",
        help="training phases, each warmup + cosine decay from the last one's weights",
    )
    p.add_argument("--loo-phases", nargs="+", default=["1000:1e-3"], metavar="STEPS:LR", help="of the left-out models")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--categories-per-image", type=int, default=4)
    p.add_argument("--rotation-deg", type=float, default=15.0, help="rotation augmentation about the long axis")
    p.add_argument(
        "--text-tower",
        choices=("trained", "frozen"),
        default="trained",
        help="train the (random) CLIP text tower, or freeze it as the official recipe freezes pretrained CLIP",
    )
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-fraction", type=float, default=MIN_FRACTION, help="smallest structure kept (of the volume)")
    p.add_argument("--leave-one-out", action="store_true", help="also train one model per left-out volume")
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--quick", action="store_true", help="4 steps: a pipeline check")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--workers", type=int, default=1, help="sample-preparing processes (1: samples are made on the second core)"
    )
    p.add_argument("--results", default=str(REPO / "bench" / "results"), help="dated JSON goes here ('': nowhere)")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        args.phases, args.loo_phases = ([_phase(p) for p in v] for v in (args.phases, args.loo_phases))
    except ValueError:
        p.error("a phase is STEPS:LR, e.g. 2000:1e-3")
    if args.quick:
        args.phases, args.loo_phases, args.eval_every = [(4, 1e-3)], [(2, 1e-3)], 2
    return args


def _phase(text: str) -> tuple[int, float]:
    steps, lr = text.split(":")
    return int(steps), float(lr)


def main(argv=None) -> int:
    args = parse_args(argv)
    study_process(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cases = small_model_cases(min_fraction=args.min_fraction)
    model = train(cases, args, out)
    report = {
        "train": scored(model, cases),
        "training": training_record(out),
        "cases": {c.case_id: sorted(set(c.label_map.values())) for c in cases},
    }
    if args.leave_one_out:
        report["leave_one_out"] = {}
        for left in cases:
            kept = [c for c in cases if c is not left]
            loo = argparse.Namespace(**{**vars(args), "phases": args.loo_phases})
            report["leave_one_out"][left.case_id] = scored(train(kept, loo, out / f"without_{left.case_id}"), [left])
    report = environment(
        args=vars(args),
        config="small",
        min_fraction=MIN_FRACTION,
        large_organs=list(LARGE_ORGANS),
        total_seconds=time.perf_counter() - t0,
        **report,
    )
    (out / "report.json").write_text(json.dumps(report, indent=2))
    curve_plot(report["training"], out / "curve.png")
    if args.results and not args.quick:
        path = write_results(report, args.results, "cpu-small-model")
        shutil.copy(out / "curve.png", path.with_suffix(".png"))
    print(markdown(report))
    print("large organs (training volumes):", json.dumps(report["train"]["large_organs"]))
    print("  zoom-out pass only:", json.dumps(report["train"]["zoom_out_only"]["large_organs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
