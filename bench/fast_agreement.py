"""Fast mode's zoom-in approximations against exact mode: agreement and speed per variant, the table
that decides which approximations fast mode turns on by default.

    python bench/fast_agreement.py                           # full-size random weights (seeds 0-2) + small model
    python bench/fast_agreement.py --models small --cases ct mr
    python bench/fast_agreement.py --include-512             # + the 512x512x300 scan for the full-size model
    python bench/fast_agreement.py --quick                   # tiny config, 1 seed, 2 shrunken cases

Variants (VARIANTS): exact mode (the official pipeline), fast mode with the official zoom-in
("none"), each approximation alone on top of it, all of them at once ("combined"), and fast mode's
defaults. Every variant of a case runs on the same model and volume, in one process, after one
untimed warm-up call of each mode on the shared CT; all at --precision (fp32 by default, so that
fast mode differs from exact mode by its approximations only, not by bf16).

Models: "full", the official-size `SegVolConfig()` with random weights, one per --seeds (masks are
meaningless but their agreement is not: a random ROI is tiled like a real one); "small", the small
trained model of bench/small_model.py (--small-model; its model/ or else its phase2/ weights),
prompted with structures it was trained on and skipped with a message when not trained yet.

Cases (CASES): the shared CT (4 organs), the shared CT resampled to ten windows of the model's window
along z ("ct10"), the DICOM CT, the abdominal MR, the brain MR (random weights only: the small model
never saw a brain) and the 512x512x300 phantom of bench/segment_bench.py (always for the small
model; for the full-size model only with --include-512: ~14 min a fast call on 2 cores).
With --quick every volume is shrunk by the tiny window's ratio to the full-size one, so the tiny model
meets the window counts the full-size model would.

Per (model, seed, case, variant): Dice per organ against exact mode and against fast "none", mean and
max |probability - exact|, zoom-in windows and tokens encoded against the official zoom-in
(res.plan["zoom_in"]; exact mode: its res.zoom_in_windows, whole windows), wall seconds, in-call peak
memory and the speed ratio exact / variant. -> JSON (--out, default
bench/results/cpu-fast-agreement-<date>.json) rewritten after every model and seed, and the markdown
table with the defaults verdict beside it (.md) and on stdout (bench/fast_agreement_report.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import pathlib
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench import segment_bench  # noqa: E402
from bench.environment import environment  # noqa: E402
from bench.fast_agreement_report import markdown, write_report  # noqa: E402
from bench.shared_data import DATA, resampled  # noqa: E402
from segevol_fast import SegVol, SegVolConfig  # noqa: E402
from segevol_fast.errors import VocabularyWarning  # noqa: E402
from segevol_fast.inference.approximations import Approximations  # noqa: E402
from segevol_fast.io import Volume, load_volume  # noqa: E402
from segevol_fast.totalseg_names import totalseg_name  # noqa: E402

# name -> what fast mode changes from the official zoom-in (Approximations.none()); None: exact
# mode; "default": fast mode's defaults. Each approximation alone is measured on top of "none".
# exact and none come first: every later variant is compared with both (run_case).
VARIANTS: dict[str, Union[None, dict, str]] = {
    "exact": None,
    "none": {},
    "overlap 0.25": {"overlap": 0.25},
    "overlap 0": {"overlap": 0.0},
    "token subset": {"token_subset": True},
    "skip empty": {"skip_empty": True},
    # every approximation at once (the milder overlap): what they cost together
    "combined": {"overlap": 0.25, "token_subset": True, "skip_empty": True},
    "default": "default",
}
ALONE = ("overlap 0.25", "overlap 0", "token subset", "skip empty")  # judged by the defaults verdict

CT_ORGANS = ("liver", "spleen", "left kidney", "stomach")
FULL_WINDOW = SegVolConfig().spatial_size  # (Z, Y, X) of a zoom-in window
TEN_WINDOWS = (120, 126, 164)  # (X, Y, Z): crop (164, 126, 120) = ten full-size windows along z, one in-plane


@dataclass(frozen=True)
class Case:
    """source: a file or folder of the shared data, or PHANTOM; organs: the prompts on random
    weights; trained_organs: those on the small trained model, None where it learned no structure."""

    source: str
    organs: tuple[str, ...]
    trained_organs: Optional[tuple[str, ...]]
    modality: Optional[str] = None
    labels: Optional[tuple[str, str]] = None  # (label file, its key in labels.json): --prompt box


PHANTOM = "phantom"
CASES = {
    "ct": Case("ct_abdomen_sm.nii.gz", CT_ORGANS, CT_ORGANS, labels=("ct_abdomen_sm_labels.nii.gz", "ct")),
    "ct10": Case("ct_abdomen_sm.nii.gz", ("liver",), ("liver",)),  # resampled to TEN_WINDOWS (case_volume)
    "dicom": Case(
        "ct_abdomen_dicom", ("liver", "spleen"), ("liver", "spleen"), labels=("ct_abdomen_dicom_labels.nii.gz", "ct")
    ),
    "mr": Case("mr_abdomen_sm.nii.gz", ("liver",), CT_ORGANS, "mri", labels=("mr_abdomen_sm_labels.nii.gz", "mr")),
    # white matter: the brain structure the shared data labels; no brain name is in the known
    # vocabulary, so its warning is silenced (random weights: any name tiles the same way)
    "brain": Case("mr_brain_mni152_t1.nii.gz", ("white matter",), None, "mri"),
    "512": Case(PHANTOM, ("liver",), ("liver",)),
}
QUICK_CASES = ("ct", "ct10")


def window_scaled(shape, window) -> tuple[int, int, int]:
    """An (X, Y, Z) shape scaled by `window` (Z, Y, X) against the full-size window."""
    ratio = np.asarray(window[::-1], dtype=np.float64) / np.asarray(FULL_WINDOW[::-1])
    return tuple(int(max(8, round(n * r))) for n, r in zip(shape, ratio))


def phantom_path() -> pathlib.Path:
    """The 512x512x300 phantom NIfTI of bench/segment_bench.py, made by its own process (~3 GB)."""
    shape = segment_bench.SYNTHETIC_SHAPE
    path = pathlib.Path(tempfile.gettempdir()) / "segevol_fast_phantom_{}x{}x{}.nii.gz".format(*shape)
    if not path.exists():
        subprocess.run([sys.executable, segment_bench.__file__, "--make-synthetic", str(path)], check=True, cwd=REPO)
    return path


def case_volume(name: str, window, quick: bool) -> Volume:
    """The case's scan, read once; "ct10" resampled to ten of `window` along z; shrunk with quick."""
    case = CASES[name]
    volume = load_volume(phantom_path() if case.source == PHANTOM else DATA / case.source, modality=case.modality)
    if name == "ct10":
        return resampled(volume, window_scaled(TEN_WINDOWS, window))
    if quick:
        return resampled(volume, window_scaled(volume.array.shape, window))
    return volume


def approximations_of(variant: str):
    spec = VARIANTS[variant]
    return spec if isinstance(spec, str) else dataclasses.replace(Approximations.none(), **spec)


def case_prompts(name: str, organs, prompt: str) -> Optional[dict]:
    """segment()'s prompts for the case: the organs' names, or (prompt "box") their ground-truth
    bounding boxes in voxel indices (None where the case has no labels)."""
    if prompt == "text":
        return {"text": list(organs)}
    truth = case_labels(name, organs)
    if truth is None:
        return None
    boxes = [[*np.argwhere(mask).min(0), *np.argwhere(mask).max(0)] for mask in truth]
    return {"box": np.asarray(boxes, dtype=np.float64)}


def case_labels(name: str, organs) -> Optional[list[np.ndarray]]:
    """The organs' ground-truth masks on the scan's grid (X, Y, Z), in order; None without labels
    (or for a resampled case, whose grid is not the labels')."""
    case = CASES[name]
    if case.labels is None or name == "ct10":
        return None
    import json

    import nibabel as nib

    ids = {v: int(k) for k, v in json.loads((DATA / "labels.json").read_text())[case.labels[1]].items()}
    labels = np.asarray(nib.load(str(DATA / case.labels[0])).dataobj)
    return [labels == ids[totalseg_name(organ)] for organ in organs]  # labels.json names TotalSegmentator's way


def run_variant(
    model: SegVol, volume: Volume, prompts: dict, modality, variant: str, precision: str
) -> tuple[dict, object]:
    """One segment() call of `variant`: its record (costs) and the result (masks, probabilities)."""
    kw = (
        dict(mode="exact")
        if VARIANTS[variant] is None
        else dict(mode="fast", approximations=approximations_of(variant))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VocabularyWarning)
        t = time.perf_counter()
        res = model.segment(
            volume,
            **prompts,
            modality=modality,
            precision=precision,
            progress=False,
            return_probabilities=True,
            **kw,
        )
        seconds = time.perf_counter() - t
    record = {
        "variant": variant,
        "mode": res.mode,
        "precision": res.precision,
        "seconds": seconds,
        "timings": res.timings,
        "peak_memory_bytes": res.peak_memory_bytes,
        "zoom_in_windows": res.zoom_in_windows,
        "approximations": res.plan.get("approximations") if res.mode == "fast" else None,
        **zoom_in_counts(model, res),
    }
    return record, res


def zoom_in_counts(model: SegVol, res) -> dict:
    """Windows and tokens encoded against the official zoom-in. Exact mode encodes every window of
    every prompt's own ROI whole, so its counts are its own official ones."""
    if res.mode == "fast":
        z = res.plan["zoom_in"]
        return {k: z[k] for k in ("windows_official", "windows_encoded", "tokens_official", "tokens_encoded")}
    windows = sum(res.zoom_in_windows.values())
    tokens = windows * int(np.prod(model.config.spatial_size) // np.prod(model.config.patch_size))
    return {
        "windows_official": windows,
        "windows_encoded": windows,
        "tokens_official": tokens,
        "tokens_encoded": tokens,
    }


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks; 1.0 when both are empty (they agree)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def agreement(res, exact, none, truth: Optional[list] = None) -> dict:
    """Per organ: Dice against exact mode and fast "none", mean and max |probability - exact|; and
    against the ground-truth masks `truth` (in prompt order) when given."""
    out = {"dice_vs_exact": {}, "dice_vs_none": {}, "prob_abs_diff_mean": {}, "prob_abs_diff_max": {}}
    if truth is not None:
        out["dice_vs_labels"] = {organ: dice(mask, t) for (organ, mask), t in zip(res.masks.items(), truth)}
    for organ, mask in res.masks.items():
        diff = np.abs(res.probabilities[organ] - exact.probabilities[organ])
        out["dice_vs_exact"][organ] = dice(mask, exact.masks[organ])
        out["dice_vs_none"][organ] = dice(mask, none.masks[organ])
        out["prob_abs_diff_mean"][organ] = float(diff.mean())
        out["prob_abs_diff_max"][organ] = float(diff.max())
    return out


def run_case(
    model: SegVol, volume: Volume, prompts: dict, modality, precision: str, truth=None, variants=None
) -> list[dict]:
    """Every variant (or those of `variants`) on one scan (VARIANTS' order: exact, fast "none", the
    rest), each compared with those two as soon as it ran: only their results are kept, so no
    variant's peak memory holds the masks and probabilities of the ones before it (a 512 scan's are
    ~0.3 GB an organ)."""
    records, kept = [], {}
    for variant in [v for v in VARIANTS if variants is None or v in ("exact", "none") or v in variants]:
        record, res = run_variant(model, volume, prompts, modality, variant, precision)
        records.append(record)
        if variant in ("exact", "none"):
            kept[variant] = res
        if variant == "none":  # exact mode's record waited for it
            records[0].update(agreement(kept["exact"], kept["exact"], res, truth))
        if variant != "exact":
            record.update(agreement(res, kept["exact"], kept["none"], truth))
        record["speed_ratio"] = records[0]["seconds"] / record["seconds"]
        del res
    return records


def full_model(seed: int, quick: bool) -> SegVol:
    """Official-size (tiny with quick) random weights drawn from `seed`."""
    torch.manual_seed(seed)
    model = SegVol(SegVolConfig.tiny() if quick else SegVolConfig(), tokenizer=DATA / "clip_tokenizer").eval()
    model.weights_source = "random (benchmark)"  # silence the notice: the agreement is measured, not the masks
    return model


def small_model(folder: pathlib.Path) -> Optional[SegVol]:
    """The small trained model's final weights, else its phase2 ones; None when neither is saved."""
    for sub in ("model", "phase2"):
        if (folder / sub / "config.json").exists():
            return SegVol.from_pretrained(folder / sub).eval()
    return None


def run_model(model: SegVol, cases, trained: bool, args) -> dict:
    """Every case on one model: {case: {"organs", "shape", "variants": [records]}}."""
    out = {}
    for i, name in enumerate(cases):
        case = CASES[name]
        organs = case.trained_organs if trained else case.organs
        if organs is None:
            print(f"  {name}: skipped (the trained model learned no structure of this scan)", flush=True)
            continue
        prompts = case_prompts(name, organs, args.prompt)
        if prompts is None:
            print(f"  {name}: skipped (no labels to draw boxes from)", flush=True)
            continue
        if i == 0:  # warm-up of both modes (oneDNN, allocator and first-call costs), untimed, on the
            # small shared CT: the same kernels as any case, without a 512 scan's quarter hour
            warm_volume = case_volume("ct", model.config.spatial_size, args.quick)
            warm = {k: v[:1] for k, v in case_prompts("ct", CT_ORGANS, args.prompt).items()}
            for variant in ("exact", "default"):
                run_variant(model, warm_volume, warm, CASES["ct"].modality, variant, args.precision)
        volume = case_volume(name, model.config.spatial_size, args.quick)
        truth = case_labels(name, organs) if trained else None  # random weights: the labels mean nothing
        if truth is not None and truth[0].shape != volume.array.shape:  # --quick shrinks the scans
            truth = None
        records = run_case(model, volume, prompts, case.modality, args.precision, truth, args.variants)
        out[name] = {"organs": list(organs), "shape": list(volume.array.shape), "variants": records}
        for r in records:
            worst = min(r["dice_vs_exact"].values())
            print(
                f"  {name:6s} {r['variant']:13s} {r['seconds']:7.1f} s  x{r['speed_ratio']:.2f}  windows "
                f"{r['windows_official']}->{r['windows_encoded']}  Dice vs exact min {worst:.4f}",
                flush=True,
            )
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), help="default: every case (--quick: ct ct10)")
    p.add_argument("--seeds", nargs="+", type=int, help="random-weight seeds (default 0 1 2; --quick: 0)")
    p.add_argument("--models", nargs="+", choices=("full", "small"), default=["full", "small"])
    p.add_argument("--small-model", type=pathlib.Path, default=REPO / "segevol_out" / "small_model")
    p.add_argument("--include-512", action="store_true", help="the 512x512x300 scan for the full-size model too")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    p.add_argument("--quick", action="store_true", help="tiny config, 1 seed, 2 cases: checks the pipeline")
    p.add_argument("--prompt", choices=("text", "box"), default="text", help="organ names, or their ground-truth boxes")
    p.add_argument("--out", type=pathlib.Path, help="JSON path (default bench/results/cpu-fast-agreement-<date>.json)")
    p.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), help="run only these (exact and none always run; default all)"
    )
    args = p.parse_args(argv)
    args.cases = args.cases or list(QUICK_CASES if args.quick else CASES)
    args.seeds = args.seeds if args.seeds is not None else [0] if args.quick else [0, 1, 2]
    day = dt.date.today().isoformat()
    tail = ("-quick" if args.quick else "") + ("-box" if args.prompt == "box" else "")
    args.out = args.out or REPO / "bench" / "results" / f"cpu-fast-agreement-{day}{tail}.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    notes = [
        f"fast variants at precision {args.precision}; exact mode is the official pipeline",
        "windows and tokens: exact mode encodes every prompt's own ROI, so its counts are summed over prompts; "
        "fast mode encodes a window its prompts share once ('official' = the official grid's windows)",
        "peak MB: the process's peak RSS during the call (models, scan and the exact / none results held)",
    ]
    if "512" in args.cases and "full" in args.models and not args.include_512:
        notes.append("512 case not run for the full-size model (~14 min a fast call on 2 cores): --include-512 runs it")
    for note in notes:
        print(note, flush=True)
    header = environment(variants=dict(VARIANTS), alone=list(ALONE), cases=args.cases, notes=notes)
    runs = []
    jobs = [("small", None)] if "small" in args.models else []  # the trained model first: it weighs most
    jobs += [("full", seed) for seed in args.seeds] if "full" in args.models else []
    for kind, seed in jobs:
        if kind == "small":
            model = small_model(args.small_model)
            if model is None:
                notes.append(f"small model skipped: no model/ or phase2/ weights under {args.small_model}")
                print(notes[-1], flush=True)
                continue
            cases, label = args.cases, f"small (trained{', boxes' if args.prompt == 'box' else ''})"
        else:
            model = full_model(seed, args.quick)
            cases = [c for c in args.cases if c != "512" or args.include_512]
            label = "tiny (random)" if args.quick else "full (random)"
        print(f"{label} seed {seed}:", flush=True)
        runs.append(
            {"model": kind, "label": label, "seed": seed, "cases": run_model(model, cases, kind == "small", args)}
        )
        write_report({**header, "runs": runs}, args.out)  # after every model: an interrupted run keeps what it did
    print(markdown({**header, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
