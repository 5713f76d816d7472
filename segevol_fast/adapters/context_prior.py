"""Context priors: learned tokens per modality and per task that steer SegVol.

Two variants, both attached at two seams (`model.seams`):

  * image side, `ImageEncoder.after_encoder`: the encoder tokens (B, N, hidden) are fused with the
    MODALITY prior tokens of each image row;
  * decoder side, `MaskDecoder.after_transformer`: the TASK prior token of each prompt row reads
    the image tokens through attention and gives a posterior (M vectors of width hidden) that is
    added, times `posterior_scale` (0.1), to the decoder's M mask tokens (hs[:, 1:1+M]) before the
    hypernetwork reads mask token 0.

"additive" (SegEVOLution's single fusion, docs/adapters.md, "SegEVOLution"): one token per
modality and per task, zero-initialised. Image side: one block, image tokens attend over
[image tokens; modality tokens] (one `ops.flash_attention` call, 2048 + K keys, `kv_len` masks
the padded prior slots), then an FFN, and a ZERO-INITIALISED output projection gates the block's
contribution. Decoder side: task token <- image tokens, then SegEVOLution's posterior MLP
(hidden -> 48 -> ReLU -> M*hidden, last layer zero-initialised).

"hermes" (Hermes' prior fusion, docs/adapters.md, "Hermes"): several tokens per modality (10), two-way attention:
modality priors <- image tokens (+ FFN), then image tokens <- modality priors (+ FFN); the image
branch's output projection and FFN output are zero-initialised. Decoder side: task token <- image
tokens (+ FFN), then LayerNorm and a two-layer MLP give the posterior (last layer zero-initialised).
Optional auxiliary modality classification from the updated modality tokens (Hermes' weight 0.01):
its last value is kept as `aux_loss` on the image-side module for a trainer to add.

Both variants start as an exact identity: every path into the model's tensors ends in a zero
weight and zero bias, so x + 0 == x and the outputs equal the base model's bit for bit until the
first optimiser step. (As with LoRA's B = 0, the prior tokens themselves get their first non-zero
gradient only after that step has moved the zero-initialised layers.)

Deviation from SegEVOLution and Hermes (by design): both put the TASK prior into the same
attention as the image tokens, which makes the image embedding depend on the prompt. segevol_fast
keeps one image embedding per image (fast mode caches window embeddings and decodes many prompts
per image in one batch). So on the image side the image tokens are fused with the MODALITY priors
only (per image row); the task priors only READ the (fused) image tokens (task <- image) on the
decoder side and never write into them. Hermes' posterior is a dynamic 1x1 conv on decoder
features; here both variants add their posterior to SAM's mask tokens (SegEVOLution's use), and
Hermes' five multi-scale fusion points become the one point after the ViT.

The task side reads the decoder call's image embedding, which the `after_transformer` seam passes
next to the decoder tokens.

    from segevol_fast import adapters
    from segevol_fast.adapters.context_prior import ContextPriorConfig, add_context_priors
    priors = add_context_priors(model, "mr", ContextPriorConfig(tasks=("liver", "spleen")))
    with adapters.prompt_context(modalities=["mri"], tasks=["liver", "spleen"]):
        emb = model.encode_image(x)                     # fused with the "mri" prior
        logits = model.decode(emb, boxes=boxes)         # 2 prompts: liver, spleen posteriors
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..errors import AdapterError, ShapeError, VolumeError
from ..io.volume import normalize_modality
from ..model.two_way_transformer import Attention
from .context import current_context
from .entry import AdapterEntry, entries
from .io import load_adapter, save_adapter
from .manage import add, remove_adapter
from .registry import AdapterKind, AdapterModule, register

VARIANTS = ("additive", "hermes")
KIND = "context_prior"
# Key buffers are padded to a multiple of this many slots (2048 + 1 -> 2056): aligned lengths
# suit the attention kernels; the padded slots are masked by kv_len, never read.
KV_ALIGN = 8
_DEFAULT_TOKENS = {"additive": 1, "hermes": 10}
_DEFAULT_AUX = {"additive": 0.0, "hermes": 0.01}


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class ContextPriorConfig:
    """What the priors are: variant, the modality and task names they know, and their sizes.

    tokens_per_modality / aux_modality_loss_weight default (None) to the variant's own values:
    1 and 0.0 for "additive", 10 and 0.01 for "hermes". posterior_dim is the hidden width of the
    additive posterior MLP (SegEVOLution: 48). null_task: a learned "no task" prior token for
    prompts without a task (a box or points alone, task None); priors saved before
    it existed load without it (and refuse such prompts).
    """

    variant: str = "additive"
    modalities: tuple[str, ...] = ("ct", "mri")
    tasks: tuple[str, ...] = ()
    tokens_per_modality: int | None = None
    heads: int = 4
    ffn_dim: int = 192
    posterior_dim: int = 48
    posterior_scale: float = 0.1
    aux_modality_loss_weight: float | None = None
    null_task: bool = True

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise AdapterError(f"unknown context-prior variant {self.variant!r}; use one of {VARIANTS}")

        def set_(k, v):  # a frozen dataclass normalises its own fields
            object.__setattr__(self, k, v)

        set_("modalities", _modality_names(self.modalities))
        set_("tasks", _task_names(self.tasks))
        if self.tokens_per_modality is None:
            set_("tokens_per_modality", _DEFAULT_TOKENS[self.variant])
        if self.aux_modality_loss_weight is None:
            set_("aux_modality_loss_weight", _DEFAULT_AUX[self.variant])
        for name in ("tokens_per_modality", "heads", "ffn_dim", "posterior_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AdapterError(f"context priors: {name} must be a positive int, got {value!r}")
        if self.aux_modality_loss_weight < 0 or not math.isfinite(self.aux_modality_loss_weight):
            raise AdapterError(f"aux_modality_loss_weight must be >= 0, got {self.aux_modality_loss_weight}")
        if self.variant == "additive" and self.aux_modality_loss_weight > 0:
            # The additive block never updates its modality token: nothing to classify from.
            raise AdapterError("aux_modality_loss_weight needs variant='hermes' (the additive priors are not updated)")
        if self.variant == "additive" and self.tokens_per_modality != 1:
            raise AdapterError("the additive variant has one token per modality; use variant='hermes' for more")

    def to_dict(self) -> dict:
        return {**asdict(self), "modalities": list(self.modalities), "tasks": list(self.tasks)}

    @classmethod
    def from_dict(cls, d: dict) -> ContextPriorConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise AdapterError(f"unknown context-prior config keys {sorted(unknown)}")
        return cls(
            **{
                **d,
                "modalities": tuple(d.get("modalities", ("ct", "mri"))),
                "tasks": tuple(d.get("tasks", ())),
                "null_task": d.get("null_task", False),  # files from before it existed have no such token
            }
        )


def _modality_names(names: Sequence[str]) -> tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    try:  # the context normalises "MR" -> "mri" too, so the two must match
        out = tuple(normalize_modality(m) for m in names)
    except VolumeError as exc:
        raise AdapterError(f"context priors: {exc}") from exc
    if not out or None in out or len(set(out)) != len(out):
        raise AdapterError(f"context priors need distinct modality names, got {names!r}")
    return out


def _task_names(names: Sequence[str]) -> tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise AdapterError(f"context priors need one or more distinct task names (structure names), got {names!r}")
    return names


def _indices(rows: Sequence[str], known: tuple[str, ...], what: str, device) -> Tensor:
    """Row names -> (len(rows),) int64 indices into `known`; AdapterError naming the known ones."""
    bad = sorted({r for r in rows if r not in known}, key=str)
    if bad == [None]:
        raise AdapterError(
            f"these context priors have no 'no {what}' prior (saved before it existed), so every prompt needs a "
            f"{what}: give text, or train and save the priors again"
        )
    if bad:
        raise AdapterError(f"context priors know no {what} {bad[0]!r}; known {what}s: {list(known)}")
    return torch.tensor([known.index(r) for r in rows], dtype=torch.int64, device=device)


def _context():
    ctx = current_context()
    if ctx is None:
        raise AdapterError(
            "context priors need the modality of each image and the task of each prompt: wrap "
            "the calls in adapters.prompt_context(modalities=[...], tasks=[...])"
        )
    return ctx


# ---------------------------------------------------------------------------- building blocks
def _zero_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """A Linear with zero weight and bias: its output is exactly 0 until trained."""
    layer = nn.Linear(in_dim, out_dim)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class FeedForward(nn.Module):
    """x (..., hidden) -> (..., hidden): Linear, ReLU, Linear (zero_out: last layer zero-init)."""

    def __init__(self, hidden: int, inner: int, zero_out: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = _zero_linear(inner, hidden) if zero_out else nn.Linear(inner, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def pad_keys(parts: Sequence[Tensor], lengths: Sequence[Tensor], fill: float = 0.0) -> tuple[Tensor, Tensor]:
    """Concatenate key blocks along the token axis and pad to a multiple of KV_ALIGN slots.

    Args:
        parts: tensors (B, S_i, C); block i holds lengths[i][b] valid tokens first in row b, the
            rest are padding.
        lengths: per block, a (B,) int64 tensor of valid tokens per row. Only the LAST block may
            have padding (keys must be contiguous for kv_len): the earlier ones must be full.
        fill: value written into the alignment padding (it must never matter: tested).

    Returns:
        keys (B, S_pad, C) and kv_len (B,) int64 = the sum of the valid lengths.
    """
    keys = torch.cat(list(parts), dim=1)
    total = keys.shape[1]
    extra = (-total) % KV_ALIGN
    if extra:
        keys = torch.cat([keys, keys.new_full((keys.shape[0], extra, keys.shape[2]), fill)], dim=1)
    return keys, sum(lengths)


class CrossAttention(Attention):
    """The decoder's multi-head attention block (same projections), run through
    `ops.flash_attention` so that `kv_len` can mask padded prior slots.

    forward(x (B, Sq, hidden), keys (1 or B, Sk, hidden), kv_len None or (B,) int64)
    -> (B, Sq, hidden); keys with batch 1 are shared by all B query rows (projected once).
    zero_out: the output projection starts at zero (the block adds exactly nothing).
    """

    def __init__(self, hidden: int, heads: int, zero_out: bool = False):
        if hidden % heads:
            raise AdapterError(f"context priors: hidden size {hidden} is not divisible by heads={heads}")
        super().__init__(hidden, heads)
        if zero_out:
            nn.init.zeros_(self.out_proj.weight)
            nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, keys: Tensor, kv_len: Tensor | None = None) -> Tensor:
        B, Sq, C = x.shape
        q = self.q_proj(x)
        k, v = self.k_proj(keys).to(q.dtype), self.v_proj(keys).to(q.dtype)
        out = ops.flash_attention(self._heads(q, B), self._heads(k, B), self._heads(v, B), kv_len=kv_len)
        return self.out_proj(out.transpose(1, 2).reshape(B, Sq, C))


# ---------------------------------------------------------------------------- image side
class ModalityFusion(AdapterModule):
    """Image side (`ImageEncoder.after_encoder`): tokens (B, N, hidden) -> fused tokens, same shape
    and dtype, using the modality prior of each image row (`prompt_context(modalities=...)`).

    `priors` (n_modalities, tokens_per_modality, hidden) is the modality pool, row i belonging to
    `config.modalities[i]`. Hermes with aux weight > 0 also sets `aux_loss` (a scalar tensor,
    weight * cross-entropy of the modality classified from the updated prior tokens).
    """

    def __init__(self, hidden: int, config: ContextPriorConfig):
        super().__init__()
        self.config = config
        hermes = config.variant == "hermes"
        n, L = len(config.modalities), config.tokens_per_modality
        # Zero tokens like SegEVOLution's pool; Hermes' are random (Xavier there): with
        # priors <- image the tokens must differ for their updates to differ.
        self.priors = nn.Parameter(torch.randn(n, L, hidden) * 0.02 if hermes else torch.zeros(n, L, hidden))
        self.norm_image = nn.LayerNorm(hidden)
        self.norm_ffn = nn.LayerNorm(hidden)
        if hermes:
            self.norm_prior = nn.LayerNorm(hidden)
            self.norm_prior_ffn = nn.LayerNorm(hidden)
            self.prior_from_image = CrossAttention(hidden, config.heads)
            self.prior_ffn = FeedForward(hidden, config.ffn_dim)
            self.image_from_prior = CrossAttention(hidden, config.heads, zero_out=True)
            self.image_ffn = FeedForward(hidden, config.ffn_dim, zero_out=True)
            if config.aux_modality_loss_weight > 0:
                self.modality_head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, n))
        else:
            self.attention = CrossAttention(hidden, config.heads)
            self.ffn = FeedForward(hidden, config.ffn_dim)
            self.gate = _zero_linear(hidden, hidden)  # the whole block's output: zero at init
        self.aux_loss: Tensor | None = None

    def cache_key(self) -> Any:
        """The modality rows of the current context: cached window embeddings must never be
        reused under another modality (`model.seams`)."""
        ctx = current_context()
        return None if ctx is None else ctx.modalities

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 3 or tokens.shape[2] != self.priors.shape[2]:
            raise ShapeError(f"context priors expect tokens (B, N, {self.priors.shape[2]}), got {tuple(tokens.shape)}")
        B = tokens.shape[0]
        rows = _indices(_context().modality_rows(B), self.config.modalities, "modality", tokens.device)
        priors = self.priors[rows]  # (B, L, hidden)
        if self.config.variant == "hermes":
            fused = self._hermes(tokens, priors, rows)
        else:
            fused = self._additive(tokens, priors)
        return fused.to(tokens.dtype)

    def _additive(self, x: Tensor, priors: Tensor) -> Tensor:
        """SegEVOLution's fusion, image queries only: attention over [LN(x); priors], FFN, gate."""
        B, N, _ = x.shape
        h = self.norm_image(x)
        n_prior = torch.full((B,), priors.shape[1], dtype=torch.int64, device=x.device)
        keys, kv_len = pad_keys([h, priors.to(h.dtype)], [torch.full_like(n_prior, N), n_prior])
        a = h + self.attention(h, keys, kv_len)
        a = a + self.ffn(self.norm_ffn(a))
        return x + self.gate(a)

    def _hermes(self, x: Tensor, priors: Tensor, rows: Tensor) -> Tensor:
        """Two-way fusion: priors <- image (+ FFN), then image <- priors (+ FFN)."""
        h = self.norm_image(x)
        p = priors.to(h.dtype)
        p = p + self.prior_from_image(self.norm_prior(p), h)
        p = p + self.prior_ffn(self.norm_prior_ffn(p))
        n_prior = torch.full((x.shape[0],), p.shape[1], dtype=torch.int64, device=x.device)
        keys, kv_len = pad_keys([p], [n_prior])
        y = x + self.image_from_prior(h, keys, kv_len)
        y = y + self.image_ffn(self.norm_ffn(y))
        self._aux(p, rows)
        return y

    def _aux(self, p: Tensor, rows: Tensor) -> None:
        """Hermes' modality head on the mean updated prior token; kept as `aux_loss`."""
        weight = self.config.aux_modality_loss_weight
        if weight <= 0:
            self.aux_loss = None
            return
        logits = self.modality_head(p.mean(dim=1)).float()
        self.aux_loss = weight * F.cross_entropy(logits, rows)


# ---------------------------------------------------------------------------- decoder side
class TaskPosterior(AdapterModule):
    """Decoder side (`MaskDecoder.after_transformer`): hs (B, 1 + M + T, hidden) -> hs with
    posterior_scale * posterior (B, M, hidden) added to the M mask tokens hs[:, 1:1+M].

    The posterior of prompt row b comes from the prior token of its task
    (`prompt_context(tasks=...)`) after it attended to the image tokens of this decoder call
    (the decoder call's `image_embedding`, which the seam passes). `priors` is the task pool
    (n_tasks, hidden), row i belonging to `config.tasks[i]`; `null_prior` (hidden,) is the token of
    a prompt without a task (task None: a box or points alone), None with `config.null_task` off.
    Every token, the null one too, reaches the mask tokens only through the posterior's
    zero-initialised last layer, so a fresh module is an exact identity for every prompt.
    """

    def __init__(self, hidden: int, num_mask_tokens: int, config: ContextPriorConfig):
        super().__init__()
        self.config = config
        self.num_mask_tokens = M = num_mask_tokens
        hermes = config.variant == "hermes"
        n = len(config.tasks)
        self.priors = nn.Parameter(torch.randn(n, hidden) * 0.02 if hermes else torch.zeros(n, hidden))
        self.norm_image = nn.LayerNorm(hidden)
        self.attention = CrossAttention(hidden, config.heads)
        if hermes:
            self.norm_ffn = nn.LayerNorm(hidden)
            self.ffn = FeedForward(hidden, config.ffn_dim)
            self.posterior = nn.Sequential(
                nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(), _zero_linear(hidden, M * hidden)
            )
        else:  # SegEVOLution's PosteriorPrototypeMLP, last layer zero so the start is exact
            self.posterior = nn.Sequential(
                nn.Linear(hidden, config.posterior_dim), nn.ReLU(), _zero_linear(config.posterior_dim, M * hidden)
            )
        # last, so that the layers above draw the same initial values with or without it
        null = (torch.randn(hidden) * 0.02 if hermes else torch.zeros(hidden)) if config.null_task else None
        self.null_prior = None if null is None else nn.Parameter(null)

    def cache_key(self) -> Any:
        ctx = current_context()
        return None if ctx is None else ctx.tasks

    def task_tokens(self, image: Tensor, tasks: Sequence[str | None]) -> Tensor:
        """image (1 or B, N, hidden) and one task per prompt row (None: no task) -> updated task
        tokens (B, hidden)."""
        pool, known = self.priors, self.config.tasks
        if self.null_prior is not None:
            pool, known = torch.cat([pool, self.null_prior[None]]), (*known, None)
        t = pool[_indices(tasks, known, "task", image.device)].unsqueeze(1)  # (B, 1, hidden)
        h = self.norm_image(image)
        t = t.to(h.dtype)
        t = t + self.attention(t, h)  # every image token is a valid key: no kv_len
        if self.config.variant == "hermes":
            t = t + self.ffn(self.norm_ffn(t))
        return t[:, 0]

    def forward(self, hs: Tensor, image_embedding: Tensor) -> Tensor:
        """hs (B, 1 + M + T, hidden), image_embedding (1 or B, hidden, gd, gh, gw) of the same
        decoder call -> hs with the posterior added to the mask tokens."""
        B, S, C = hs.shape
        M = self.num_mask_tokens
        if S < 1 + M or C != self.priors.shape[1]:
            raise ShapeError(
                f"context priors expect decoder tokens (B, >= {1 + M}, {self.priors.shape[1]}), got {tuple(hs.shape)}"
            )
        image = image_embedding.flatten(2).transpose(1, 2)  # (1 or B, N, hidden)
        tasks = _context().task_rows(B)
        post = self.posterior(self.task_tokens(image, tasks)).view(B, M, C)
        masks = hs[:, 1 : 1 + M] + (self.config.posterior_scale * post).to(hs.dtype)
        return torch.cat([hs[:, :1], masks, hs[:, 1 + M :]], dim=1)


# ---------------------------------------------------------------------------- attaching
class ContextPriors(nn.Module):
    """Handle on the two attached halves (not itself registered in the model, so their parameters
    appear once, under the seams): `image_side` (ModalityFusion), `decoder_side` (TaskPosterior).
    `parameters()` are all prior parameters (what a trainer optimises); `aux_loss` is the image
    side's last auxiliary loss (None when off)."""

    def __init__(self, name: str, config: ContextPriorConfig, image_side: ModalityFusion, decoder_side: TaskPosterior):
        super().__init__()
        self.name, self.config = name, config
        self.image_side, self.decoder_side = image_side, decoder_side

    @property
    def aux_loss(self) -> Tensor | None:
        return self.image_side.aux_loss


@dataclass(eq=False)
class ContextPriorEntry(AdapterEntry):
    """Context priors on a model: `layers` are the two seams, `priors` the handle on both halves."""

    priors: ContextPriors | None = None


SEAMS = ["image_encoder.after_encoder", "mask_decoder.after_transformer"]


def get_context_priors(model: nn.Module) -> ContextPriors | None:
    """The priors attached to `model`, or None."""
    return next((e.priors for e in entries(model) if e.kind == KIND), None)


def prompts_without_text_are_untasked(model: nn.Module) -> bool:
    """Whether a prompt without text (a box or points alone) reaches the model's priors as task
    None, through their "no task" prior, as it does in `segment()`. Training and validation follow
    the same rule so that prior learns and is scored as it will be used; priors without one (files
    from before it existed) keep the structure's task for every prompt."""
    priors = get_context_priors(model)
    return priors is not None and priors.config.null_task


def add_context_priors(
    model: nn.Module, name: str = "default", config: ContextPriorConfig | None = None, *, freeze_base: bool = True
) -> ContextPriors:
    """Attach fresh context priors to `model`'s two seams; returns their handle.

    Refuses (AdapterError) when either seam is already taken. With freeze_base (default) every
    parameter outside adapters gets requires_grad=False. Outputs equal the base model's bit for bit
    until the priors are trained.
    """
    if config is None:
        raise AdapterError("add_context_priors needs a ContextPriorConfig naming the tasks (structure names)")
    return add(model, KIND, name, config, freeze_base=freeze_base, activate=False).priors


def remove_context_priors(model: nn.Module) -> None:
    """Detach the priors: the model is the base model again."""
    handle = get_context_priors(model)
    if handle is None:
        raise AdapterError("this model has no context priors attached")
    remove_adapter(model, handle.name)


def save_context_priors(model: nn.Module, path: str | os.PathLike) -> str:
    """Write the attached priors alone (`adapters.save_adapter`: safetensors + metadata with kind
    "context_prior", the config and the base weights' SHA-256). Returns the path."""
    handle = get_context_priors(model)
    if handle is None:
        raise AdapterError("this model has no context priors to save")
    return save_adapter(model, handle.name, path)


def load_context_priors(model: nn.Module, path: str | os.PathLike, *, check_base: bool = True) -> ContextPriors:
    """Attach the priors saved in `path` (`adapters.load_adapter`); returns their handle.

    AdapterMismatchError when they were trained on other base weights (unless check_base=False);
    CheckpointError for a damaged or foreign file, another adapter kind or mismatched tensors."""
    load_adapter(model, path, check_base=check_base, kind=KIND)
    return get_context_priors(model)


# ---------------------------------------------------------------------------- the kind
def _attach(model: nn.Module, name: str, config: ContextPriorConfig) -> ContextPriorEntry:
    encoder, decoder = model.image_encoder, model.mask_decoder
    taken = [(s, m) for s, m in zip(SEAMS, (encoder.after_encoder, decoder.after_transformer)) if m is not None]
    if taken:
        seam, holder = taken[0]
        raise AdapterError(
            f"cannot attach context priors: seam {seam} is already taken by {type(holder).__name__}; remove that first"
        )
    ref = encoder.norm.weight
    hidden = ref.shape[0]
    image_side = ModalityFusion(hidden, config).to(device=ref.device, dtype=ref.dtype)
    decoder_side = TaskPosterior(hidden, decoder.num_mask_tokens, config).to(device=ref.device, dtype=ref.dtype)
    encoder.after_encoder, decoder.after_transformer = image_side, decoder_side
    return ContextPriorEntry(name, KIND, config, list(SEAMS), ContextPriors(name, config, image_side, decoder_side))


def _detach(model: nn.Module, entry: ContextPriorEntry) -> None:
    model.image_encoder.after_encoder = None
    model.mask_decoder.after_transformer = None


def _modules(model: nn.Module, entry: ContextPriorEntry) -> list[tuple[str, nn.Module]]:
    return list(zip(SEAMS, (entry.priors.image_side, entry.priors.decoder_side)))


register(
    AdapterKind(
        name=KIND,
        label="context priors",
        config_type=ContextPriorConfig,
        attach=_attach,
        detach=_detach,
        modules=_modules,
        not_selectable="{name!r} are context priors: they apply while attached (remove_adapter to drop them)",
        aux_loss=lambda model, entry: entry.priors.aux_loss,
    )
)
