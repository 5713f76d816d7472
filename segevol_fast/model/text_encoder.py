"""SegVol's text encoder (docs/official-pipeline.md §4): the default CLIP text transformer plus `dim_align`.

A from-scratch CLIP text tower whose parameter names equal transformers' `CLIPTextModel`, so the
keys under `clip_text_model.text_model.*` load straight from the official checkpoint (less the
`embeddings.position_ids` buffer, which we do not keep: positions are always 0..L-1). The text
embedding is CLIP's pooled output (final-LN hidden state at the first EOS token, no
text_projection) mapped by `dim_align` (Linear text_hidden -> hidden).

The CLIP tower is frozen by default. `dim_align` is frozen by default too: the official training
computes it under no_grad, so it never changes there; pass `train_dim_align=True` to tune it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from .attention import attention
from .config import SegVolConfig
from .seams import adapter_state
from .tokenizer import ClipTokenizer, normalize_modality, prompt_text


class ClipAttention(nn.Module):
    """Multi-head attention with separate biased q/k/v/out projections (CLIP's layout)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (N, L, hidden), additive mask (N, 1, L, L) -> (N, L, hidden)."""
        N, L, C = x.shape

        def heads(t: Tensor) -> Tensor:  # (N, L, C) -> (N, heads, L, head_dim)
            return t.view(N, L, self.heads, C // self.heads).transpose(1, 2)

        out = attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), mask)
        return self.out_proj(out.transpose(1, 2).reshape(N, L, C))


class ClipMLP(nn.Module):
    """fc1 -> quick_gelu (x * sigmoid(1.702 x), CLIP's activation) -> fc2."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, L, hidden) -> (N, L, hidden)."""
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))


class ClipEncoderLayer(nn.Module):
    """Pre-norm block: x + self_attn(layer_norm1(x)), then + mlp(layer_norm2(x))."""

    def __init__(self, config: SegVolConfig):
        super().__init__()
        hidden, eps = config.text_hidden_size, config.text_layer_norm_eps
        self.self_attn = ClipAttention(hidden, config.text_num_heads)
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = ClipMLP(hidden, config.text_intermediate_size)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (N, L, hidden), additive mask (N, 1, L, L) -> (N, L, hidden)."""
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    def __init__(self, config: SegVolConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.text_vocab_size, config.text_hidden_size)
        self.position_embedding = nn.Embedding(config.text_max_positions, config.text_hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (N, L) int64 -> (N, L, hidden): token + position embedding."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class ClipEncoder(nn.Module):
    def __init__(self, config: SegVolConfig):
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(config) for _ in range(config.text_num_layers))


class ClipTextTransformer(nn.Module):
    """CLIP text transformer: `last_hidden_state` (N, L, text_hidden), `forward` the pooled (N, text_hidden)."""

    def __init__(self, config: SegVolConfig):
        super().__init__()
        self.max_positions = config.text_max_positions
        self.eos_token_id = config.text_eos_token_id
        self.embeddings = ClipEmbeddings(config)
        self.encoder = ClipEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.text_hidden_size, eps=config.text_layer_norm_eps)

    def last_hidden_state(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """input_ids (N, L) int64 with L <= max positions, attention_mask (N, L) of 0/1 or None
        (all ones) -> final-LN hidden states (N, L, text_hidden)."""
        if input_ids.dim() != 2:
            raise ShapeError(f"input_ids must be (N, L), got shape {tuple(input_ids.shape)}")
        N, L = input_ids.shape
        if L > self.max_positions:
            raise ShapeError(f"token sequence of length {L} exceeds the text encoder's {self.max_positions} positions")
        x = self.embeddings(input_ids)
        # Query i may see key j when j <= i (causal) and key j is not padding. An additive mask
        # with the dtype's most negative finite value (not -inf) keeps a fully masked row finite.
        allowed = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        if attention_mask is not None:
            allowed = allowed & attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~allowed, torch.finfo(x.dtype).min).expand(N, 1, L, L)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.final_layer_norm(x)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """input_ids, attention_mask (N, L) -> pooled (N, text_hidden): the final-LN state at each
        row's first EOS token (CLIP's pooler_output, no text_projection)."""
        is_eos = input_ids == self.eos_token_id
        if input_ids.dim() == 2 and not bool(is_eos.any(dim=1).all()):
            raise ShapeError(
                f"every row of input_ids needs an EOS token ({self.eos_token_id}); tokenise with ClipTokenizer"
            )
        x = self.last_hidden_state(input_ids, attention_mask)
        # argmax over a 0/1 row gives its first 1: the first EOS (padding is EOS too).
        first_eos = is_eos.to(torch.int32).argmax(dim=1)
        return x[torch.arange(x.shape[0], device=x.device), first_eos]


class ClipTextModel(nn.Module):
    """Wrapper giving the `clip_text_model.text_model.*` key nesting of transformers."""

    def __init__(self, config: SegVolConfig):
        super().__init__()
        self.text_model = ClipTextTransformer(config)


class TextEncoder(nn.Module):
    """Category names -> text embeddings (N, hidden).

    `encode` caches CLIP's pooled output per (name, modality). Invalidation: the cache remembers a
    fingerprint of the CLIP parameters (storage pointer, autograd version counter, dtype, device)
    and is dropped whenever it changes, which covers `load_state_dict`, optimiser steps, in-place
    edits and `.to(...)`. Edits through `param.data` bypass version counters: call `clear_cache()`
    after those. `dim_align` is applied outside the cache on every call, so it may train. While the
    CLIP tower itself requires grad and autograd is on, the cache is bypassed.
    """

    def __init__(
        self,
        config: SegVolConfig,
        freeze_clip: bool = True,
        train_dim_align: bool = False,
        tokenizer: Optional[ClipTokenizer] = None,
    ):
        super().__init__()
        self.clip_text_model = ClipTextModel(config)
        self.dim_align = nn.Linear(config.text_hidden_size, config.hidden_size)
        self.tokenizer = tokenizer
        self._cache: dict[tuple[str, str], Tensor] = {}
        self._cache_fingerprint: Optional[tuple] = None
        self.set_trainable(clip=not freeze_clip, dim_align=train_dim_align)

    def set_trainable(self, clip: bool = False, dim_align: bool = False) -> None:
        """Set requires_grad on the CLIP tower and on dim_align."""
        for p in self.clip_text_model.parameters():
            p.requires_grad_(clip)
        for p in self.dim_align.parameters():
            p.requires_grad_(dim_align)

    def pool(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """input_ids, attention_mask (N, L) -> CLIP pooled output (N, text_hidden), before dim_align."""
        return self.clip_text_model.text_model(input_ids, attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """input_ids, attention_mask (N, L) -> text embeddings (N, hidden)."""
        return self.dim_align(self.pool(input_ids, attention_mask))

    # ------------------------------------------------------------------ cached name encoding
    def encode(
        self, names: str | Sequence[str], modality: str = "ct", tokenizer: Optional[ClipTokenizer] = None
    ) -> Tensor:
        """Category names (templated per modality, see `tokenizer.prompt_text`) -> (N, hidden),
        on the encoder's device and dtype. `tokenizer` defaults to `self.tokenizer`."""
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise ValueError("no category names to encode")
        modality = normalize_modality(modality)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise ValueError("TextEncoder.encode needs a tokenizer: pass one or set `.tokenizer` (ClipTokenizer(path))")
        device = self.dim_align.weight.device
        clip_params = list(self.clip_text_model.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in clip_params):
            return self(*tokenizer([prompt_text(n, modality) for n in names], device=device))

        fingerprint = _fingerprint(clip_params, self.clip_text_model)
        if fingerprint is None or fingerprint != self._cache_fingerprint:
            self._cache.clear()
            self._cache_fingerprint = fingerprint
        missing = list(dict.fromkeys(n for n in names if (n, modality) not in self._cache))
        if missing:
            with torch.no_grad():
                pooled = self.pool(*tokenizer([prompt_text(n, modality) for n in missing], device=device))
            for name, row in zip(missing, pooled):
                self._cache[(name, modality)] = row
        return self.dim_align(torch.stack([self._cache[(n, modality)] for n in names]))

    def clear_cache(self) -> None:
        """Forget every cached pooled text embedding."""
        self._cache.clear()
        self._cache_fingerprint = None


def _fingerprint(params: Sequence[Tensor], tower: nn.Module) -> Optional[tuple]:
    """What identifies the current weights: storage, version counter, dtype, device per tensor,
    plus the state of any adapter attached inside the tower (`cache_key()`, see
    `model.seams`). None when unknowable (inference-mode tensors have no version
    counter): then nothing is reused."""
    try:
        weights = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
    except RuntimeError:
        return None
    return weights, adapter_state(tower)
