"""LoRA adapters on SegVol: identity at step 0, the formula, slices, training, merge, routing,
files and the caches that must notice an adapter switch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.adapters import LoraConfig
from segevol_fast.errors import AdapterError, AdapterMismatchError, CheckpointError
from segevol_fast.model.seams import adapter_state

pytestmark = pytest.mark.usefixtures("one_thread")

QV = ("image_encoder.blocks.*.attn.qkv:q,v",)


@pytest.fixture
def model(data_dir):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))  # fresh weights each run
    return SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer").eval()


def _inputs(model, n=2):
    cfg = model.config
    x = torch.rand(n, 1, *cfg.spatial_size)
    D, H, W = cfg.spatial_size
    boxes = torch.tensor([[1, 2, 3, D - 2, H - 3, W - 4]] * n, dtype=torch.float32)
    return x, boxes


def _forward(model, x, boxes):
    emb = model.encode_image(x)
    text = model.encode_text(["liver"] * x.shape[0])
    return model.decode(emb, text_embedding=text, boxes=boxes)


def _randomise_b(model, name, std=0.5):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, adapters.LoraLinear) and name in m.lora:
                for b in m.lora[name].lora_B:
                    b.normal_(0, std)


def test_a_new_adapter_is_an_exact_identity(model):
    x, boxes = _inputs(model)
    with torch.no_grad():
        base = _forward(model, x, boxes)
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = adapters.add_lora(model, "mr", LoraConfig(rank=4))  # SegEVOLution's targets, encoder + decoder
    assert any(p.startswith("mask_decoder") for p in layers) and any(p.startswith("image_encoder") for p in layers)
    with torch.no_grad():
        assert torch.equal(_forward(model, x, boxes), base)
    # base keys and values are untouched: the official checkpoint's keys still describe the base
    assert adapters.base_state_dict(model).keys() == base_state.keys()
    assert all(torch.equal(v, base_state[k]) for k, v in adapters.base_state_dict(model).items())


def test_adapted_layer_equals_the_lora_formula_on_its_slices(model):
    adapters.add_lora(model, "mr", LoraConfig(rank=3, alpha=6.0, targets=QV))
    _randomise_b(model, "mr")
    layer = model.image_encoder.blocks[0].attn.qkv
    w = layer.lora["mr"]
    x = torch.randn(2, 5, layer.in_features)
    n = layer.out_features // 3
    expected = F.linear(x, layer.weight, layer.bias).double()
    for A, B, (lo, hi) in zip(w.lora_A, w.lora_B, w.slices):
        expected[..., lo:hi] += 2.0 * (x.double() @ A.double().T) @ B.double().T
    with torch.no_grad():
        out = layer(x)
    assert [s for s in w.slices] == [(0, n), (2 * n, 3 * n)]  # q and v thirds
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(
        out[..., n : 2 * n], F.linear(x, layer.weight[n : 2 * n], None if layer.bias is None else layer.bias[n : 2 * n])
    )


def test_rslora_scale():
    assert LoraConfig(rank=16, alpha=16).scale == 1.0
    assert LoraConfig(rank=16, alpha=16, rslora=True).scale == 4.0  # SegEVOLution's r=16/alpha=16
    assert math.isclose(LoraConfig(rank=8, alpha=8, rslora=True).scale, 8 / math.sqrt(8))


def test_training_moves_only_the_adapter_and_lowers_the_loss(model):
    x, boxes = _inputs(model, 1)
    target = (torch.rand(1, 1, *model.config.spatial_size) > 0.5).float()
    adapters.add_lora(model, "mr", LoraConfig(rank=4, alpha=8))
    before = {k: v.clone() for k, v in adapters.base_state_dict(model).items()}
    params = adapters.adapter_parameters(model, "mr")
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in adapters.base_parameters(model))
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = F.binary_cross_entropy_with_logits(_forward(model, x, boxes), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, before[k]) for k, v in adapters.base_state_dict(model).items())


def test_dropout_applies_in_training_only(model):
    adapters.add_lora(model, "mr", LoraConfig(rank=4, dropout=0.5, targets=QV))
    _randomise_b(model, "mr")
    layer = model.image_encoder.blocks[0].attn.qkv
    x = torch.randn(3, 7, layer.in_features)
    with torch.no_grad():
        eval_out = layer(x)
        layer.train()
        a, b = layer(x), layer(x)
        layer.eval()
    assert not torch.equal(a, b)
    adapters.set_active(model, None)
    with torch.no_grad():
        plain = layer(x)
    adapters.set_active(model, "mr")
    assert not torch.equal(eval_out, plain)


def test_switching_adapters_and_merging(model):
    x, boxes = _inputs(model, 1)
    adapters.add_lora(model, "a", LoraConfig(rank=4))
    adapters.add_lora(model, "b", LoraConfig(rank=4))
    _randomise_b(model, "a", 0.3)
    _randomise_b(model, "b", 0.3)
    with torch.no_grad():
        out_b = _forward(model, x, boxes)  # "b" is active (added last)
        assert adapters.active_adapter(model) == "b"
        adapters.set_active(model, "a")
        assert adapters.active_adapter(model) == "a"
        out_a = _forward(model, x, boxes)
        adapters.set_active(model, None)
        assert adapters.active_adapter(model) is None
        out_base = _forward(model, x, boxes)
        w0 = model.image_encoder.blocks[0].mlp.linear1.weight.clone()
        adapters.merge(model, "a")
        out_merged = _forward(model, x, boxes)
        adapters.unmerge(model)
        w1 = model.image_encoder.blocks[0].mlp.linear1.weight
    assert not torch.equal(out_a, out_b) and not torch.equal(out_a, out_base)
    torch.testing.assert_close(out_merged, out_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w1, w0, rtol=0, atol=1e-6)
    with pytest.raises(AdapterError, match="no adapter named"):
        adapters.set_active(model, "c")


def test_route_per_batch_row_equals_each_adapter_alone(model):
    x, _ = _inputs(model, 3)
    adapters.add_lora(model, "a", LoraConfig(rank=4, targets=QV + ("image_encoder.blocks.*.mlp.linear2",)))
    adapters.add_lora(model, "b", LoraConfig(rank=4, alpha=8, targets=QV + ("image_encoder.blocks.*.mlp.linear2",)))
    _randomise_b(model, "a")
    _randomise_b(model, "b")
    with torch.no_grad():
        alone = {}
        for name in ("a", "b", None):
            adapters.set_active(model, name)
            alone[name] = model.encode_image(x)
        with adapters.route(["a", "b"], index=[1, -1, 0]):
            routed = model.encode_image(x)
        with adapters.route(["a", "b"], gates=torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])):
            gated = model.encode_image(x)
    for row, name in enumerate(["b", None, "a"]):
        torch.testing.assert_close(routed[row], alone[name][row], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gated, routed, rtol=1e-5, atol=1e-5)


def test_routing_refuses_mismatched_adapters(model):
    x, _ = _inputs(model, 2)
    adapters.add_lora(model, "a", LoraConfig(rank=4, targets=QV))
    adapters.add_lora(model, "b", LoraConfig(rank=2, targets=QV))
    with pytest.raises(AdapterError, match="one rank"), torch.no_grad(), adapters.route(["a", "b"], index=[0, 1]):
        model.encode_image(x)
    with pytest.raises(AdapterError, match="batch rows"), torch.no_grad(), adapters.route(["a"], index=[0, 0, 0]):
        model.encode_image(x)
    with pytest.raises(AdapterError, match="index values"):
        adapters.Route(("a",), index=torch.tensor([3]))


def test_caches_key_on_the_adapter_state(model):
    adapters.add_lora(model, "t", LoraConfig(rank=4, targets=("text_encoder.clip_text_model.*.q_proj",)))
    _randomise_b(model, "t", 1.0)
    with torch.no_grad():
        adapted = model.encode_text(["liver"])
        adapters.set_active(model, None)
        plain = model.encode_text(["liver"])  # the cache must not return the adapted embedding
        adapters.set_active(model, "t")
        again = model.encode_text(["liver"])
    assert not torch.equal(adapted, plain) and torch.equal(adapted, again)
    enc = model.image_encoder
    adapters.add_lora(model, "e", LoraConfig(rank=4, targets=QV))
    s1 = adapter_state(enc)
    adapters.set_active(model, None)
    s2 = adapter_state(enc)
    with adapters.route(["e"], index=[0]):
        s3 = adapter_state(enc)
    assert len({s1, s2, s3}) == 3


def test_save_and_load_alone_and_refuse_other_base_weights(model, tmp_path, data_dir):
    x, boxes = _inputs(model, 1)
    adapters.add_lora(model, "mr", LoraConfig(rank=4, rslora=True))
    _randomise_b(model, "mr")
    path = adapters.save_adapter(model, "mr", tmp_path / "mr.safetensors")
    with torch.no_grad():
        want = _forward(model, x, boxes)
    adapter_bytes = sum(p.numel() * p.element_size() for p in adapters.adapter_parameters(model))
    assert (tmp_path / "mr.safetensors").stat().st_size < adapter_bytes + 64 * 1024  # the adapter alone

    fresh = SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer").eval()
    fresh.load_state_dict(adapters.base_state_dict(model), strict=True)
    assert adapters.load_adapter(fresh, path) == "mr"
    with torch.no_grad():
        assert torch.equal(_forward(fresh, x, boxes), want)

    other = SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer").eval()  # other random base
    with pytest.raises(AdapterMismatchError, match="SHA-256"):
        adapters.load_adapter(other, path)
    assert adapters.adapter_names(other) == []  # nothing half-attached
    adapters.load_adapter(other, path, name="forced", check_base=False)
    assert adapters.adapter_names(other) == ["forced"]

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        adapters.load_adapter(fresh, tmp_path / "junk.safetensors")
    with pytest.raises(AdapterError, match="merged"):
        adapters.merge(model, "mr")
        adapters.save_adapter(model, "mr", tmp_path / "merged.safetensors")


@pytest.mark.parametrize(
    "targets,match",
    [
        (("image_encoder.blocks.*.attn.nope",), "matches no module"),
        (("image_encoder.blocks.*.attn",), "not a Linear"),
        (("image_encoder.blocks.*.attn.qkv:q,x",), "bad adapter target"),
        (("image_encoder.blocks.*.mlp.linear1:q",), "multiple of 3"),
        (("image_encoder.blocks.*.attn.qkv", "image_encoder.blocks.0.attn.qkv"), "two adapter targets"),
    ],
)
def test_bad_targets_raise(model, targets, match):
    with pytest.raises(AdapterError, match=match):
        adapters.add_lora(model, "x", LoraConfig(rank=2, targets=targets))


def test_duplicate_names_and_bad_configs(model):
    adapters.add_lora(model, "x", LoraConfig(rank=2, targets=QV))
    with pytest.raises(AdapterError, match="already has an adapter"):
        adapters.add_lora(model, "x", LoraConfig(rank=2, targets=QV))
    with pytest.raises(AdapterError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(AdapterError, match="dropout"):
        LoraConfig(dropout=1.0)
