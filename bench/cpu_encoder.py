"""The CPU encoder and the evidence for precision="auto" on the CPU.

    python bench/cpu_encoder.py            # (make bench-encoder) -> bench/results/cpu-encoder-<date>.json
    python bench/cpu_encoder.py --rounds 5 --skip-agreement

1. Speed: one 32x256x256 window through `encode_image` in float32 and in bf16 autocast, next to
   MONAI's ViT (the official encoder) on the same weights, rounds interleaved (A B C A B C ...) so
   drift hits every provider alike; medians quoted. Plus where the float32 time goes (profiler,
   one pass): GEMMs, attention, the rest.
2. Agreement: fast-mode zoom-out-zoom-in in float32 and in bf16 on the shared CT, abdominal MRI and
   brain MRI (full-size model, random weights seed 0): per prompt the max and mean |logit
   difference| and the Dice of the two masks. Random weights make the masks meaningless as
   segmentations; the comparison measures only what bf16 arithmetic changes.
3. What precision="auto" picks on this machine, and why (`inference.precision`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.environment import environment, write_results  # noqa: E402
from bench.shared_data import DATA  # noqa: E402

CASES = {  # name: (file, prompts, modality)
    "ct_abdomen": ("ct_abdomen_sm.nii.gz", ["liver", "spleen", "left kidney", "right kidney"], "ct"),
    "mr_abdomen": ("mr_abdomen_sm.nii.gz", ["liver", "spleen", "left kidney", "right kidney"], "mri"),
    "mr_brain": ("mr_brain_mni152_t1.nii.gz", ["brain", "gray matter", "white matter"], "mri"),
}


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def encoder_speed(rounds: int) -> dict:
    from bench.monai_vit import monai_grid, paired
    from segevol_fast.model import SegVolConfig

    cfg = SegVolConfig()
    torch.manual_seed(0)
    monai, ours = paired(cfg)
    x = torch.rand(1, 1, *cfg.spatial_size)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    providers = {
        "segevol_fast fp32": lambda: ours(x),
        "segevol_fast bf16 autocast": lambda: _under(bf16, ours, x),
        "MONAI ViT fp32 (official encoder)": lambda: monai(x),
    }
    times: dict[str, list[float]] = {k: [] for k in providers}
    with torch.inference_mode():
        out32 = ours(x)
        out16 = _under(bf16, ours, x).float()
        ref = monai_grid(monai, x, cfg)
        for _ in range(rounds):
            for name, fn in providers.items():
                times[name].append(_time(fn))
    scale = ref.abs().max().item()
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["MONAI ViT fp32 (official encoder)"]
    return {
        "window": list(cfg.spatial_size),
        "rounds": rounds,
        "seconds": times,
        "median_s": med,
        "speedup_vs_monai": {k: base / v for k, v in med.items()},
        "max_rel_err_fp32_vs_monai": (out32 - ref).abs().max().item() / scale,
        "max_rel_err_bf16_vs_fp32": (out16 - out32).abs().max().item() / scale,
        "profile_fp32": _profile(ours, x),
    }


def _under(ctx, module, x):
    with ctx:
        return module(x)


def _profile(module, x) -> dict:
    """Self CPU seconds of one float32 pass, grouped: GEMMs, attention, everything else."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        module(x)
    groups = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        name = ev.key
        group = (
            "gemm"
            if name in ("aten::addmm", "aten::mm", "aten::bmm")
            else ("attention" if "scaled_dot_product" in name else "other")
        )
        groups[group] += ev.self_cpu_time_total / 1e6
    return groups


def _model():
    from segevol_fast import SegVol, SegVolConfig

    torch.manual_seed(0)
    model = SegVol(SegVolConfig(), tokenizer=DATA / "clip_tokenizer").eval()
    model.weights_source = "random (benchmark)"
    return model


def _fast_logits(model, prep, prompts, modality: str, precision: str):
    from segevol_fast.inference.fast import run_fast

    model.set_precision(precision)
    try:
        with torch.inference_mode():
            t = time.perf_counter()
            outs = run_fast(model, prep, prompts, modality=modality, return_logits=True)
            return outs, time.perf_counter() - t
    finally:
        model.set_precision("fp32")


def _dice(a: torch.Tensor, b: torch.Tensor) -> float | None:
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2 * int((a & b).sum()) / total


def agreement(model, name: str) -> dict:
    from segevol_fast import load_volume
    from segevol_fast.inference.prompts import build_prompts
    from segevol_fast.preprocess import preprocess

    file, names, modality = CASES[name]
    vol = load_volume(DATA / file)
    prep = preprocess(vol.array, lazy=True)
    prompts = build_prompts(
        names, None, None, None, shape=vol.shape, start=prep.start, coords="voxel", affine=vol.affine
    )
    fp32, t32 = _fast_logits(model, prep, prompts, modality, "fp32")
    bf16, t16 = _fast_logits(model, prep, prompts, modality, "bf16")
    per_prompt = {}
    for p, a, b in zip(prompts, fp32, bf16):
        diff = (a.logits.float() - b.logits.float()).abs()
        per_prompt[p.label] = {
            "voxels": a.mask.numel(),
            "fg_voxels_fp32": int(a.mask.sum()),
            "fg_voxels_bf16": int(b.mask.sum()),
            "mask_dice": _dice(a.mask, b.mask),
            "voxels_differing": int((a.mask != b.mask).sum()),
            "logit_max_abs_diff": diff.max().item(),
            "logit_mean_abs_diff": diff.mean().item(),
            "logit_abs_max_fp32": a.logits.float().abs().max().item(),
            "same_roi": a.roi == b.roi,
            "windows_fp32": a.windows,
            "windows_bf16": b.windows,
        }
    return {
        "input": file,
        "shape": list(vol.shape),
        "modality": modality,
        "seconds_fp32": t32,
        "seconds_bf16": t16,
        "prompts": per_prompt,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()

    from segevol_fast.inference.precision import cpu_bf16_native, resolve_precision

    native, why = cpu_bf16_native()
    out = environment(
        cpu_bf16_native=native,
        why=why,
        auto_picks_fast_mode=resolve_precision("auto", "fp32", torch.device("cpu"), "fast"),
    )
    print(json.dumps(out), flush=True)
    out["encoder"] = encoder_speed(args.rounds)
    print(json.dumps(out["encoder"]["median_s"]), flush=True)
    if not args.skip_agreement:
        model = _model()
        out["agreement"] = {}
        for name in CASES:
            out["agreement"][name] = agreement(model, name)
            print(name, json.dumps(out["agreement"][name])[:600], flush=True)
    write_results(out, args.out, "cpu-encoder")
    return 0


if __name__ == "__main__":
    sys.exit(main())
