"""`optimize(model)`: route an existing model's attention, patch embedding and LoRA linears
through `segevol_fast.ops`, in place, weights untouched.

Recognised modules (by class name and defining package, so neither MONAI nor peft is imported):

  * MONAI `SABlock` (einsum and `use_flash_attention`/SDPA variants) -> `ops.flash_attention`
  * MONAI `PatchEmbeddingBlock`, "perceptron" projection, 3-D -> `ops.patch_embed`
  * peft `lora.Linear` (one plain LoRA adapter) -> `ops.lora_linear`
  * our own `segevol_fast` models: already on the ops; only `backend=` is applied

A swap replaces the instance's `forward` (the class and the parameters stay as they are). The
conditions a swap relies on (no dropout active, adapter not merged, ...) are checked once for the
report and again on every call: a module whose state changed since (train(), merge_adapter(),
an attention mask argument, ...) runs its original forward for that call, so results never
silently differ from the original module beyond the numerics of the ops.

MONAI modules are read by attribute presence, with defaults that match the releases lacking an
attribute, from 0.9.0 (what the official SegVol code pins) to the current 1.x: a module whose
attributes do not describe a layout the swap can run is left alone, with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import ops
from .errors import ArgumentTypeError

# Instance attribute holding the forward that was in place before the swap (for fallbacks and
# for re-running optimize with another backend without stacking wrappers).
_ORIGINAL = "_segevol_fast_original_forward"
_SEGVOL_METHODS = ("forward", "encode_image", "encode_text", "decode", "segment")


@dataclasses.dataclass(frozen=True)
class Swap:
    path: str  # module path in model.named_modules() ("" is the model itself)
    kind: str  # e.g. "monai.SABlock"
    replacement: str  # e.g. "ops.flash_attention"


@dataclasses.dataclass(frozen=True)
class LeftAlone:
    path: str
    kind: str
    reason: str


@dataclasses.dataclass
class OptimizeReport:
    """What `optimize` replaced and what it recognised but left alone, with the reason."""

    backend: Optional[str]
    replaced: list[Swap] = dataclasses.field(default_factory=list)
    left_alone: list[LeftAlone] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"optimize: {len(self.replaced)} replaced, {len(self.left_alone)} left alone"
            f" (backend={self.backend or 'auto'})"
        ]
        lines += [f"  replaced {s.path or '<model>'} ({s.kind}) -> {s.replacement}" for s in self.replaced]
        lines += [f"  left alone {s.path or '<model>'} ({s.kind}): {s.reason}" for s in self.left_alone]
        return "\n".join(lines)


def _kind(module: nn.Module) -> Optional[str]:
    """Which recognised family `module` belongs to, judged by its class's defining module."""
    cls = type(module)
    mod, name = cls.__module__, cls.__name__
    if mod.startswith("monai.") and name in ("SABlock", "PatchEmbeddingBlock"):
        return f"monai.{name}"
    if mod.startswith("peft.tuners.lora") and name == "Linear":
        return "peft.lora.Linear"
    if mod.startswith("segevol_fast."):
        return "segevol_fast"
    return None


def _dropout_active(p: float, training: bool) -> bool:
    return p > 0 and training


# ---------------------------------------------------------------------------- MONAI SABlock
# A swap runs the block's attention from its own attributes, which MONAI has renamed over its
# releases; each is read by presence, with the default that matches the releases lacking it
# (0.9.0 is what the official SegVol code pins):
#   head size      `head_dim` up to 1.3.0, `dim_head` from 1.3.1
#   q, k, v        one `qkv` Linear; from 1.4 `use_combined_linear=False` means to_q / to_k / to_v
#   out_proj       always applied before 1.4; from 1.4 only when `include_fc`
#   attn dropout   `drop_weights` (nn.Dropout: training only) on the einsum path; `dropout_rate`
#                  passed to SDPA, live in eval too, when `use_flash_attention` (from 1.4)
# The head split and merge are checked on the blocks' own einops patterns, so a layout no release
# has is left alone instead of being read wrongly.
_HEAD_SPLIT = {True: "b h (qkv l d) -> qkv b l h d", False: "b h (l d) -> b l h d"}  # by use_combined_linear
_HEAD_MERGE = ("b h l d -> b l (h d)", "b l h d -> b h (l d)")  # up to 1.3 / from 1.4: one permutation


@dataclasses.dataclass(frozen=True)
class _Heads:
    """How one SABlock's forward splits, scales and merges its heads."""

    num: int
    dim: int
    scale: float
    combined: bool  # one qkv Linear rather than to_q / to_k / to_v
    out_proj: bool


def _einops_pattern(module: Any) -> tuple[str, dict]:
    """(pattern with single spaces, axis lengths) of an einops Rearrange; ("", {}) for anything else."""
    pattern = " ".join(str(getattr(module, "pattern", "")).split())
    return pattern, dict(getattr(module, "axes_lengths", None) or {})


def _width(module: Any, attr: str) -> Optional[int]:
    """in_features / out_features of a Linear or of a wrapper that reports them (peft's lora.Linear)."""
    value = getattr(module, attr, None)
    return value if isinstance(value, int) else None


def _sablock_heads(m: nn.Module) -> "_Heads | str":
    """The block's head layout, or why the swap cannot read it."""
    num = getattr(m, "num_heads", None)
    dim = getattr(m, "dim_head", getattr(m, "head_dim", None))
    scale = getattr(m, "scale", None)
    if not isinstance(num, int) or not isinstance(dim, int) or num < 1 or dim < 1:
        return f"no integer num_heads and dim_head / head_dim (found {num!r}, {dim!r})"
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        return f"no numeric softmax scale (found {scale!r})"
    heads = _Heads(
        num, dim, float(scale), bool(getattr(m, "use_combined_linear", True)), bool(getattr(m, "include_fc", True))
    )
    return _sablock_layout_why_not(m, heads) or heads


def _sablock_layout_why_not(m: nn.Module, heads: _Heads) -> Optional[str]:
    inner = heads.num * heads.dim
    pattern, lengths = _einops_pattern(getattr(m, "input_rearrange", None))
    if pattern != _HEAD_SPLIT[heads.combined] or lengths.get("l") != heads.num:
        return f"input_rearrange {pattern!r} {lengths} is not MONAI's head split into {heads.num} heads"
    if _einops_pattern(getattr(m, "out_rearrange", None))[0] not in _HEAD_MERGE:
        return "out_rearrange is not MONAI's head merge"
    projections = {"qkv": 3 * inner} if heads.combined else {"to_q": inner, "to_k": inner, "to_v": inner}
    for name, width in projections.items():
        if _width(getattr(m, name, None), "out_features") != width:
            return f"{name} does not output {width} features ({heads.num} heads x {heads.dim})"
    if heads.out_proj and _width(getattr(m, "out_proj", None), "in_features") != inner:
        return f"out_proj does not take {inner} features"
    if not isinstance(getattr(m, "drop_output", None), nn.Module):
        return "no drop_output module"
    return None


def _sablock_why_not(m: nn.Module) -> Optional[str]:
    heads = _sablock_heads(m)
    return heads if isinstance(heads, str) else _sablock_state_why_not(m, at_call=False)


def _sablock_state_why_not(m: nn.Module, at_call: bool) -> Optional[str]:
    """What in the block's settings the op cannot express; dropout counts only `at_call`."""
    if getattr(m, "causal", False):
        return "causal attention (the op has no causal mask)"
    if getattr(m, "rel_positional_embedding", None) is not None:
        return "relative position embedding on the score matrix"
    if getattr(m, "save_attn", False):
        return "save_attn=True needs the attention matrix, which the op never forms"
    if getattr(m, "attention_dtype", None) is not None:
        return "attention_dtype casts q and k only; not reproduced"
    return _sablock_dropout_why_not(m, at_call)


def _sablock_dropout_why_not(m: nn.Module, at_call: bool) -> Optional[str]:
    # MONAI's SDPA path passes dropout_rate even in eval mode, so any rate > 0 is always live there;
    # the einsum path drops only in training, a state that can change after optimize: per call.
    if getattr(m, "use_flash_attention", False):
        p = float(getattr(m, "dropout_rate", 0.0))
        return f"attention dropout {p} is active (the op has no dropout)" if p > 0 else None
    drop = getattr(m, "drop_weights", None)
    p = float(getattr(drop, "p", 0.0))
    if at_call and _dropout_active(p, bool(getattr(drop, "training", False))):
        return f"attention dropout {p} is active (training mode; the op has no dropout)"
    return None


def _no_mask(args: tuple, kwargs: dict) -> bool:
    """No argument besides x, or only the `attn_mask=None` that MONAI >= 1.5's TransformerBlock
    passes to every block (earlier releases' forwards take x alone)."""
    extra = (*args, *kwargs.values())
    return len(extra) <= 1 and set(kwargs) <= {"attn_mask"} and all(a is None for a in extra)


def _sablock_forward(m: nn.Module, original: Callable, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    heads = _sablock_heads(m)
    if (
        not _no_mask(args, kwargs)
        or isinstance(heads, str)
        or x.dim() != 3
        or _sablock_state_why_not(m, at_call=True) is not None
    ):
        return original(x, *args, **kwargs)  # a mask, or a state the op cannot express: MONAI's own
    b, n = x.shape[0], x.shape[1]
    if heads.combined:  # MONAI: "b h (qkv l d) -> qkv b l h d"
        q, k, v = m.qkv(x).view(b, n, 3, heads.num, heads.dim).permute(2, 0, 3, 1, 4).unbind(0)
    else:  # "b h (l d) -> b l h d"
        q, k, v = (p(x).view(b, n, heads.num, heads.dim).transpose(1, 2) for p in (m.to_q, m.to_k, m.to_v))
    out = ops.flash_attention(q, k, v, scale=heads.scale)
    out = out.transpose(1, 2).reshape(b, n, heads.num * heads.dim)  # "b l h d -> b h (l d)"
    if heads.out_proj:
        out = m.out_proj(out)
    return m.drop_output(out)


# ---------------------------------------------------------------------------- MONAI PatchEmbeddingBlock
_MONAI_3D_PATTERN = "b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)"  # patchify's order


def _projection(m: nn.Module) -> Optional[str]:
    """The block's projection type: `proj_type` from MONAI 1.3, `pos_embed` before (same values)."""
    for name in ("proj_type", "pos_embed"):
        value = getattr(m, name, None)
        if isinstance(value, str):
            return value
    return None


def _patch_size(m: nn.Module) -> Optional[list[int]]:
    seq = getattr(m, "patch_embeddings", None)
    if not isinstance(seq, nn.Sequential) or len(seq) != 2 or not isinstance(seq[1], nn.Linear):
        return None
    pattern, lengths = _einops_pattern(seq[0])
    if pattern != _MONAI_3D_PATTERN or not all(isinstance(lengths.get(k), int) for k in ("p1", "p2", "p3")):
        return None
    return [lengths[k] for k in ("p1", "p2", "p3")]


def _patch_why_not(m: nn.Module) -> Optional[str]:
    projection = _projection(m)
    if projection != "perceptron":
        return f"projection {projection!r} (proj_type / pos_embed; only 'perceptron' maps onto ops.patch_embed)"
    patch = _patch_size(m)
    if patch is None:
        return "not MONAI's 3-D perceptron layout (Rearrange + Linear)"
    linear, pos = m.patch_embeddings[1], getattr(m, "position_embeddings", None)
    if not isinstance(pos, torch.Tensor) or pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != linear.out_features:
        return f"position_embeddings is not a (1, tokens, {linear.out_features}) tensor"
    if linear.in_features % (patch[0] * patch[1] * patch[2]):
        return f"Linear input {linear.in_features} is not channels x patch {patch}"
    if not isinstance(getattr(m, "dropout", None), nn.Module):
        return "no dropout module"
    return None


def _patch_call_fits(m: nn.Module, x: torch.Tensor, patch: list[int]) -> bool:
    """Whether this input is one the op computes as MONAI would; otherwise MONAI runs (and raises
    its own error for a volume that is not whole patches or does not match the position table)."""
    linear, pos = m.patch_embeddings[1], m.position_embeddings
    if x.dim() != 5 or not (x.dtype == linear.weight.dtype == pos.dtype) or x.device != linear.weight.device:
        return False
    grid = [size // p for size, p in zip(x.shape[2:], patch)]
    whole = all(size % p == 0 for size, p in zip(x.shape[2:], patch))
    return whole and grid[0] * grid[1] * grid[2] == pos.shape[1] and x.shape[1] * math.prod(patch) == linear.in_features


def _patch_forward(m: nn.Module, original: Callable, x: torch.Tensor) -> torch.Tensor:
    if _patch_why_not(m) is not None:
        return original(x)
    patch = _patch_size(m)
    if not _patch_call_fits(m, x, patch):
        return original(x)
    linear = m.patch_embeddings[1]
    tokens = ops.patch_embed(x, linear.weight, linear.bias, m.position_embeddings, patch)
    return m.dropout(tokens)  # MONAI: dropout(tokens + pos); the op already added pos


# ---------------------------------------------------------------------------- peft lora.Linear
def _lora_adapter(m: nn.Module, at_call: bool = False) -> tuple[Optional[str], Optional[str]]:
    """(adapter name, None) when `m` maps onto one lora_linear call, else (None, reason).
    Dropout counts only `at_call`: training mode is a passing state, not a reason to skip."""
    active = list(getattr(m, "active_adapters", []))
    if getattr(m, "disable_adapters", False):
        return None, "adapters disabled"
    if getattr(m, "merged", False):
        return None, "adapter merged into the base weight"
    if len(active) != 1 or active[0] not in m.lora_A:
        return None, f"needs exactly one active adapter, found {active}"
    name = active[0]
    if not isinstance(m.base_layer, nn.Linear) or getattr(m, "fan_in_fan_out", False):
        return None, "base layer is not a plain nn.Linear"
    if name in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(name, False):
        return None, f"adapter {name!r} is a LoRA variant (DoRA, ...), not plain LoRA"
    if m.lora_B[name].bias is not None:
        return None, "lora_B has a bias"
    p = float(getattr(m.lora_dropout[name], "p", 0.0))
    if at_call and _dropout_active(p, m.lora_dropout[name].training):
        return None, f"LoRA dropout {p} is active (training mode)"
    return name, None


def _lora_forward(m: nn.Module, original: Callable, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name, _ = _lora_adapter(m, at_call=True)
    w = m.base_layer.weight
    frozen = not (torch.is_grad_enabled() and w.requires_grad)  # lora_linear has no weight grad
    if name is None or args or kwargs or x.dtype != w.dtype or m.lora_A[name].weight.dtype != w.dtype or not frozen:
        return original(x, *args, **kwargs)
    return ops.lora_linear(
        x, w, m.base_layer.bias, m.lora_A[name].weight, m.lora_B[name].weight, float(m.scaling[name])
    )


# ---------------------------------------------------------------------------- installing
_SWAPS = {
    "monai.SABlock": (_sablock_why_not, _sablock_forward, "ops.flash_attention"),
    "monai.PatchEmbeddingBlock": (_patch_why_not, _patch_forward, "ops.patch_embed"),
    "peft.lora.Linear": (lambda m: _lora_adapter(m)[1], _lora_forward, "ops.lora_linear"),
}


def _backend_scope(backend: Optional[str]) -> contextlib.AbstractContextManager:
    # use_backend(None) would *clear* a caller's own use_backend block; only force when asked.
    return ops.use_backend(backend) if backend is not None else contextlib.nullcontext()


class _Swapped:
    """The forward (or other method) installed on one instance: runs `body(module, original, ...)`
    under `backend`. A module-level class rather than a closure so that copy.deepcopy and pickle
    of an optimized model keep working, each copy pointing at its own module."""

    def __init__(self, module: nn.Module, name: str, body: Callable, backend: Optional[str]):
        self.module, self.key, self.body, self.backend = module, _original_key(name), body, backend

    def __call__(self, *args, **kwargs):
        with _backend_scope(self.backend):
            return self.body(self.module, self.module.__dict__[self.key], *args, **kwargs)


def _original_key(name: str) -> str:
    return _ORIGINAL if name == "forward" else f"{_ORIGINAL}:{name}"


def _install(module: nn.Module, name: str, body: Callable, backend: Optional[str]) -> None:
    """Replace method `name` on this instance by body(module, original, ...) under `backend`."""
    key = _original_key(name)
    if key not in module.__dict__:
        # The class's method bound by partial (not `module.forward`: a bound method pickles as
        # getattr(module, "forward"), which would find the swap itself after unpickling).
        own = module.__dict__.get(name)
        module.__dict__[key] = own if own is not None else functools.partial(getattr(type(module), name), module)
    module.__dict__[name] = _Swapped(module, name, body, backend)


def _passthrough(module: nn.Module, original: Callable, *args: Any, **kwargs: Any) -> Any:
    return original(*args, **kwargs)


def _apply_backend_to_segevol(module: nn.Module, backend: Optional[str]) -> list[str]:
    """Wrap our model's entry points in `use_backend(backend)`; returns the wrapped names."""
    names = [n for n in _SEGVOL_METHODS if callable(getattr(module, n, None))]
    for n in names:
        _install(module, n, _passthrough, backend)
    return names


def optimize(model: nn.Module, backend: Optional[str] = None) -> OptimizeReport:
    """Swap, in place, the recognised modules of `model` onto `segevol_fast.ops`.

    Args:
        model: any nn.Module (a MONAI ViT, a peft-wrapped one, our SegVol, ...).
        backend: None picks per call as the ops do; "ref", "native" or "triton" forces that
            backend for every swapped module (`backend="ref"` is a valid no-kernel run).

    Returns:
        OptimizeReport listing (path, kind, replacement) per swap and what was left alone, why.
        Parameters are not copied or moved: the swapped modules read their own tensors.
        Calling optimize again replaces the earlier swap (e.g. to change the backend).
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"optimize expects a torch.nn.Module, got {type(model).__name__}")
    with ops.use_backend(backend):  # validates the name now rather than on the first forward
        pass
    report = OptimizeReport(backend=backend)
    ours: list[str] = []  # our modules already handled: their children need nothing
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") or p == "" for p in ours):
            continue
        kind = _kind(module)
        if kind == "segevol_fast":
            ours.append(path)
            wrapped = _apply_backend_to_segevol(module, backend) if backend is not None else []
            note = f"; backend {backend!r} applied to {', '.join(wrapped)}" if wrapped else ""
            report.left_alone.append(
                LeftAlone(
                    path,
                    f"segevol_fast.{type(module).__name__}",
                    "already runs on segevol_fast.ops, nothing to swap" + note,
                )
            )
        elif kind is not None:
            why_not, body, replacement = _SWAPS[kind]
            reason = why_not(module)
            if reason is None:
                _install(module, "forward", body, backend)
                report.replaced.append(Swap(path, kind, replacement))
            else:
                report.left_alone.append(LeftAlone(path, kind, reason))
    return report
