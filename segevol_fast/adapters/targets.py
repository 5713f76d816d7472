"""Which layers an adapter attaches to: module-name patterns, with q/k/v slices of a fused qkv.

A target is "glob" or "glob:parts": the glob is matched against `model.named_modules()` names with
fnmatch (`*` also crosses dots), and `parts` picks slices of a fused projection whose output is
[q | k | v] (the encoder's `attn.qkv`), e.g. "image_encoder.blocks.*.attn.qkv:q,v". Without parts
the whole output is adapted.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Sequence

from torch import nn

from ..errors import AdapterError

# SegEVOLution's LoRA targets (docs/adapters.md, "SegEVOLution"): the ViT's fused qkv and
# MLP, and the q/v projections of three of the mask decoder's attentions.
SEGEVOLUTION_TARGETS: tuple[str, ...] = (
    "image_encoder.blocks.*.attn.qkv",
    "image_encoder.blocks.*.mlp.linear1",
    "image_encoder.blocks.*.mlp.linear2",
    "mask_decoder.transformer.layers.*.self_attn.q_proj",
    "mask_decoder.transformer.layers.*.self_attn.v_proj",
    "mask_decoder.transformer.layers.*.cross_attn_image_to_token.q_proj",
    "mask_decoder.transformer.layers.*.cross_attn_image_to_token.v_proj",
    "mask_decoder.transformer.final_attn_token_to_image.q_proj",
    "mask_decoder.transformer.final_attn_token_to_image.v_proj",
)

_QKV_PARTS = ("q", "k", "v")


def parse_target(target: str) -> tuple[str, tuple[str, ...]]:
    """ "glob[:q,k,v]" -> (glob, parts); parts empty = the whole output."""
    glob, _, parts = target.partition(":")
    names = tuple(p.strip() for p in parts.split(",") if p.strip())
    bad = [p for p in names if p not in _QKV_PARTS]
    if not glob or bad or len(set(names)) != len(names):
        raise AdapterError(
            f"bad adapter target {target!r}: expected 'module.name.glob' or 'glob:q,v' "
            f"with parts among {_QKV_PARTS}, each once"
        )
    return glob, names


def output_slices(layer: nn.Linear, parts: Sequence[str], name: str) -> list[tuple[int, int]]:
    """Output column ranges an adapter on `layer` adds to: all of it, or the q/k/v thirds named."""
    n = layer.out_features
    if not parts:
        return [(0, n)]
    if n % 3:
        raise AdapterError(f"{name}: q/k/v parts need an output of [q | k | v] (a multiple of 3), got {n}")
    third = n // 3
    return [(i * third, (i + 1) * third) for i, p in enumerate(_QKV_PARTS) if p in parts]


def match_linears(model: nn.Module, targets: Iterable[str]) -> list[tuple[str, nn.Linear, tuple[str, ...]]]:
    """(name, layer, parts) for every nn.Linear matched by some target, in module order.

    Raises AdapterError when a target matches nothing (a typo would otherwise train nothing), when
    it matches a module that is not a Linear, or when two targets claim one layer."""
    parsed = [(t, *parse_target(t)) for t in targets]
    if not parsed:
        raise AdapterError("no adapter targets given")
    modules = dict(model.named_modules())
    found: dict[str, tuple[nn.Linear, tuple[str, ...]]] = {}
    for target, glob, parts in parsed:
        hits = [n for n in modules if fnmatch.fnmatchcase(n, glob)]
        if not hits:
            raise AdapterError(f"adapter target {target!r} matches no module of {type(model).__name__}")
        for n in hits:
            if not isinstance(modules[n], nn.Linear):
                raise AdapterError(
                    f"adapter target {target!r} matches {n}, a {type(modules[n]).__name__}, not a Linear"
                )
            if n in found:
                raise AdapterError(f"{n} is matched by two adapter targets; give each layer one target")
            found[n] = (modules[n], parts)
    order = {n: i for i, n in enumerate(modules)}
    return [(n, layer, parts) for n, (layer, parts) in sorted(found.items(), key=lambda kv: order[kv[0]])]
