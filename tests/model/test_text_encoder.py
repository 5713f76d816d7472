"""TextEncoder and ClipTokenizer against transformers' CLIP on identical random weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from segevol_fast.errors import ShapeError  # noqa: E402
from segevol_fast.model.config import SegVolConfig  # noqa: E402
from segevol_fast.model.text_encoder import TextEncoder  # noqa: E402
from segevol_fast.model.tokenizer import CT_TEMPLATE, MRI_TEMPLATE, ClipTokenizer, prompt_text  # noqa: E402

NAMES = ["liver", "left kidney", "Inferior Vena Cava and   portal/splenic vein", "pancreas tumour 2", "aorta"]
ODD_TEXTS = ["  Two\tspaces\nand UPPER case ", "it's the right lung's 3rd lobe!!", "Café crème 42 — ß", "x"]


@pytest.fixture(scope="module")
def tok_dir(data_dir):
    return data_dir / "clip_tokenizer"


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return ClipTokenizer(tok_dir)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ---------------------------------------------------------------------------- templates, tokenizer
def test_templates():
    assert CT_TEMPLATE == "A computerized tomography of a {}."
    assert prompt_text("liver") == "A computerized tomography of a liver."
    assert prompt_text("liver", "CT") == prompt_text("liver", "ct")
    assert prompt_text("liver", "mri") == MRI_TEMPLATE.format("liver") == "A magnetic resonance imaging of a liver."
    assert prompt_text("liver", "MR") == prompt_text("liver", "mri")
    with pytest.raises(ValueError, match="modality"):
        prompt_text("liver", "pet")


def test_tokenizer_matches_transformers(tok_dir, tokenizer):
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    texts = [prompt_text(n) for n in NAMES] + [prompt_text(n, "mri") for n in NAMES[:2]] + ODD_TEXTS
    expected = hf(texts, padding=True, return_tensors="pt")
    got = tokenizer(texts)
    assert got.input_ids.dtype == torch.int64 and got.attention_mask.dtype == torch.int64
    assert torch.equal(got.input_ids, expected["input_ids"])
    assert torch.equal(got.attention_mask, expected["attention_mask"])
    # Lowercasing: case does not change the ids.
    assert torch.equal(tokenizer(["LIVER"]).input_ids, tokenizer(["liver"]).input_ids)


def test_tokenizer_from_vocab_and_merges(tok_dir, tokenizer, tmp_path):
    # The shared folder has no merges.txt; write one from tokenizer.json in the slow-tokenizer format.
    merges = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    shutil.copy(tok_dir / "vocab.json", tmp_path / "vocab.json")
    built = ClipTokenizer(tmp_path)
    texts = [prompt_text(n) for n in NAMES] + ODD_TEXTS
    assert torch.equal(built(texts).input_ids, tokenizer(texts).input_ids)
    assert torch.equal(built(texts).attention_mask, tokenizer(texts).attention_mask)


def test_too_long_text_raises(tokenizer):
    with pytest.raises(ShapeError, match="at most 77"):
        tokenizer([prompt_text(" ".join(["liver"] * 80))])
    with pytest.raises(ShapeError, match="77 positions"):
        TextEncoder(SegVolConfig.tiny()).pool(torch.full((1, 78), 49407))


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ClipTokenizer(tmp_path)


# ---------------------------------------------------------------------------- model vs transformers
def hf_to_ours(hf_sd: dict) -> dict:
    """transformers CLIPTextModel keys -> ours; transformers 5 dropped the `text_model.` level."""
    out = {}
    for k, v in hf_sd.items():
        if k.endswith("position_ids"):
            continue
        out["clip_text_model." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    return out


def test_matches_transformers_clip(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = SegVolConfig()
    # The eager attention path (explicit matmul + softmax) is the most independent reference.
    ref = CLIPTextModel._from_config(CLIPTextConfig(), attn_implementation="eager").eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = TextEncoder(cfg).eval()
    wanted = hf_to_ours(ref.state_dict())
    wanted["dim_align.weight"], wanted["dim_align.bias"] = ours.dim_align.weight, ours.dim_align.bias
    assert set(ours.state_dict()) == set(wanted), "state-dict keys differ from transformers'"
    assert not any("position_ids" in k for k in ours.state_dict())
    ours.load_state_dict(wanted, strict=True)
    clip_params = sum(p.numel() for p in ours.clip_text_model.parameters())
    assert clip_params == 63_165_952 and sum(p.numel() for p in ours.dim_align.parameters()) == 393_984

    names = NAMES + ["a"]
    tokens = tokenizer([prompt_text(n) for n in names])
    assert len(set(tokens.attention_mask.sum(1).tolist())) > 3  # several lengths, padded
    with torch.no_grad():
        expected = ref(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        pooled = ours.pool(*tokens)
        hidden = ours.clip_text_model.text_model.last_hidden_state(*tokens)
        embedded = ours(*tokens)
        encoded = ours.encode(names, tokenizer=tokenizer)
    e_pool, e_hidden = rel_err(pooled, expected.pooler_output), rel_err(hidden, expected.last_hidden_state)
    print(f"CLIP pooled rel err {e_pool:.2e}; last hidden state (pad positions included) {e_hidden:.2e}")
    assert e_pool <= 1e-5 and e_hidden <= 1e-5
    assert embedded.shape == (len(names), 768)
    aligned = torch.nn.functional.linear(expected.pooler_output, ours.dim_align.weight, ours.dim_align.bias)
    assert rel_err(embedded, aligned) <= 1e-5
    # Encoding name by name (no padding) gives the batch's answer.
    assert rel_err(encoded, embedded) <= 1e-5


# ---------------------------------------------------------------------------- training flags, cache
def test_frozen_by_default():
    enc = TextEncoder(SegVolConfig.tiny())
    assert not any(p.requires_grad for p in enc.parameters())
    enc = TextEncoder(SegVolConfig.tiny(), train_dim_align=True)
    assert all(p.requires_grad for p in enc.dim_align.parameters())
    assert not any(p.requires_grad for p in enc.clip_text_model.parameters())
    enc.set_trainable(clip=True, dim_align=False)
    assert all(p.requires_grad for p in enc.clip_text_model.parameters())
    assert not any(p.requires_grad for p in enc.dim_align.parameters())


def test_encode_cache_hits_and_invalidation(tokenizer):
    enc = TextEncoder(SegVolConfig.tiny(), tokenizer=tokenizer).eval()
    calls = []
    enc.clip_text_model.text_model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))

    first = enc.encode(["liver", "spleen", "liver"])
    assert calls == [2]  # duplicates tokenised once
    again = enc.encode(["spleen", "liver"])
    assert calls == [2] and torch.equal(again, first[[1, 0]])
    mri = enc.encode(["liver"], modality="mri")
    assert calls == [2, 1] and not torch.allclose(mri[0], first[0])
    assert torch.equal(enc.encode("liver", modality="mr"), mri)  # same cache entry

    # load_state_dict with new weights -> recomputed, and equal to a fresh encoder's answer.
    fresh = TextEncoder(SegVolConfig.tiny(), tokenizer=tokenizer).eval()
    enc.load_state_dict(fresh.state_dict())
    after_load = enc.encode(["liver"])
    assert calls == [2, 1, 1] and torch.equal(after_load, fresh.encode(["liver"]))

    # An in-place edit (as an optimiser step does) invalidates too.
    with torch.no_grad():
        enc.clip_text_model.text_model.final_layer_norm.bias.add_(1.0)
    assert not torch.allclose(enc.encode(["liver"]), after_load) and calls[-1] == 1 and len(calls) == 4

    # A dtype change re-encodes in the new dtype.
    enc.double()
    assert enc.encode(["liver"]).dtype == torch.float64 and len(calls) == 5
    enc.clear_cache()
    enc.encode(["liver"])
    assert len(calls) == 6


def test_encode_grad_paths(tokenizer):
    enc = TextEncoder(SegVolConfig.tiny(), train_dim_align=True, tokenizer=tokenizer)
    out = enc.encode(["liver", "kidney"])
    assert out.requires_grad  # dim_align runs outside the cache, so it can train
    out.sum().backward()
    assert enc.dim_align.weight.grad is not None
    assert all(p.grad is None for p in enc.clip_text_model.parameters())

    enc.set_trainable(clip=True)
    calls = []
    enc.clip_text_model.text_model.register_forward_hook(lambda m, i, o: calls.append(1))
    enc.encode(["liver"]).sum().backward()
    enc.encode(["liver"])
    assert len(calls) == 2  # a trainable tower bypasses the cache
    assert enc.clip_text_model.text_model.final_layer_norm.weight.grad is not None
    with torch.no_grad():
        enc.encode(["liver"])
        enc.encode(["liver"])
    assert len(calls) == 2  # under no_grad the cache serves again (weights unchanged since it was filled)
    with torch.no_grad():
        enc.clip_text_model.text_model.final_layer_norm.weight.mul_(2.0)
        enc.encode(["liver"])
    assert len(calls) == 3


def test_encode_needs_tokenizer_and_known_modality(tokenizer):
    enc = TextEncoder(SegVolConfig.tiny())
    with pytest.raises(ValueError, match="tokenizer"):
        enc.encode(["liver"])
    with pytest.raises(ValueError, match="modality"):
        enc.encode(["liver"], modality="pet", tokenizer=tokenizer)
