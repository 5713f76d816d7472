"""Where adapters attach to SegVol, and how caches learn that they did.

The model code never changes for an adapter; it exposes named places (all None / plain by
default, so the official model runs unchanged, bit for bit):

  * every nn.Linear may be replaced by a subclass that keeps its `weight`/`bias` names (LoRA:
    `adapters.lora.LoraLinear`), so checkpoint keys do not move; a fused `attn.qkv` is adapted
    per q / k / v slice by that layer;
  * `ImageEncoder.blocks[i].on_attn_out`: a -> a + on_attn_out(a) on the attention output a,
    before the attention residual (Medical SAM Adapter's place);
  * `ImageEncoder.blocks[i].after_attn`: x -> x + after_attn(x) after the attention residual;
  * `ImageEncoder.blocks[i].beside_mlp`: + beside_mlp(norm2(x)) next to the MLP;
  * `ImageEncoder.beside_patch_embed`: (window (B, C, D, H, W), input_scale, input_shift) ->
    (B, N, hidden) added to the patch tokens, after their position embedding (the
    rotation-robust branch reads the window as the patch embedding does);
  * `ImageEncoder.after_encoder`: tokens (B, N, hidden) -> tokens after the final norm;
  * `MaskDecoder.after_transformer`: (decoder output tokens (B, 1 + M + T, hidden), the call's
    image embedding) -> tokens, before the hypernetwork reads mask token 0.

Caches (the text cache in `TextEncoder.encode`, the window-embedding cache of fast mode) must
never return a result computed under another adapter state. Any module whose output depends on
something besides its parameters' values (which adapter is active, a route, merged or not)
defines `cache_key() -> hashable`; `adapter_state(module)` collects them, and caches key on it.
"""

from __future__ import annotations

from torch import nn


def adapter_state(module: nn.Module) -> tuple:
    """Hashable summary of every adapter state under `module`: ((path, cache_key()), ...); empty
    for the plain model."""
    return tuple((name, m.cache_key()) for name, m in module.named_modules() if callable(getattr(m, "cache_key", None)))
