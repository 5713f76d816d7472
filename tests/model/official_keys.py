"""The official SegVol checkpoint inventory, written out from the official checkpoint's
layout (docs/official-pipeline.md §1–4, §7), independently of our modules: (key without the `model.` prefix, shape) pairs.

`official_inventory()` gives the 475 tensors of the HF `pytorch_model.bin` (position_ids included);
tests compare our state_dict against it and build synthetic checkpoints in each official format.
"""

from __future__ import annotations

import torch

POSITION_IDS = "text_encoder.clip_text_model.text_model.embeddings.position_ids"


def _linear(prefix, out_f, in_f, bias=True):
    yield f"{prefix}.weight", (out_f, in_f)
    if bias:
        yield f"{prefix}.bias", (out_f,)


def _norm(prefix, *shape):
    yield f"{prefix}.weight", shape
    yield f"{prefix}.bias", shape


def _image_encoder(p="image_encoder"):
    yield f"{p}.patch_embedding.position_embeddings", (1, 2048, 768)
    yield from _linear(f"{p}.patch_embedding.patch_embeddings.1", 768, 1024)
    for i in range(12):
        b = f"{p}.blocks.{i}"
        yield from _norm(f"{b}.norm1", 768)
        yield from _linear(f"{b}.attn.qkv", 2304, 768, bias=False)
        yield from _linear(f"{b}.attn.out_proj", 768, 768)
        yield from _norm(f"{b}.norm2", 768)
        yield from _linear(f"{b}.mlp.linear1", 3072, 768)
        yield from _linear(f"{b}.mlp.linear2", 768, 3072)
    yield from _norm(f"{p}.norm", 768)


def _text_encoder(p="text_encoder"):
    t = f"{p}.clip_text_model.text_model"
    yield f"{t}.embeddings.token_embedding.weight", (49408, 512)
    yield f"{t}.embeddings.position_embedding.weight", (77, 512)
    yield POSITION_IDS, (1, 77)
    for i in range(12):
        layer = f"{t}.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield from _linear(f"{layer}.self_attn.{proj}", 512, 512)
        yield from _norm(f"{layer}.layer_norm1", 512)
        yield from _linear(f"{layer}.mlp.fc1", 2048, 512)
        yield from _linear(f"{layer}.mlp.fc2", 512, 2048)
        yield from _norm(f"{layer}.layer_norm2", 512)
    yield from _norm(f"{t}.final_layer_norm", 512)
    yield from _linear(f"{p}.dim_align", 768, 512)


def _prompt_encoder(p="prompt_encoder"):
    yield f"{p}.pe_layer.positional_encoding_gaussian_matrix", (3, 384)
    for i in range(4):
        yield f"{p}.point_embeddings.{i}.weight", (1, 768)
    yield f"{p}.not_a_point_embed.weight", (1, 768)
    yield f"{p}.no_mask_embed.weight", (1, 768)
    m = f"{p}.mask_downscaling"
    yield f"{m}.0.weight", (4, 1, 2, 2)
    yield f"{m}.0.bias", (4,)
    yield from _norm(f"{m}.1", 4)
    yield f"{m}.3.weight", (16, 4, 2, 2)
    yield f"{m}.3.bias", (16,)
    yield from _norm(f"{m}.4", 16)
    yield f"{m}.6.weight", (768, 16, 1, 1)
    yield f"{m}.6.bias", (768,)


def _attention(prefix, internal):
    for proj in ("q_proj", "k_proj", "v_proj"):
        yield from _linear(f"{prefix}.{proj}", internal, 768)
    yield from _linear(f"{prefix}.out_proj", 768, internal)


def _mask_decoder(p="mask_decoder"):
    yield f"{p}.iou_token.weight", (1, 768)
    yield f"{p}.mask_tokens.weight", (4, 768)
    for i in range(2):
        layer = f"{p}.transformer.layers.{i}"
        yield from _attention(f"{layer}.self_attn", 768)
        yield from _norm(f"{layer}.norm1", 768)
        yield from _attention(f"{layer}.cross_attn_token_to_image", 384)
        yield from _norm(f"{layer}.norm2", 768)
        yield from _linear(f"{layer}.mlp.lin1", 2048, 768)
        yield from _linear(f"{layer}.mlp.lin2", 768, 2048)
        yield from _norm(f"{layer}.norm3", 768)
        yield from _norm(f"{layer}.norm4", 768)
        yield from _attention(f"{layer}.cross_attn_image_to_token", 384)
    yield from _attention(f"{p}.transformer.final_attn_token_to_image", 384)
    yield from _norm(f"{p}.transformer.norm_final_attn", 768)
    yield f"{p}.output_upscaling.0.weight", (768, 192, 2, 2, 2)
    yield f"{p}.output_upscaling.0.bias", (192,)
    yield from _norm(f"{p}.output_upscaling.1", 192, 16, 32, 32)
    yield f"{p}.output_upscaling.3.weight", (192, 96, 2, 2, 2)
    yield f"{p}.output_upscaling.3.bias", (96,)
    for i in range(4):
        h = f"{p}.output_hypernetworks_mlps.{i}.layers"
        yield from _linear(f"{h}.0", 768, 768)
        yield from _linear(f"{h}.1", 768, 768)
        yield from _linear(f"{h}.2", 96, 768)
    yield from _linear(f"{p}.iou_prediction_head.layers.0", 256, 768)
    yield from _linear(f"{p}.iou_prediction_head.layers.1", 256, 256)
    yield from _linear(f"{p}.iou_prediction_head.layers.2", 4, 256)
    yield from _linear(f"{p}.txt_align_upscaled_embedding", 96, 768)


def official_inventory() -> dict[str, tuple[int, ...]]:
    """Key (no `model.` prefix) -> shape, for all 475 tensors of the official HF checkpoint."""
    inv: dict[str, tuple[int, ...]] = {}
    for part in (_image_encoder(), _text_encoder(), _prompt_encoder(), _mask_decoder()):
        for key, shape in part:
            assert key not in inv, key
            inv[key] = tuple(shape)
    return inv


def official_param_count() -> int:
    return sum(torch.Size(s).numel() for s in official_inventory().values())
