"""`segevol_fast.optimize` on the official SegVol image encoder, with MONAI 0.9.0 and the current MONAI.

    python bench/optimize_official.py         # (make bench-optimize) -> bench/results/cpu-optimize-official-<date>.json
    python bench/optimize_official.py --rounds 3 --monai current

1. Encoder: MONAI's ViT built with the official arguments (one full 32x256x256 window, 768 wide,
   12 layers, random weights seed 0, float32, CPU, one thread by default), as is and after
   `optimize`, rounds interleaved (A B, B A, ...) so drift hits both alike; medians of wall and of
   process CPU time, the speed-ups and the max |output difference|.
   Each MONAI runs in its own child process: 0.9.0 (what the official code pins) from the folder
   `make` installs beside the venv, first on PYTHONPATH; the current one from the venv.
2. Decoder attention: the official mask decoder's attention layer (q/k/v/out projections, optional
   downsampling of the width; rebuilt here from its structure) at its shapes in one decoder pass,
   as is and with its attention core on `ops.flash_attention`: the measurement behind leaving that
   layer out of `optimize`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.environment import environment, write_results  # noqa: E402
from bench.fresh_process import MARK, report  # noqa: E402

MONAI09 = pathlib.Path(sys.prefix).resolve() / "monai-0.9.0"  # where `make` installs it


def _interleaved(providers: dict, rounds: int) -> tuple[dict, dict]:
    """(wall, process CPU) seconds per call, providers alternating (A B, B A, ...) so that neither
    always runs on the caches the other warmed or in the same phase of other processes' load. With
    one thread the CPU time is the work itself, far less shaken by a shared machine than the wall."""
    wall: dict[str, list[float]] = {k: [] for k in providers}
    cpu: dict[str, list[float]] = {k: [] for k in providers}
    for r in range(rounds):
        for name, fn in list(providers.items())[::-1] if r % 2 else providers.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return wall, cpu


def _medians(times: dict) -> dict:
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------- 1. encoder (child)
def encoder(rounds: int) -> dict:
    import monai

    from bench.monai_vit import monai_vit
    from segevol_fast import SegVolConfig, optimize

    cfg = SegVolConfig()  # the official encoder: 32x256x256, patches 4x16x16, 768 wide, 12 layers
    torch.manual_seed(0)
    original = monai_vit(cfg).eval()
    optimized = copy.deepcopy(original)
    report_ = optimize(optimized)
    x = torch.rand(1, 1, *cfg.spatial_size)
    providers = {"original": lambda: original(x)[0], "optimized": lambda: optimized(x)[0]}
    with torch.inference_mode():
        outs = {k: fn() for k, fn in providers.items()}  # also the warm-up pass
        times, cpu = _interleaved(providers, rounds)
    med, med_cpu = _medians(times), _medians(cpu)
    diff = (outs["optimized"] - outs["original"]).abs().max().item()
    return {
        "monai": monai.__version__,
        "window": list(cfg.spatial_size),
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "replaced": len(report_.replaced),
        "left_alone": [f"{s.path}: {s.reason}" for s in report_.left_alone],
        "seconds": times,
        "median_s": med,
        "speedup": med["original"] / med["optimized"],
        "cpu_seconds": cpu,
        "median_cpu_s": med_cpu,
        "speedup_cpu": med_cpu["original"] / med_cpu["optimized"],
        "max_abs_diff": diff,
        "max_abs_output": outs["original"].abs().max().item(),
    }


def run_encoder_child(which: str, rounds: int, threads: int) -> dict:
    env = dict(os.environ)
    if which == "0.9.0":
        if not (MONAI09 / "monai" / "__init__.py").is_file():
            return {"error": f"MONAI 0.9.0 not installed at {MONAI09} (make build installs it)"}
        env["PYTHONPATH"] = os.pathsep.join([str(MONAI09), str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--child", "--rounds", str(rounds), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    line = next((out for out in proc.stdout.splitlines() if out.startswith(MARK)), None)
    return json.loads(line[len(MARK) :]) if line else {"error": proc.stderr[-3000:]}


# ---------------------------------------------------------------------------- 2. decoder attention
class DecoderAttention(nn.Module):
    """The official mask decoder's attention layer, from its structure: q/k/v projections to
    width // downsample, heads split off the width, softmax(q k^T / sqrt(head size)) v, out_proj."""

    def __init__(self, width: int, heads: int, downsample: int = 1):
        super().__init__()
        inner = width // downsample
        self.num_heads = heads
        self.q_proj, self.k_proj, self.v_proj = (
            nn.Linear(width, inner),
            nn.Linear(width, inner),
            nn.Linear(width, inner),
        )
        self.out_proj = nn.Linear(inner, width)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, -1).transpose(1, 2)

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        return self.out_proj(o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1))

    def forward(self, q, k, v):
        q, k, v = self.heads(self.q_proj(q)), self.heads(self.k_proj(k)), self.heads(self.v_proj(v))
        return self.merge(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v)

    def on_ops(self, q, k, v):
        """What a swap onto ops.flash_attention would run."""
        from segevol_fast import ops

        return self.merge(
            ops.flash_attention(self.heads(self.q_proj(q)), self.heads(self.k_proj(k)), self.heads(self.v_proj(v)))
        )

    def cores(self, q, k, v) -> dict:
        """The attention core alone, as is and on the op, on this layer's projected q, k, v."""
        from segevol_fast import ops

        q, k, v = self.heads(self.q_proj(q)), self.heads(self.k_proj(k)), self.heads(self.v_proj(v))
        return {
            "original": lambda: torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v,
            "on_ops": lambda: ops.flash_attention(q, k, v),
        }


def decoder_attention(rounds: int, prompt_tokens: int = 8) -> dict:
    """One decoder pass (2 two-way layers + the final token-to-image attention) at the official
    widths: 768 wide, 8 heads, cross-attention downsampled 2x; 2048 image tokens."""
    torch.manual_seed(0)
    tokens, image = torch.randn(1, prompt_tokens, 768), torch.randn(1, 2048, 768)
    layers = {  # name: (module, q, k, v, uses per decoder pass)
        "self (tokens)": (DecoderAttention(768, 8), tokens, tokens, tokens, 2),
        "token_to_image": (DecoderAttention(768, 8, 2), tokens, image, image, 3),
        "image_to_token": (DecoderAttention(768, 8, 2), image, tokens, tokens, 2),
    }
    out = {"prompt_tokens": prompt_tokens, "image_tokens": 2048, "rounds": rounds, "layers": {}}
    total = {"original": 0.0, "on_ops": 0.0}
    with torch.inference_mode():
        for name, (m, q, k, v, uses) in layers.items():
            providers = {"original": lambda: m(q, k, v), "on_ops": lambda: m.on_ops(q, k, v)}
            diff = (providers["on_ops"]() - providers["original"]()).abs().max().item()
            med = _medians(_interleaved(providers, rounds)[0])
            core = _medians(_interleaved(m.cores(q, k, v), rounds)[0])
            out["layers"][name] = {
                "median_s": med,
                "attention_core_median_s": core,
                "uses_per_pass": uses,
                "max_abs_diff": diff,
            }
            for p in total:
                total[p] += uses * med[p]
    out["per_decoder_pass_s"] = total
    out["speedup"] = total["original"] / total["on_ops"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decoder-rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time = the work)")
    parser.add_argument("--monai", choices=["0.9.0", "current", "both"], default="both")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--suffix", default="", help="results file name suffix (run1, ...): repeats on one day")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        report(encoder(args.rounds))
        return 0

    out = environment(dtype="float32", device="cpu")
    out["encoder"] = {}
    for which in ["0.9.0", "current"] if args.monai == "both" else [args.monai]:
        res = run_encoder_child(which, args.rounds, args.threads)
        out["encoder"][which] = res
        print(
            which,
            json.dumps(
                {
                    k: res.get(k)
                    for k in ("monai", "median_s", "speedup", "median_cpu_s", "speedup_cpu", "max_abs_diff", "error")
                }
            ),
            flush=True,
        )
    out["decoder_attention"] = decoder_attention(args.decoder_rounds)
    print("decoder attention", json.dumps(out["decoder_attention"]["per_decoder_pass_s"]), flush=True)
    write_results(out, args.out, "cpu-optimize-official", args.suffix)
    return 0 if not any("error" in r for r in out["encoder"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
