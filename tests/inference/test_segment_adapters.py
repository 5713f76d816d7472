"""segment(adapter=...): a named adapter, the base model, a mixture routed per scan; the model's
own adapter state is restored after the call."""

from __future__ import annotations

import pytest
import torch

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.adapters import LoraConfig, MixtureConfig
from segevol_fast.adapters.lora import lora_layers
from segevol_fast.errors import AdapterError
from segevol_fast.inference import segment

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ("image_encoder.blocks.*.attn.qkv:q,v", "mask_decoder.transformer.layers.*.self_attn.q_proj")


@pytest.fixture
def model(data_dir):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    m = SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer").eval()
    m.weights_source = "test"
    return m


def _perturb(model, name, std=2.0):
    with torch.no_grad():
        for _, m in adapters.adapter_modules(model, name):
            for pname, p in m.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, std)


def _probs(model, ct, **kw):
    res = segment(model, ct, text=["liver", "spleen"], progress=False, return_probabilities=True, **kw)
    return res, torch.stack([torch.from_numpy(res.probabilities[k]) for k in ("liver", "spleen")])


def test_named_adapter_base_and_restore(model, ct):
    adapters.add_lora(model, "mr", LoraConfig(rank=4, targets=TARGETS))
    _perturb(model, "mr")
    adapters.set_active(model, None)
    base_res, base = _probs(model, ct)
    mr_res, mr = _probs(model, ct, adapter="mr")
    assert mr_res.adapter == "mr" and mr_res.summary()["adapter"] == "mr"
    assert not torch.equal(mr, base)
    assert all(layer.active is None for _, layer in lora_layers(model))  # restored
    adapters.set_active(model, "mr")
    again_res, again = _probs(model, ct, adapter="base")
    assert again_res.adapter == "base" and torch.equal(again, base)
    assert all(layer.active == "mr" for _, layer in lora_layers(model))
    _, as_set = _probs(model, ct)  # adapter=None: the model as set ("mr" active)
    assert torch.equal(as_set, mr)


def test_mixture_routes_each_scan_by_modality(model, ct):
    cfg = MixtureConfig(experts=("mr",), tags={"ct": "identity", "mri": "mr"}, lora=LoraConfig(rank=4, targets=TARGETS))
    adapters.add_mixture(model, "moa", cfg)
    _perturb(model, "moa/mr")
    _, base = _probs(model, ct, adapter="base")
    ct_res, as_ct = _probs(model, ct, adapter="auto")
    mri_res, as_mri = _probs(model, ct, adapter="moa", modality="mri")
    adapters.set_active(model, "moa/mr")
    _, expert_mri = _probs(model, ct, modality="mri")
    assert ct_res.adapter == "moa: identity (base model)" and torch.equal(as_ct, base)
    assert mri_res.adapter == "moa: moa/mr"
    torch.testing.assert_close(as_mri, expert_mri, rtol=1e-5, atol=1e-5)


def test_learned_mixture_routes_on_the_scan(model, ct):
    cfg = MixtureConfig(experts=("a", "b"), routing="top1", lora=LoraConfig(rank=4, targets=TARGETS))
    adapters.add_mixture(model, "moa", cfg)
    res = segment(model, ct, text="liver", adapter="moa", progress=False, zoom_in=False)
    assert res.adapter.startswith("moa: ")


def test_bad_adapter_arguments(model, ct):
    with pytest.raises(AdapterError, match="no adapter named"):
        segment(model, ct, text="liver", adapter="nope", progress=False)
    with pytest.raises(AdapterError, match="auto"):
        segment(model, ct, text="liver", adapter="auto", progress=False)
    with pytest.raises(TypeError, match="adapter"):
        segment(model, ct, text="liver", adapter=3, progress=False)


def test_batch_of_scans_each_with_its_adapter_equals_separate_calls(model, ct, data_dir):
    from segevol_fast import load_volume
    from segevol_fast.inference import segment_batch

    mr = load_volume(data_dir / "mr_abdomen_sm.nii.gz")
    adapters.add_lora(model, "a", LoraConfig(rank=4, targets=TARGETS))
    adapters.add_lora(model, "b", LoraConfig(rank=4, alpha=8, targets=TARGETS))
    cfg = MixtureConfig(experts=("mr",), tags={"ct": "identity", "mri": "mr"}, lora=LoraConfig(rank=4, targets=TARGETS))
    adapters.add_mixture(model, "moa", cfg)
    for n in ("a", "b", "moa/mr"):
        _perturb(model, n)
    adapters.set_active(model, None)
    scans = [ct, mr, ct, mr, ct]
    chosen = ["a", "b", "base", "moa", "auto"]
    mods = ["ct", "mri", "ct", "mri", "ct"]
    kw = dict(text=["liver", "spleen"], progress=False, return_probabilities=True)
    batch = segment_batch(model, scans, chosen, modality=mods, batch_size=3, **kw)
    for res, scan, a, m in zip(batch, scans, chosen, mods):
        alone = segment(model, scan, adapter=a, modality=m, **kw)
        assert res.adapter == alone.adapter
        for label in ("liver", "spleen"):
            torch.testing.assert_close(
                torch.from_numpy(res.probabilities[label]),
                torch.from_numpy(alone.probabilities[label]),
                rtol=0,
                atol=1e-4,
            )
            agree = (res.masks[label] == alone.masks[label]).mean()
            assert agree > 0.999, (a, label, agree)
    assert [r.adapter for r in batch] == ["a", "b", "base", "moa: moa/mr", "moa: identity (base model)"]
    with pytest.raises(AdapterError, match="one adapter entry per scan"):
        segment_batch(model, scans, chosen[:2], **kw)
