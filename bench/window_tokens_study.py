"""What encoding only a window's image tokens costs in accuracy and saves in time.

    python bench/window_tokens_study.py                 # -> bench/results/cpu-window-tokens-<date>.json
    python bench/window_tokens_study.py --seeds 0 --cases ct_small

Fast mode's zoom-in windows (32x256x256, 8x16x16 tokens) are mostly zero padding on scans shorter
than the window. `inference/window_tokens.py` encodes only the token box that touches the image,
grown by `margin` tokens, and fills the rest. For real windows of the shared scans, on the
full-size model with random weights (seeds 0..2), this measures per (margin, fill):

* token error: ||box - full|| / ||full|| over the image tokens (the margin-0 box) of the embedding;
* mask agreement: Dice of logits > 0 of `model.decode(emb, text_embedding=...)`, over the window's
  image voxels (the padding is cropped away when windows are stitched), against the full
  embedding's decode; and the largest |logit| difference there;
* encoder time of the box next to the full window (one pass each, after one warm-up pass).

Random weights make the masks meaningless as segmentations; the comparison measures only what
leaving out the padding tokens changes. They are also the worst case for the summary fills: the
random position embeddings are independent from token to token, so no token stands for its
neighbours, whereas a trained ViT's vary smoothly over the grid. `--smooth-positions` replaces
them with a 3-D sin-cos embedding of the same standard deviation (0.02) to show that case.
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
import torch.nn.functional as F  # noqa: E402

from bench.environment import environment, write_results  # noqa: E402
from bench.shared_data import DATA  # noqa: E402
from segevol_fast.crop import StoredCrop  # noqa: E402
from segevol_fast.geometry.sliding_window import global_grid  # noqa: E402
from segevol_fast.inference.window_tokens import (  # noqa: E402
    FILLS,
    SUMMARY_FILLS,
    encoded_tokens,
    fill_grid,
    fill_summaries,
    padding_groups,
    read_boxes,
    token_box,
)
from segevol_fast.io.load import load_volume  # noqa: E402
from segevol_fast.model.config import SegVolConfig  # noqa: E402
from segevol_fast.model.network import SegVolNetwork  # noqa: E402
from segevol_fast.preprocess import preprocess  # noqa: E402

MARGINS = (0, 1, 2)
# name: (file, crop resized to this (D', H', W') or None, prompt, which grid windows: D index fractions)
CASES = {
    "ct_small": ("ct_abdomen_sm.nii.gz", None, "liver", (0.0,)),
    "ct_164x126x120": ("ct_abdomen_sm.nii.gz", (164, 126, 120), "liver", (0.5,)),
    "mr_brain": ("mr_brain_mni152_t1.nii.gz", None, "brain", (0.5,)),
}


def load_crop(file: str, size) -> StoredCrop:
    """The preprocessed crop of a shared scan, trilinearly resized to `size` when given (a CT of
    the shape the study needs; intensities stay in [0, 1])."""
    crop = preprocess(load_volume(DATA / file), lazy=True).crop.full()
    if size is not None:
        crop = F.interpolate(crop[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    return StoredCrop(crop.contiguous())


def sincos_positions(grid, hidden: int, std: float = 0.02) -> torch.Tensor:
    """(1, N, hidden) 3-D sin-cos position embedding (a third of the channels per axis), scaled
    to `std`: smooth over the grid, as trained position embeddings are."""
    per = hidden // 3
    freqs = 1.0 / 100.0 ** (torch.arange(per // 2, dtype=torch.float64) / (per // 2))
    index = torch.meshgrid(*(torch.arange(g, dtype=torch.float64) for g in grid), indexing="ij")
    angles = [i.flatten()[:, None] * freqs for i in index]
    pe = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], 1)
    pe = torch.cat([pe, pe.new_zeros(pe.shape[0], hidden - pe.shape[1])], 1)
    return (pe / pe.std() * std).float()[None]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def study_window(model, crop: StoredCrop, origin, text: torch.Tensor) -> dict:
    """Every (margin, fill) of one window against its full encoding."""
    cfg = model.config
    window, patch, grid = cfg.spatial_size, cfg.patch_size, cfg.grid_size
    image_lo, image_hi = token_box(crop.shape, origin, window, patch, 0)
    image_tokens = (slice(None), slice(None)) + tuple(slice(a, b) for a, b in zip(image_lo, image_hi))
    # the window voxels that hold image
    image_vox = (slice(None), slice(None)) + tuple(
        slice(max(0, -o), min(r, n - o)) for n, o, r in zip(crop.shape, origin, window)
    )
    model.encode_image(read_boxes(crop, [origin], window))  # warm-up
    full, t_full = timed(lambda: model.encode_image(read_boxes(crop, [origin], window)))
    ref_logits = model.decode(full, text_embedding=text)[image_vox]
    ref_mask = ref_logits > 0
    row = {
        "origin": list(origin),
        "image_tokens": [list(image_lo), list(image_hi)],
        "full_tokens": cfg.num_patches,
        "full_s": round(t_full, 3),
        "mask_fraction": round(ref_mask.float().mean().item(), 4),
        "margins": {},
    }
    for margin in MARGINS:
        lo, hi = token_box(crop.shape, origin, window, patch, margin)
        size = [b - a for a, b in zip(lo, hi)]
        x = read_boxes(
            crop, [tuple(o + a * p for o, a, p in zip(origin, lo, patch))], [n * p for n, p in zip(size, patch)]
        )
        box, t_box = timed(lambda: model.encode_image_tokens(x, lo, hi))
        entry = {"box": [list(lo), list(hi)], "tokens": int(torch.tensor(size).prod()), "box_s": round(t_box, 3)}
        embs = {
            fill: fill_grid(box, lo, grid, fill, (image_lo, image_hi)) for fill in FILLS if fill not in SUMMARY_FILLS
        }
        for fill, sides in SUMMARY_FILLS.items():
            groups, owner = padding_groups(lo, hi, grid, sides)
            if len(groups) == 0:  # the box is the whole grid
                embs[fill] = box
                continue
            (part, summaries), t = timed(lambda: model.encode_image_tokens(x, lo, hi, padding_groups=groups[None]))
            embs[fill] = fill_summaries(part, lo, grid, summaries, owner)
            entry[f"{fill}_s"] = round(t, 3)
        for fill, emb in embs.items():
            err = (emb[image_tokens] - full[image_tokens]).norm() / full[image_tokens].norm()
            logits = model.decode(emb, text_embedding=text)[image_vox]
            entry[fill] = {
                "token_rel_err": round(err.item(), 5),
                "dice": round(dice(logits > 0, ref_mask), 5),
                "max_logit_diff": round((logits - ref_logits).abs().max().item(), 4),
            }
        row["margins"][margin] = entry
        print(f"    margin {margin}: {entry}", flush=True)
    return row


def summary(runs: list[dict]) -> str:
    """Per margin and fill, over all windows: tokens encoded (summary tokens included), mean token
    error, mean and worst Dice, and the encoder time over the full window's (median ratio)."""
    window, patch = SegVolConfig().spatial_size, SegVolConfig().patch_size
    head = ("margin", "fill", "tokens", "token err", "Dice mean", "Dice min", "time/full")
    lines = ["{:>6} {:<13} {:>7} {:>9} {:>9} {:>8} {:>9}".format(*head)]
    for margin in MARGINS:
        for fill in FILLS:
            rows = [r["margins"].get(margin, r["margins"].get(str(margin))) for r in runs]
            dices = [e[fill]["dice"] for e in rows]
            cells = (
                margin,
                fill,
                statistics.mean(encoded_tokens(r["crop"], r["origin"], window, patch, margin, fill) for r in runs),
                statistics.mean(e[fill]["token_rel_err"] for e in rows),
                statistics.mean(dices),
                min(dices),
                statistics.median(e.get(f"{fill}_s", e["box_s"]) / r["full_s"] for e, r in zip(rows, runs)),
            )
            lines.append("{:>6} {:<13} {:>7.0f} {:>9.3f} {:>9.3f} {:>8.3f} {:>9.2f}".format(*cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--smooth-positions", action="store_true", help="sin-cos position embeddings (docstring)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--report", help="only print the summary of a results file")
    args = ap.parse_args()
    if args.report:
        print(summary(json.loads(pathlib.Path(args.report).read_text())["runs"]))
        return
    crops = {name: load_crop(CASES[name][0], CASES[name][1]) for name in args.cases}
    runs = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = SegVolNetwork(SegVolConfig(), tokenizer=DATA / "clip_tokenizer").eval()
        if args.smooth_positions:
            with torch.no_grad():
                pos = sincos_positions(model.config.grid_size, model.config.hidden_size)
                model.image_encoder.patch_embedding.position_embeddings.copy_(pos)
        with torch.inference_mode():
            for name in args.cases:
                _, _, prompt, fractions = CASES[name]
                crop = crops[name]
                grid = global_grid(crop.shape, model.config.spatial_size)
                text = model.encode_text([prompt], "mri" if name.startswith("mr") else "ct")
                for frac in fractions:
                    origin = (grid[0][round(frac * (len(grid[0]) - 1))], grid[1][0], grid[2][0])
                    print(f"seed {seed} {name} crop {crop.shape} window at {origin}", flush=True)
                    runs.append(
                        {
                            "seed": seed,
                            "case": name,
                            "crop": list(crop.shape),
                            **study_window(model, crop, origin, text),
                        }
                    )
    out = environment(margins=list(MARGINS), fills=list(FILLS), smooth_positions=args.smooth_positions, runs=runs)
    write_results(out, args.out, "cpu-window-tokens", "smooth-positions" if args.smooth_positions else "")
    print(summary(runs))


if __name__ == "__main__":
    main()
