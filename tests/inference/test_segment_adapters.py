"""segment(adapter=...): a named adapter, the base model, a mixture routed per scan; the model's
own adapter state is restored after the call. segment_batch: each scan as segment() alone with
its adapter, the zoom-out of all scans in one routed pass; the adapter state is restored too."""

from __future__ import annotations

import pytest
import torch

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.adapters import LoraConfig, MixtureConfig
from segevol_fast.adapters.lora import lora_layers
from segevol_fast.errors import AdapterError, PromptError
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


# segment_batch vs segment alone: the batched, routed encoder sums in another order (batch.py);
# measured <= 2e-7 apart, while a scan's zoom-out under another adapter moves them by 3e-2 to 9e-2
BATCH_ATOL = 1e-4
SCAN_ADAPTERS = ["a", "b", "base", "moa", "auto"]  # named LoRAs, the base model, a mixture by name and as auto
SCAN_MODALITIES = ["ct", "mri", "ct", "mri", "ct"]


def _serving(model, ct, mr) -> list:
    """Attach two LoRAs and a modality-tagged mixture with non-zero weights (each changes what the
    model computes), all inactive; returns the scans that go with SCAN_ADAPTERS."""
    adapters.add_lora(model, "a", LoraConfig(rank=4, targets=TARGETS))
    adapters.add_lora(model, "b", LoraConfig(rank=4, alpha=8, targets=TARGETS))
    cfg = MixtureConfig(experts=("mr",), tags={"ct": "identity", "mri": "mr"}, lora=LoraConfig(rank=4, targets=TARGETS))
    adapters.add_mixture(model, "moa", cfg)
    for n in ("a", "b", "moa/mr"):
        _perturb(model, n)
    adapters.set_active(model, None)
    return [ct, mr, ct, mr, ct]


def _assert_same_result(res, alone, what) -> None:
    assert res.adapter == alone.adapter, what
    for label in ("liver", "spleen"):
        torch.testing.assert_close(
            torch.from_numpy(res.probabilities[label]),
            torch.from_numpy(alone.probabilities[label]),
            rtol=0,
            atol=BATCH_ATOL,
            msg=lambda m: f"{what} {label}: {m}",
        )
        agree = (res.masks[label] == alone.masks[label]).mean()
        assert agree > 0.999, (what, label, agree)


def test_batch_of_scans_each_with_its_adapter_equals_separate_calls(model, ct, data_dir):
    from segevol_fast import load_volume
    from segevol_fast.inference import segment_batch

    scans = _serving(model, ct, load_volume(data_dir / "mr_abdomen_sm.nii.gz"))
    kw = dict(text=["liver", "spleen"], progress=False, return_probabilities=True)
    batch = segment_batch(model, scans, SCAN_ADAPTERS, modality=SCAN_MODALITIES, batch_size=3, **kw)
    for res, scan, a, m in zip(batch, scans, SCAN_ADAPTERS, SCAN_MODALITIES):
        _assert_same_result(res, segment(model, scan, adapter=a, modality=m, **kw), a)
    assert [r.adapter for r in batch] == ["a", "b", "base", "moa: moa/mr", "moa: identity (base model)"]
    with pytest.raises(AdapterError, match="one adapter entry per scan"):
        segment_batch(model, scans, SCAN_ADAPTERS[:2], **kw)


def test_batch_zoom_out_pass_runs_each_scan_under_its_adapter(model, ct, data_dir, monkeypatch):
    """Without zoom-in a result is the decode of the zoom-out embedding alone, which segment_batch
    computes for all scans in one routed pass: a scan encoded under another adapter than its own
    (no route, a wrong row), or the pass skipped, shows here. (With zoom-in on the tiny random
    model the zoom-out picks the whole crop as the region of interest, and the zoom-in windows,
    encoded per scan, overwrite it.)"""
    from segevol_fast import load_volume
    from segevol_fast.inference import segment_batch

    scans = _serving(model, ct, load_volume(data_dir / "mr_abdomen_sm.nii.gz"))
    kw = dict(text=["liver", "spleen"], progress=False, return_probabilities=True, zoom_in=False)
    alone = [segment(model, s, adapter=a, modality=m, **kw) for s, a, m in zip(scans, SCAN_ADAPTERS, SCAN_MODALITIES)]
    # the adapters matter: each adapted scan's zoom-out result is far from the base model's
    for res, scan, a, m in zip(alone, scans, SCAN_ADAPTERS, SCAN_MODALITIES):
        if res.adapter not in ("base", "moa: identity (base model)"):
            base = segment(model, scan, adapter="base", modality=m, **kw)
            gap = max(float(abs(res.probabilities[k] - base.probabilities[k]).max()) for k in ("liver", "spleen"))
            assert gap > 10 * BATCH_ATOL, (a, gap)

    encoded = []  # images per encoder call during segment_batch
    encode = model.encode_image

    def counting_encode(images, *args, **kwargs):
        encoded.append(images.shape[0])
        return encode(images, *args, **kwargs)

    monkeypatch.setattr(model, "encode_image", counting_encode)
    batch = segment_batch(model, scans, SCAN_ADAPTERS, modality=SCAN_MODALITIES, batch_size=3, **kw)
    assert encoded == [3, 2]  # one routed zoom-out pass per 3 scans; no scan encoded again alone
    for res, one, a in zip(batch, alone, SCAN_ADAPTERS):
        _assert_same_result(res, one, a)


def _active_names(model) -> list:
    """The active adapter of every adapted layer, in module order."""
    return [name for _, name in adapters.active_state(model)]


def test_batch_restores_the_active_adapter(model, ct, data_dir):
    from segevol_fast import load_volume
    from segevol_fast.inference import segment_batch

    scans = _serving(model, ct, load_volume(data_dir / "mr_abdomen_sm.nii.gz"))
    kw = dict(progress=False, zoom_in=False, modality=SCAN_MODALITIES, batch_size=2)
    for active in ("b", None):
        adapters.set_active(model, active)
        before = _active_names(model)
        segment_batch(model, scans, SCAN_ADAPTERS, text="liver", **kw)
        assert _active_names(model) == before
        assert adapters.active_adapter(model) == active
        # and a call that fails (the prompts are checked per scan, after its zoom-out pass) as well
        with pytest.raises(PromptError):
            segment_batch(model, scans, SCAN_ADAPTERS, text="liver", box=[1, 2], **kw)
        assert _active_names(model) == before
