"""The assembled SegVol: official key inventory, checkpoint formats, round trips, forward/backward."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from segevol_fast import SegVol, SegVolConfig
from segevol_fast.errors import CheckpointError, PromptError
from tests.model.official_keys import POSITION_IDS, official_inventory, official_param_count


@pytest.fixture
def tokenizer_dir(data_dir):
    return data_dir / "clip_tokenizer"


@pytest.fixture
def tiny(tokenizer_dir):
    return SegVol(SegVolConfig.tiny(), tokenizer=tokenizer_dir).eval()


def _prompts(cfg: SegVolConfig):
    D, H, W = cfg.spatial_size
    boxes = torch.tensor([[1, 2, 3, D - 2, H - 5, W - 4], [-1, -1, -1, -1, -1, -1]], dtype=torch.float32)
    coords = torch.tensor([[[2.0, 5.0, 7.0], [3.0, 20.0, 9.0]], [[1.0, 1.0, 1.0], [4.0, 8.0, 30.0]]])
    labels = torch.tensor([[1, 0], [1, 1]])
    return boxes, (coords, labels)


# ---------------------------------------------------------------------------- official layout
def test_state_dict_equals_official_inventory_without_position_ids():
    with torch.device("meta"):
        model = SegVol()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = official_inventory()
    official.pop(POSITION_IDS)
    assert ours.keys() == official.keys(), (
        sorted(ours.keys() - official.keys()),
        sorted(official.keys() - ours.keys()),
    )
    assert ours == official
    assert sum(torch.Size(s).numel() for s in ours.values()) == official_param_count() - 77


# ---------------------------------------------------------------------------- official file formats
def _official_style_state(model: SegVol) -> dict[str, torch.Tensor]:
    """What the official HF file holds for this model: `model.` prefix plus position_ids."""
    sd = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    sd[f"model.{POSITION_IDS}"] = torch.arange(77).unsqueeze(0)
    return sd


def _assert_same_weights(a: SegVol, b: SegVol):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_hf_directory_with_pytorch_model_bin(tmp_path, tiny, tokenizer_dir):
    torch.save(_official_style_state(tiny), tmp_path / "pytorch_model.bin")
    # The official config.json names only the architecture; sizes come from the caller here.
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "segvol", "architectures": ["SegVolModel"], "test_mode": True})
    )
    for f in ("tokenizer.json", "vocab.json"):
        (tmp_path / f).write_bytes((tokenizer_dir / f).read_bytes())
    loaded = SegVol.from_pretrained(tmp_path, config=SegVolConfig.tiny())
    _assert_same_weights(tiny, loaded)
    assert loaded.tokenizer is not None


def test_hf_directory_with_prefixed_model_safetensors(tmp_path, tiny):
    # The safetensors conversion of the HF checkpoint keeps the `model.` prefix and position_ids.
    from safetensors.torch import save_file

    save_file(_official_style_state(tiny), str(tmp_path / "model.safetensors"))
    loaded = SegVol.from_pretrained(tmp_path, config=SegVolConfig.tiny())
    _assert_same_weights(tiny, loaded)


def test_official_config_json_alone_means_official_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"model_type": "segvol", "patch_size": [4, 16, 16], "spatial_size": [32, 256, 256], "test_mode": True}
        )
    )
    cfg = SegVolConfig.load(tmp_path)
    assert cfg == SegVolConfig(extra={"test_mode": True})


def test_original_pth_with_module_prefix(tmp_path, tiny):
    sd = {f"module.{k}": v.clone() for k, v in tiny.state_dict().items()}
    sd[f"module.{POSITION_IDS}"] = torch.arange(77).unsqueeze(0)
    torch.save(
        {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3, "scheduler": {"last_epoch": 3}},
        tmp_path / "SegVol_v1.pth",
    )
    loaded = SegVol.from_pretrained(tmp_path / "SegVol_v1.pth", config=SegVolConfig.tiny())
    _assert_same_weights(tiny, loaded)


def test_vit_pretrain_ckpt_initialises_only_the_encoder(tmp_path, tiny):
    enc = {f"model.encoder.{k}": v.clone() for k, v in tiny.image_encoder.state_dict().items()}
    enc["model.decoder.0.weight"] = torch.zeros(3)  # SimMIM's reconstruction head: ignored
    torch.save({"state_dict": enc}, tmp_path / "vit_pretrain.ckpt")
    with pytest.warns(UserWarning, match="only the pre-trained image encoder"):
        loaded = SegVol.from_pretrained(tmp_path / "vit_pretrain.ckpt", config=SegVolConfig.tiny())
    for k, v in tiny.image_encoder.state_dict().items():
        assert torch.equal(loaded.image_encoder.state_dict()[k], v), k


@pytest.mark.slow
def test_full_size_official_checkpoint_loads_strictly(tmp_path):
    # Every tensor of the 475-entry inventory at its official shape (zeros: only the layout is
    # under test, and uninitialised memory may hold NaN, which loading refuses), written as the HF
    # pytorch_model.bin.
    sd = {
        f"model.{k}": torch.zeros(s, dtype=torch.int64 if k == POSITION_IDS else torch.float32)
        for k, s in official_inventory().items()
    }
    torch.save(sd, tmp_path / "pytorch_model.bin")
    del sd
    model = SegVol.from_pretrained(tmp_path)
    assert model.config.hidden_size == 768
    assert sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()) == 180_891_216


# ---------------------------------------------------------------------------- failures
def test_mismatched_checkpoint_lists_missing_unexpected_and_misshaped(tmp_path, tiny):
    sd = _official_style_state(tiny)
    del sd["model.mask_decoder.iou_token.weight"]
    sd["model.image_encoder.extra.weight"] = torch.zeros(2)
    sd["model.prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 7)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        SegVol.from_pretrained(tmp_path, config=SegVolConfig.tiny())
    msg = str(err.value)
    assert "missing 1: mask_decoder.iou_token.weight" in msg
    assert "unexpected 1: image_encoder.extra.weight" in msg
    assert "mis-shaped 1: prompt_encoder.no_mask_embed.weight (checkpoint (1, 7), model (1, 32))" in msg


def test_wrong_config_for_checkpoint_fails_with_listing(tmp_path, tiny):
    tiny.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        SegVol.from_pretrained(tmp_path, config=SegVolConfig.tiny(hidden_size=64, decoder_mlp_dim=32))


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        SegVol.from_pretrained(tmp_path, config=SegVolConfig.tiny())
    assert "pickled code ran" not in capsys.readouterr().out


def test_corrupted_safetensors_fails_clearly(tmp_path, tiny):
    tiny.save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        SegVol.from_pretrained(tmp_path)


def test_missing_weights_and_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        SegVol.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no weights"):
        SegVol.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- round trip and use
def test_save_pretrained_round_trip_is_exact(tmp_path, tiny):
    tiny.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded = SegVol.from_pretrained(tmp_path)
    assert loaded.config == tiny.config
    _assert_same_weights(tiny, loaded)
    x = torch.rand(1, 1, *tiny.config.spatial_size)
    boxes, points = _prompts(tiny.config)
    with torch.no_grad():
        a = tiny(x, text=["liver", "left kidney"], boxes=boxes, points=points)
        b = loaded(x, text=["liver", "left kidney"], boxes=boxes, points=points)
    assert torch.equal(a, b)
    frozen = [n for n, p in loaded.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("text_encoder.") for n in frozen)


def test_n_prompts_in_one_call_equal_one_by_one(tiny):
    x = torch.rand(1, 1, *tiny.config.spatial_size)
    boxes, (coords, labels) = _prompts(tiny.config)
    with torch.no_grad():
        emb = tiny.encode_image(x)
        text = tiny.encode_text(["liver", "spleen"])
        batched = tiny.decode(emb, text_embedding=text, boxes=boxes, points=(coords, labels))
        for i in range(2):
            single = tiny.decode(
                emb,
                text_embedding=text[i : i + 1],
                boxes=boxes[i : i + 1],
                points=(coords[i : i + 1], labels[i : i + 1]),
            )
            torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-5, atol=1e-5)
    assert batched.shape == (2, 1, *tiny.config.spatial_size) and batched.dtype == torch.float32


@pytest.mark.parametrize("combo", ["text", "box", "points", "text+box", "text+points", "box+points"])
def test_every_prompt_combination_decodes(tiny, combo):
    x = torch.rand(1, 1, *tiny.config.spatial_size)
    boxes, points = _prompts(tiny.config)
    kw = {}
    with torch.no_grad():
        emb = tiny.encode_image(x)
        if "text" in combo:
            kw["text_embedding"] = tiny.encode_text(["liver", "spleen"])
        if "box" in combo:
            kw["boxes"] = boxes
        if "points" in combo:
            kw["points"] = points
        out = tiny.decode(emb, **kw)
        low = tiny.decode(emb, upsample=False, **kw)
    assert out.shape == (2, 1, *tiny.config.spatial_size)
    assert low.shape == (2, 1, *tiny.config.low_res_size)
    assert torch.isfinite(out).all()


def test_decode_takes_the_official_float_point_labels(tiny):
    """The official forward_decoder passes labels as floats 1. / 0. / -1. (padding); they decode
    exactly as the integers; a float that is no label is a PromptError."""
    emb = tiny.encode_image(torch.rand(1, 1, *tiny.config.spatial_size))
    coords = torch.tensor([[[2.0, 5.0, 7.0], [3.0, 20.0, 9.0], [-1.0, -1.0, -1.0]]])
    ints = torch.tensor([[1, 0, -1]])
    with torch.no_grad():
        expected = tiny.decode(emb, points=(coords, ints))
        for dtype in (torch.float32, torch.float64, torch.float16):
            torch.testing.assert_close(tiny.decode(emb, points=(coords, ints.to(dtype))), expected, rtol=0, atol=0)
        for bad in (0.5, float("nan"), 2.0):
            with pytest.raises(PromptError, match=f"point label {bad:g} is not a label"):
                tiny.decode(emb, points=(coords, torch.tensor([[1.0, bad, -1.0]])))


def test_decode_without_prompts_or_tokenizer_is_a_clear_error(tiny):
    emb = tiny.encode_image(torch.rand(1, 1, *tiny.config.spatial_size))
    with pytest.raises(ValueError, match="at least one prompt"):
        tiny.decode(emb)
    no_tok = SegVol(SegVolConfig.tiny())
    with pytest.raises(ValueError, match="tokenizer"):
        no_tok.encode_text("liver")


def test_tiny_forward_backward_reaches_every_trainable_part(tiny):
    tiny.train()
    x = torch.rand(1, 1, *tiny.config.spatial_size)
    boxes, points = _prompts(tiny.config)
    logits = tiny(x, text=["liver", "spleen"], boxes=boxes, points=points)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, (torch.rand_like(logits) > 0.5).float())
    loss.backward()
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        grads = [
            p.grad
            for n, p in tiny.named_parameters()
            if n.startswith(part)
            and p.requires_grad
            and "mask_downscaling" not in n
            and "iou_prediction_head" not in n
            and "output_hypernetworks_mlps.0" not in n
            and "not_a_point" not in n
            and "mask_tokens" not in n
            and "output_hypernetworks" not in n
        ]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), part
    assert tiny.image_encoder.patch_embedding.position_embeddings.grad.abs().sum() > 0


def test_reduced_precision_keeps_layernorm_in_fp32(tiny):
    # CPU autocast in bf16 here; the same policy applies to CUDA autocast (fp16/bf16).
    seen = {}
    tiny.mask_decoder.fused_upscale = False  # the module path, where the LayerNorm module runs
    ln = tiny.mask_decoder.output_upscaling[1]

    def record(module, inputs, output):
        seen["dtype"] = output.dtype

    handle = ln.register_forward_hook(record)
    x = torch.rand(1, 1, *tiny.config.spatial_size)
    boxes, _ = _prompts(tiny.config)
    with torch.no_grad():
        ref = tiny.decode(tiny.encode_image(x), boxes=boxes)
        tiny.set_precision("bf16")
        low = tiny.decode(tiny.encode_image(x), boxes=boxes)
    handle.remove()
    assert seen["dtype"] == torch.float32
    assert low.dtype == torch.float32
    rel = (low - ref).abs().max() / ref.abs().max()
    assert rel < 0.1, rel
    with pytest.raises(ValueError, match="precision"):
        tiny.set_precision("int8")
