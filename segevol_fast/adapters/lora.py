"""LoRA on SegVol's linear layers, running on `ops.lora_linear` / `ops.routed_lora_linear`.

    y = x W^T + b  +  scale * (x A^T) B^T   on the adapted output columns

scale = alpha / r, or alpha / sqrt(r) with rsLoRA (SegEVOLution's choice). A is initialised like
peft (Kaiming-uniform) and B with zeros, so a new adapter adds exact zeros: the model's outputs are
the base model's bit for bit until the first optimiser step (tested).

A `LoraLinear` replaces an `nn.Linear` in place and keeps its `weight` and `bias` parameters (the
same tensors, so checkpoint keys and loading are unchanged) and holds any number of named
adapters, each over one or more output slices (q and v of a fused qkv: `targets.py`). Per call it
runs the base layer alone (no adapter active, or merged), one adapter (`ops.lora_linear`, x read
once), or, under a `routing.route(...)`, a different adapter per batch row (`ops.routed_lora_linear`,
one call for the whole batch).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..errors import AdapterError
from .entry import AdapterEntry
from .manage import add
from .registry import AdapterKind, AdapterModule, register
from .routing import Route, current_route
from .targets import SEGEVOLUTION_TARGETS, match_linears, output_slices

KIND = "lora"


@dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha, rslora (scale alpha / sqrt(r) instead of alpha / r), dropout on the LoRA
    input (training only; it makes the forward unfused), and the targets (`targets.py`)."""

    rank: int = 16
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=SEGEVOLUTION_TARGETS)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise AdapterError(f"LoRA rank must be a positive int, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        return cls(**{**d, "targets": tuple(d.get("targets", SEGEVOLUTION_TARGETS))})


class LoraWeights(AdapterModule):
    """One adapter on one layer: per output slice s, lora_A[s] (r, K) and lora_B[s] (n_s, r)."""

    def __init__(
        self, in_features: int, slices: Sequence[tuple[int, int]], config: LoraConfig, device=None, dtype=None
    ):
        super().__init__()
        self.slices = [(int(a), int(b)) for a, b in slices]
        self.scale = config.scale
        self.dropout = config.dropout
        self.rank = config.rank
        kw = dict(device=device, dtype=dtype)
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(config.rank, in_features, **kw)) for _ in self.slices)
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(b - a, config.rank, **kw)) for a, b in self.slices)
        for a in self.lora_A:  # peft's initialisation of A; B = 0 makes the adapter an exact identity
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def stacked(self) -> tuple[Tensor, Tensor, list[int]]:
        """(A (S*r, K), B (hi - lo, S*r), [lo, hi]): the slices as one rank-S*r LoRA (differentiable)."""
        if len(self.slices) == 1:
            return self.lora_A[0], self.lora_B[0], list(self.slices[0])
        return ops.stack_lora_slices([(a, b, s) for a, b, s in zip(self.lora_A, self.lora_B, self.slices)])

    def delta_weight(self) -> Tensor:
        """scale * B A placed in the layer's output rows: (hi - lo, K), float32 or wider."""
        A, B, _ = self.stacked()
        work = torch.promote_types(A.dtype, torch.float32)
        return self.scale * (B.to(work) @ A.to(work))


class LoraLinear(nn.Linear):
    """An nn.Linear with named LoRA adapters; see the module docstring."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: keys, loading and sharing unchanged
        self.bias = base.bias
        self.lora = nn.ModuleDict()
        self.active: Optional[str] = None
        self.merged: Optional[str] = None

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, config: LoraConfig, slices: Sequence[tuple[int, int]]) -> LoraWeights:
        if name in self.lora:
            raise AdapterError(f"this layer already has an adapter named {name!r}")
        w = LoraWeights(self.in_features, slices, config, device=self.weight.device, dtype=self.weight.dtype)
        self.lora[name] = w
        return w

    def remove_adapter(self, name: str) -> None:
        if self.merged == name:
            raise AdapterError(f"adapter {name!r} is merged into the weights: unmerge it before removing it")
        del self.lora[name]
        if self.active == name:
            self.active = None

    def merge(self, name: str) -> None:
        """Fold adapter `name` into the weight (inference with no LoRA cost). One at a time."""
        if self.merged is not None:
            raise AdapterError(f"adapter {self.merged!r} is already merged; unmerge it first")
        self._fold(name, +1)
        self.merged = name

    def unmerge(self) -> None:
        """Subtract the merged adapter again (equal to the original weight up to rounding)."""
        if self.merged is None:
            return
        self._fold(self.merged, -1)
        self.merged = None

    def unload_merged(self, name: str) -> None:
        """Keep adapter `name` in the weight for good (merging it first if it is not) and drop its
        tensors: the layer's weight is then simply the adapted weight."""
        if self.merged not in (None, name):
            raise AdapterError(f"adapter {self.merged!r} is merged into this layer; unmerge it first")
        if self.merged is None:
            self.merge(name)
        self.merged = None  # the fold now belongs to the weight: nothing left to unmerge
        self.remove_adapter(name)

    def plain(self) -> nn.Linear:
        """An nn.Linear over this layer's own weight and bias Parameters (the same objects)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def _fold(self, name: str, sign: int) -> None:
        w = self.lora[name]
        _, _, (lo, hi) = w.stacked()
        with torch.no_grad():
            rows = self.weight[lo:hi]
            rows.copy_(
                (rows.to(torch.promote_types(rows.dtype, torch.float32)) + sign * w.delta_weight()).to(rows.dtype)
            )

    def cache_key(self) -> tuple:
        """What besides parameter values decides this layer's output (`model.seams`)."""
        r = current_route()
        return self.active, self.merged, (r.key() if r is not None and self._routed(r) else None)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != self.weight.dtype and torch.is_autocast_enabled(x.device.type):
            # the ops compute in one dtype with autocast off: narrow x as autocast does for a Linear
            # (weights cast to bf16 by the caller meet the float32 output of a LayerNorm here)
            x = x.to(self.weight.dtype)
        r = current_route()
        if r is not None and self._routed(r):
            return self._forward_routed(x, r)
        if self.active is None or self.merged is not None:
            return F.linear(x, self.weight, self.bias)
        w = self.lora[self.active]
        A, B, span = w.stacked()
        if (w.dropout and self.training) or (self.weight.requires_grad and torch.is_grad_enabled()):
            # peft's unfused formula: dropout applies to the LoRA input only, and ops.lora_linear
            # keeps W frozen (a trainable W gets its gradient through F.linear here)
            x_lora = F.dropout(x, w.dropout, self.training) if w.dropout else x
            delta = F.linear(F.linear(x_lora, A), B) * w.scale
            return F.linear(x, self.weight, self.bias) + F.pad(delta, (span[0], self.out_features - span[1]))
        return ops.lora_linear(x, self.weight, self.bias, A, B, w.scale, out_slice=span)

    def _routed(self, r: Route) -> bool:
        return any(n in self.lora for n in r.names)

    def _forward_routed(self, x: Tensor, r: Route) -> Tensor:
        """Each batch row through its route's adapter (or gate mix); adapters this layer lacks
        count as zero (that layer stays base for them)."""
        if x.dim() < 2 or (x.shape[0] != r.rows and r.rows != 1):
            raise AdapterError(f"route covers {r.rows} batch rows but this layer got input {tuple(x.shape)}")
        if self.merged is not None:
            raise AdapterError(f"adapter {self.merged!r} is merged into this layer: unmerge before routing")
        A_stack, B_stack = self._stacks(r.names)
        x2 = x.reshape(-1, x.shape[-1])
        if r.rows == 1:  # one choice for the whole input (a decoder call: one image's prompts)
            segments = torch.tensor([0, x2.shape[0]], device=x.device, dtype=torch.int64)
        else:
            rows = x[0].numel() // x.shape[-1]
            segments = torch.arange(x.shape[0] + 1, device=x.device, dtype=torch.int64) * rows
        index = None if r.index is None else r.index.to(x.device)
        gates = None if r.gates is None else r.gates.to(device=x.device, dtype=x.dtype)
        out = ops.routed_lora_linear(
            x2, self.weight, self.bias, A_stack, B_stack, segments, adapter_idx=index, gates=gates, scale=1.0
        )
        return out.reshape(*x.shape[:-1], self.out_features)

    def _stacks(self, names: Sequence[str]) -> tuple[Tensor, Tensor]:
        """A_stack (E, R, K) and B_stack (E, N, R), each adapter's scale folded into its B and
        its slices placed in the full output width; adapters this layer lacks are zeros."""
        present = [self.lora[n] for n in names if n in self.lora]
        R = {w.rank * len(w.slices) for w in present}
        if len(R) != 1:
            raise AdapterError(
                f"routing needs adapters of one rank and slice count on each layer, got ranks {sorted(R)}"
            )
        R = R.pop()
        K, N = self.in_features, self.out_features
        As, Bs = [], []
        for n in names:
            if n not in self.lora:
                As.append(self.weight.new_zeros((R, K)))
                Bs.append(self.weight.new_zeros((N, R)))
                continue
            A, B, (lo, hi) = self.lora[n].stacked()
            As.append(A)
            Bs.append(F.pad(B * self.lora[n].scale, (0, 0, lo, N - hi)))
        return torch.stack(As), torch.stack(Bs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapters={list(self.lora)}, active={self.active}, merged={self.merged}"


# ---------------------------------------------------------------------------- the kind
def add_lora(
    model: nn.Module,
    name: str = "default",
    config: Optional[LoraConfig] = None,
    *,
    freeze_base: bool = True,
    activate: bool = True,
) -> list[str]:
    """Attach a LoRA adapter called `name` to every layer `config.targets` matches.

    Returns the adapted layers' names. With freeze_base (default) every non-adapter parameter is
    set requires_grad=False, so an optimiser over `adapter_parameters(model)` trains adapters only;
    with activate (default) the new adapter is the active one. At step 0 the model's outputs
    equal the base model's bit for bit (B starts at zero).
    """
    entry = add(model, KIND, name, config or LoraConfig(), freeze_base=freeze_base, activate=activate)
    return list(entry.layers)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(path, layer) of every LoRA layer of `model`, in module order."""
    for path, m in model.named_modules():
        if isinstance(m, LoraLinear):
            yield path, m


def _attach(model: nn.Module, name: str, config: LoraConfig) -> AdapterEntry:
    matched = match_linears(model, config.targets)
    for path, layer, parts in matched:
        slices = output_slices(layer, parts, path)
        if not isinstance(layer, LoraLinear):
            layer = _replace(model, path, LoraLinear(layer))
        layer.add_adapter(name, config, slices)
    return AdapterEntry(name, KIND, config, [p for p, _, _ in matched])


def _replace(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return new


def _detach(model: nn.Module, entry: AdapterEntry) -> None:
    for _, layer in lora_layers(model):
        if entry.name in layer.lora:
            layer.remove_adapter(entry.name)


def _modules(model: nn.Module, entry: AdapterEntry) -> list[tuple[str, nn.Module]]:
    return [(path, layer.lora[entry.name]) for path, layer in lora_layers(model) if entry.name in layer.lora]


def _holders(model: nn.Module):
    return ((path, layer.lora, layer) for path, layer in lora_layers(model))


def _merge(model: nn.Module, name: str) -> None:
    for _, layer in lora_layers(model):
        if name in layer.lora:
            layer.merge(name)


def _unmerge(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def _unload_merged(model: nn.Module, name: str) -> None:
    """Fold adapter `name` into the weights for good and take its tensors off; a layer left with
    no adapter becomes a plain nn.Linear again (same Parameters), so `state_dict()` has the plain
    model's keys there."""
    layers = [(path, layer) for path, layer in lora_layers(model) if name in layer.lora]
    others = sorted({layer.merged for _, layer in layers} - {None, name})
    if others:  # checked before any layer changes
        raise AdapterError(f"adapter {others[0]!r} is merged into layers that {name!r} adapts: unmerge it first")
    for path, layer in layers:
        layer.unload_merged(name)
        if not len(layer.lora):
            _replace(model, path, layer.plain())


register(
    AdapterKind(
        name=KIND,
        label="LoRA adapter",
        config_type=LoraConfig,
        attach=_attach,
        detach=_detach,
        modules=_modules,
        holders=_holders,
        merge=_merge,
        unmerge=_unmerge,
        unload_merged=_unload_merged,
    )
)
