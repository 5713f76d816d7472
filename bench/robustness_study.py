"""The robustness study: the small trained model (bench/small_model.py) under the published
rotation, a rotation sweep and prompt jitter, and what three remedies change.

    python bench/robustness_study.py               # trains the small model first if it is not there
    python bench/robustness_study.py --quick       # a few steps and settings: checks the pipeline

Variants, each scored by `segevol_fast.eval.robustness` on the same cases, prompts and settings:
    base        the small model as trained (its own training used rotations of +-15 degrees)
    tta         base with test-time augmentation: --tta views turned about the long axis (no training);
                scored on the rotations only (its views multiply the cost; it does nothing for jitter)
    lora_rot    LoRA (rank 16, rsLoRA) fine-tuned --adapt-steps steps with rotations of +-45 degrees
    branch_rot  the rotation-robust patch branch (`adapters.add_rotation_branch`), same steps, data,
                augmentation, optimiser and schedule as lora_rot
Cases: the small model's training volumes, the only labelled abdominal volumes in the shared data:
the Dice measures how a fitted model's masks change under the perturbations, not generalisation.
Costs per variant: trainable parameters, training seconds, and the median seconds of one
`model.segment()` call (text, 4 organs, the shared CT) over --timing-runs runs.

Resumable: a variant's trained adapter and every finished case are kept under <out>/<variant>/ and
reused by a rerun, so variants may also run in separate processes (--variants) and a last run with
all of them assembles the report.

-> <out>/<variant>/robustness.{csv,json,png}, <out>/comparison.png, <out>/study.json and
bench/results/cpu-robustness-study-<date>.json (with the base's table beside it as
cpu-robustness-base-<date>.{csv,png}).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench import small_model  # noqa: E402
from bench.environment import environment, write_results  # noqa: E402
from bench.shared_data import DATA  # noqa: E402
from bench.study_setup import line_chart, study_process, study_train_config  # noqa: E402
from segevol_fast import SegVol, adapters  # noqa: E402
from segevol_fast.eval import robustness  # noqa: E402
from segevol_fast.eval.rotation import PUBLISHED, sweep  # noqa: E402
from segevol_fast.io import load_volume  # noqa: E402
from segevol_fast.train.datasets import SegmentationDataset  # noqa: E402
from segevol_fast.train.trainer import Trainer  # noqa: E402

VARIANTS = ("base", "tta", "lora_rot", "branch_rot")
ADAPTERS = {
    "lora_rot": lambda m: adapters.add_lora(m, "rot", adapters.LoraConfig(rank=16, alpha=16, rslora=True)),
    "branch_rot": lambda m: adapters.add_rotation_branch(m, "rot", adapters.RotationBranchConfig(group="c4")),
}
TIMED_ORGANS = ["liver", "spleen", "left kidney", "right kidney"]


def load_base(args) -> SegVol:
    folder = pathlib.Path(args.model) / "model"
    if not (folder / "config.json").exists():
        small_model.main(["--out", str(args.model)] + (["--quick"] if args.quick else []))
    model = SegVol.from_pretrained(folder)
    model.eval()
    return model


def adapt(name: str, cases, args, out: pathlib.Path) -> tuple[SegVol, dict]:
    """A fresh copy of the base with the variant's adapter, trained with rotation augmentation;
    an adapter this study saved before (out/adapter.safetensors and its costs) is loaded instead."""
    model = load_base(args)
    adapter, costs_file = out / "adapter.safetensors", out / "costs.json"
    if adapter.exists() and costs_file.exists():
        adapters.load_adapter(model, adapter)  # and makes it the active one
        model.eval()
        return model, json.loads(costs_file.read_text())
    torch.manual_seed(args.seed)
    ADAPTERS[name](model)
    size = model.config.spatial_size
    data = SegmentationDataset(cases, size, rotation_deg=args.rotation_deg, seed=args.seed, unknown_labels="ignore")
    config = study_train_config(
        args.adapt_steps,
        args.adapt_lr,
        args.seed,
        out / "run",
        batch_size=2,
        min_lr_ratio=0.05,
        categories_per_image=4,
        workers=args.workers,
    )
    t = time.perf_counter()
    Trainer(model, config, data).fit(progress=not args.quiet)
    costs = {
        "trainable_parameters": sum(p.numel() for p in adapters.adapter_parameters(model)),
        "train_seconds": time.perf_counter() - t,
    }
    model.eval()
    adapters.save_adapter(model, "rot", adapter)
    costs_file.write_text(json.dumps(costs))
    return model, costs


def segment_seconds(model: SegVol, tta: int | None, runs: int, zoom_in: bool) -> float:
    """Median wall seconds of one text segmentation of the shared CT (4 organs)."""
    from segevol_fast.eval import segment_with_tta

    scan = load_volume(DATA / "ct_abdomen_sm.nii.gz")
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        if tta:
            segment_with_tta(model, scan.array, scan.affine, text=TIMED_ORGANS, k=tta, zoom_in=zoom_in, modality="ct")
        else:
            model.segment(scan, text=TIMED_ORGANS, zoom_in=zoom_in, modality="ct", progress=False)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def headline(report) -> dict:
    """Mean Dice per prompt at: none, the published rotation, and over the whole sweep."""
    out: dict = {}
    for s in report.summary:
        if s["perturbation"] == "none":
            out.setdefault("none", {})[s["prompt"]] = s["dice"]
        elif s["setting"] == "published":
            out.setdefault("published", {})[s["prompt"]] = s["dice"]
        elif s["perturbation"] == "rotation":
            out.setdefault("sweep", {}).setdefault(s["prompt"], []).append(s["dice"])
        else:
            out.setdefault(s["perturbation"], {}).setdefault(s["setting"], {})[s["prompt"]] = s["dice"]
    out["sweep"] = {p: statistics.fmean(v) for p, v in out.get("sweep", {}).items()}
    return out


def comparison_plot(results: dict, path: pathlib.Path, prompt: str = "text+box") -> None:
    """Dice vs angle about the long axis (z), one line per variant, for one prompt type."""
    with line_chart(path, "rotation about the long axis (degrees)", f"mean Dice ({prompt} prompt)") as ax:
        for name, r in results.items():
            points = sorted(
                (s["angle_deg"], s["dice"])
                for s in r["summary"]
                if s["prompt"] == prompt and s["perturbation"] == "rotation" and s["axis"] == "z"
            )
            none = [s["dice"] for s in r["summary"] if s["prompt"] == prompt and s["perturbation"] == "none"]
            points = sorted(points + [(0.0, none[0])]) if none else points
            ax.plot([a for a, _ in points], [d for _, d in points], marker="o", label=name)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "segevol_out" / "robustness_study"))
    p.add_argument("--model", default=str(small_model.OUT), help="the small model's folder (bench/small_model.py)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--sweep-angles", type=float, nargs="+", default=[-90, -45, -15, 15, 45, 90], help="about z")
    p.add_argument(
        "--tilt-angles",
        type=float,
        nargs="+",
        default=[-15, 15],
        help="about x and y (the shared volumes are 20-30 slices thick: larger tilts turn most of them off the grid)",
    )
    p.add_argument("--box-jitter", type=int, nargs="+", default=[1, 5, 10, 50])
    p.add_argument("--point-jitter", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--tta", type=int, default=4, help="views of the tta variant")
    p.add_argument("--adapt-steps", type=int, default=400)
    p.add_argument("--adapt-lr", type=float, default=1e-3)
    p.add_argument("--rotation-deg", type=float, default=45.0, help="rotation augmentation of the trained variants")
    p.add_argument(
        "--zoom-in",
        action="store_true",
        help="run segment()'s zoom-in too (default: the zoom-out pass only, the whole scan resized to the window; "
        "the zoom-in's native-resolution windows cost ~80 s a rotation on the 512x512 DICOM CT here)",
    )
    p.add_argument("--timing-runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--results", default=str(REPO / "bench" / "results"), help="dated files go here ('': nowhere)")
    p.add_argument(
        "--quick", action="store_true", help="the small CT only, 2 adaptation steps, one sweep angle, one jitter"
    )
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.adapt_steps, args.sweep_angles, args.tilt_angles = 2, [45], []
        args.box_jitter, args.point_jitter, args.timing_runs = [5], [5], 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    study_process(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cases = small_model.small_model_cases()[: 1 if args.quick else None]
    settings = dict(
        rotations=(
            PUBLISHED,
            *sweep(args.sweep_angles, "z"),
            *(sweep(args.tilt_angles, "xy") if args.tilt_angles else ()),
        ),
        box_jitter=args.box_jitter,
        point_jitter=args.point_jitter,
        seed=args.seed,
        zoom_in=args.zoom_in,
        progress=not args.quiet,
    )
    results = {}
    for name in args.variants:
        folder = out / name
        if name in ADAPTERS:
            model, costs = adapt(name, cases, args, folder)  # loads its own copy of the base
        else:
            model, costs = load_base(args), {"trainable_parameters": 0, "train_seconds": 0.0}
        tta = args.tta if name == "tta" else None
        t = time.perf_counter()
        # TTA answers rotations: its views multiply the cost (4x, more on the 512x512 DICOM), so no jitter
        jitter = dict(box_jitter=(), point_jitter=()) if tta else {}
        report = robustness(model, cases, tta=tta, out_dir=folder, **{**settings, **jitter})
        costs["eval_seconds"] = time.perf_counter() - t
        costs["segment_seconds"] = segment_seconds(model, tta, args.timing_runs, args.zoom_in)
        results[name] = {**costs, "headline": headline(report), "summary": report.summary}
        print(name, json.dumps(results[name]["headline"], default=str), flush=True)
    comparison_plot(results, out / "comparison.png")
    report = environment(
        args=vars(args),
        cases={c.case_id: sorted(set(c.label_map.values())) for c in cases},
        variants=results,
        total_seconds=time.perf_counter() - t0,
    )
    (out / "study.json").write_text(json.dumps(report, indent=2, default=str))
    if args.results and not args.quick:
        path = write_results(report, args.results, "cpu-robustness-study")
        stem = path.with_name(path.stem.replace("robustness-study", "robustness-base"))
        if "base" in results:
            shutil.copy(out / "base" / "robustness.csv", stem.with_suffix(".csv"))
            shutil.copy(out / "base" / "robustness.png", stem.with_suffix(".png"))
        shutil.copy(out / "comparison.png", path.with_suffix(".png"))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
