"""Exporting an adapted model: `merge_and_unload` folds a LoRA adapter into the weights for good and
takes it off, so `save_pretrained` writes a plain checkpoint that `SegVol.from_pretrained` loads
and that gives the adapted model's outputs."""

from __future__ import annotations

import pytest
import torch

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.adapters import BottleneckConfig, LoraConfig, LoraLinear, MixtureConfig
from segevol_fast.errors import AdapterError

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = (
    "image_encoder.blocks.*.attn.qkv:q,v",
    "image_encoder.blocks.*.mlp.linear1",
    "mask_decoder.transformer.layers.*.self_attn.q_proj",
)
# per precision the model runs in (float32 weights, autocast for bf16): the merged weight adds
# scale * B A before the product, the adapted model after it, so they differ by rounding
# (measured on the tiny model: at most 5e-7 in fp32, 9e-3 under bf16 autocast)
TOLERANCE = {"fp32": dict(rtol=1e-5, atol=1e-5), "bf16": dict(rtol=3e-2, atol=3e-2)}


@pytest.fixture
def model(data_dir):
    torch.manual_seed(0)
    return SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer").eval()


def _adapt(model, name="mri", targets=TARGETS, std=0.05):
    adapters.add_lora(model, name, LoraConfig(rank=4, alpha=8, targets=targets))
    with torch.no_grad():
        for p in adapters.adapter_parameters(model, name):
            p.normal_(0.0, std)  # as training would leave them (B nonzero)


def _outputs(model, x, box):
    with torch.no_grad():
        emb = model.encode_image(x)
        return emb, model.decode(emb, boxes=box, upsample=False)


def _inputs(model):
    x = torch.rand(1, 1, *model.config.spatial_size)
    return x, torch.tensor([[1.0, 2.0, 3.0, 20.0, 40.0, 40.0]])


@pytest.mark.parametrize("precision", sorted(TOLERANCE))
@pytest.mark.parametrize("merged_first", (False, True))
def test_exported_model_loads_plainly_and_segments_as_the_adapted_one(model, tmp_path, precision, merged_first):
    model.set_precision(precision)
    plain_keys = set(model.state_dict())
    _adapt(model)
    x, box = _inputs(model)
    adapted = _outputs(model, x, box)
    if merged_first:
        adapters.merge(model, "mri")
    adapters.merge_and_unload(model, "mri")
    assert adapters.adapter_names(model) == []
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert set(model.state_dict()) == plain_keys
    unloaded = _outputs(model, x, box)
    for a, b in zip(adapted, unloaded):
        torch.testing.assert_close(b, a, **TOLERANCE[precision])

    model.save_pretrained(tmp_path / "exported")
    loaded = SegVol.from_pretrained(tmp_path / "exported", precision=precision)
    for a, b in zip(unloaded, _outputs(loaded, x, box)):
        assert torch.equal(a, b)  # the same weights, plain layers


def test_unloading_one_adapter_keeps_the_others(model):
    _adapt(model, "a")
    _adapt(model, "b", targets=TARGETS[:1])
    x, box = _inputs(model)
    adapters.set_active(model, "a")
    want_a = _outputs(model, x, box)
    adapters.merge_and_unload(model, "a")
    assert adapters.adapter_names(model) == ["b"]
    qkv, linear1 = model.image_encoder.blocks[0].attn.qkv, model.image_encoder.blocks[0].mlp.linear1
    assert isinstance(qkv, LoraLinear) and list(qkv.lora) == ["b"]  # "b" still adapts it
    assert type(linear1) is torch.nn.Linear
    adapters.set_active(model, None)  # the base is now the merged "a"
    for a, b in zip(want_a, _outputs(model, x, box)):
        torch.testing.assert_close(b, a, **TOLERANCE["fp32"])
    adapters.set_active(model, "b")
    assert not torch.equal(_outputs(model, x, box)[0], want_a[0])


def test_merge_and_unload_refuses_what_it_cannot_export(model):
    with pytest.raises(AdapterError, match="no adapter named"):
        adapters.merge_and_unload(model, "none")
    adapters.add_bottleneck(model, "msa", BottleneckConfig(dim=4))
    with pytest.raises(AdapterError, match="only LoRA"):
        adapters.merge_and_unload(model, "msa")
    adapters.remove_adapter(model, "msa")

    adapters.add_mixture(
        model, "moa", MixtureConfig(experts=("mr",), tags={"ct": "identity", "mri": "mr"}, lora=LoraConfig(rank=4))
    )
    with pytest.raises(AdapterError, match="expert of mixture 'moa'"):
        adapters.merge_and_unload(model, "moa/mr")
    adapters.remove_adapter(model, "moa")

    _adapt(model, "a")
    _adapt(model, "b")
    adapters.merge(model, "b")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="'b' is merged"):
        adapters.merge_and_unload(model, "a")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
