"""Adapters: training cost per method vs peft, parameter counts, file sizes, routed serving.

    python bench/adapter_bench.py                  # (make bench-adapters) -> bench/results/cpu-adapters-<date>.json
    python bench/adapter_bench.py --config small --cases train

1. train: one training step (encode one window, decode 4 text+box prompts, official BCE + Dice,
   backward, AdamW step) per method on the official-size model (random weights), each method in a
   fresh process so its peak RSS (ru_maxrss) is its own: LoRA through segevol_fast and the same
   LoRA through peft (same targets, rank, alpha), bottleneck adapters, a 2-expert LoRA mixture
   (top-1 router), context priors (additive, Hermes-style), and full fine-tuning. Median of the
   timed steps after one warm-up. Also the trainable-parameter count and the adapter file size.
2. serve: 4 scans, each with its own LoRA adapter: `segment_batch` (every zoom-out image in one
   routed encoder pass) vs 4 separate `segment(..., adapter=...)` calls, same process, alternated.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.environment import environment, write_results  # noqa: E402
from bench.fresh_process import report, run_child  # noqa: E402
from bench.shared_data import DATA  # noqa: E402

TARGETS = (
    "image_encoder.blocks.*.attn.qkv",
    "image_encoder.blocks.*.mlp.linear1",
    "image_encoder.blocks.*.mlp.linear2",
)
PEFT_TARGETS = r".*image_encoder\.blocks\.\d+\.(attn\.qkv|mlp\.linear1|mlp\.linear2)"
METHODS = ("segevol_fast_lora", "peft_lora", "bottleneck", "mixture_top1", "priors_additive", "priors_hermes", "full")
ORGANS = ["liver", "spleen", "left kidney", "right kidney"]


def _model(config: str):
    import torch

    from segevol_fast import SegVol, SegVolConfig

    torch.manual_seed(0)
    cfg = SegVolConfig.small() if config == "small" else SegVolConfig()
    model = SegVol(cfg, tokenizer=DATA / "clip_tokenizer")
    model.weights_source = "random (benchmark)"
    return model


def _attach(model, method: str):
    """Attach `method`; returns (trainable parameters, route function or None, file-saving function or None)."""
    from segevol_fast import adapters

    lora = adapters.LoraConfig(rank=16, alpha=16, targets=TARGETS)
    if method == "segevol_fast_lora":
        adapters.add_lora(model, "x", lora)
    elif method == "peft_lora":
        import peft

        for p in model.parameters():
            p.requires_grad_(False)
        peft.inject_adapter_in_model(peft.LoraConfig(r=16, lora_alpha=16, target_modules=PEFT_TARGETS), model)
        return [p for p in model.parameters() if p.requires_grad], None, None
    elif method == "bottleneck":
        adapters.add_bottleneck(model, "x", adapters.BottleneckConfig(dim=64))
    elif method == "mixture_top1":
        adapters.add_mixture(model, "x", adapters.MixtureConfig(experts=("a", "b"), routing="top1", lora=lora))
        return (
            adapters.adapter_parameters(model),
            lambda x: adapters.route_for(model, "x", images=x),
            lambda path: adapters.save_adapter(model, "x", path),
        )
    elif method.startswith("priors"):
        variant = method.split("_")[1]
        adapters.add_context_priors(model, "x", adapters.ContextPriorConfig(variant=variant, tasks=tuple(ORGANS)))
    elif method == "full":
        return [p for p in model.parameters() if p.requires_grad], None, None
    return adapters.adapter_parameters(model), None, lambda path: adapters.save_adapter(model, "x", path)


def case_train(method: str, config: str, steps: int) -> dict:
    import contextlib

    import torch

    from segevol_fast import adapters
    from segevol_fast.train.loss import bce_dice_loss

    model = _model(config)
    model.train()
    params, route_fn, save = _attach(model, method)
    opt = torch.optim.AdamW(params, lr=1e-4)
    D, H, W = model.config.spatial_size
    x = torch.rand(1, 1, D, H, W)
    target = (torch.rand(len(ORGANS), 1, D, H, W) > 0.7).float()
    boxes = torch.tensor([[1, 2, 3, D - 2, H - 3, W - 4]] * len(ORGANS), dtype=torch.float32)
    with torch.no_grad():
        text = model.encode_text(ORGANS, "mri")

    def step():
        r = route_fn(x) if route_fn else None
        with (
            adapters.prompt_context(modalities=["mri"], tasks=ORGANS),
            adapters.route(r) if r is not None else contextlib.nullcontext(),
        ):
            logits = model.decode(model.encode_image(x), text_embedding=text, boxes=boxes)
            loss = bce_dice_loss(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: allocator, oneDNN primitives, optimizer state
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    size = None
    if save is not None:
        with tempfile.TemporaryDirectory() as d:
            path = pathlib.Path(save(pathlib.Path(d) / "a.safetensors"))
            size = path.stat().st_size
    return {
        "method": method,
        "step_seconds": times,
        "median_step_s": statistics.median(times),
        "trainable_parameters": sum(p.numel() for p in params),
        "adapter_file_bytes": size,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def case_serve(config: str, rounds: int) -> dict:
    import torch

    from segevol_fast import adapters
    from segevol_fast.inference import segment, segment_batch

    model = _model(config).eval()
    names = [f"a{i}" for i in range(4)]
    for n in names:
        adapters.add_lora(model, n, adapters.LoraConfig(rank=16, alpha=16, targets=TARGETS))
        with torch.no_grad():
            for _, m in adapters.adapter_modules(model, n):
                for b in m.lora_B:
                    b.normal_(0, 0.01)
    adapters.set_active(model, None)
    scans = [DATA / "ct_abdomen_sm.nii.gz", DATA / "mr_abdomen_sm.nii.gz"] * 2
    mods = ["ct", "mri"] * 2
    from segevol_fast import load_volume

    vols = [load_volume(s) for s in scans]
    kw = dict(text="liver", progress=False)
    batch, separate = [], []
    for _ in range(rounds + 1):  # the first round is a warm-up
        t = time.perf_counter()
        segment_batch(model, vols, names, modality=mods, **kw)
        batch.append(time.perf_counter() - t)
        t = time.perf_counter()
        for v, n, m in zip(vols, names, mods):
            segment(model, v, adapter=n, modality=m, **kw)
        separate.append(time.perf_counter() - t)
    b, s = statistics.median(batch[1:]), statistics.median(separate[1:])
    return {
        "scans": [str(p.name) for p in scans],
        "adapters": names,
        "segment_batch_s": batch[1:],
        "separate_calls_s": separate[1:],
        "median_batch_s": b,
        "median_separate_s": s,
        "separate_over_batch": s / b,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=["official", "small"], default="official")
    p.add_argument("--cases", nargs="+", default=["train", "serve"], choices=["train", "serve"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        report(
            case_train(rest[0], args.config, args.steps) if kind == "train" else case_serve(args.config, args.rounds)
        )
        return 0

    out = environment(config=args.config, train={})
    extra = ["--config", args.config, "--steps", str(args.steps), "--rounds", str(args.rounds)]
    if "train" in args.cases:
        for m in args.methods:
            out["train"][m] = run_child(__file__, extra + ["--child", "train", m], cwd=REPO)
            print(m, json.dumps(out["train"][m])[:300], flush=True)
    if "serve" in args.cases:
        out["serve"] = run_child(__file__, extra + ["--child", "serve"], cwd=REPO)
        print("serve", json.dumps(out["serve"])[:400], flush=True)
    write_results(out, args.out, f"cpu-adapters-{args.config}")
    return 0 if all("error" not in r for r in out["train"].values()) and "error" not in out.get("serve", {}) else 1


if __name__ == "__main__":
    sys.exit(main())
