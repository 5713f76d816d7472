"""Bottleneck adapters and mixtures of adapters: identity at step 0, routing equal to running each
expert alone, the identity expert equal to the base model, learned routers that learn, files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.adapters import BottleneckConfig, LoraConfig, MixtureConfig
from segevol_fast.errors import AdapterError

pytestmark = pytest.mark.usefixtures("one_thread")
QV = ("image_encoder.blocks.*.attn.qkv:q,v", "mask_decoder.transformer.layers.*.self_attn.q_proj")


@pytest.fixture
def model(data_dir):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    return SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer").eval()


def _x(model, n):
    return torch.rand(n, 1, *model.config.spatial_size)


def _perturb(model, name, std=0.3):
    """Give adapter `name` nonzero output weights (as training would)."""
    with torch.no_grad():
        for _, m in adapters.adapter_modules(model, name):
            for pname, p in m.named_parameters():
                if "lora_B" in pname or pname.startswith("up.") or pname.startswith("proj."):
                    p.normal_(0, std)


@pytest.mark.parametrize("layout", ["stream", "msa"])
def test_bottleneck_is_an_identity_then_the_msa_formula(model, layout):
    x = _x(model, 2)
    with torch.no_grad():
        base = model.encode_image(x)
    paths = adapters.add_bottleneck(model, "msa", BottleneckConfig(dim=8, scale=0.5, layout=layout))
    assert len(paths) == 2 * len(model.image_encoder.blocks)
    space_seam = "on_attn_out" if layout == "msa" else "after_attn"
    assert all(p.split(".")[3] in (space_seam, "beside_mlp") for p in paths)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), base)
    _perturb(model, "msa")
    blk = model.image_encoder.blocks[0]
    t = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        got = blk(t)
        attn = blk.attn(blk.norm1(t))
        sa = getattr(blk, space_seam).experts["msa"]
        # the space adapter reads the stream after the attention residual ("stream") or the
        # attention output before it ("msa", Medical SAM Adapter's Adapter with its own skip)
        a = t + attn + sa.up(F.gelu(sa.down(t + attn if layout == "stream" else attn)))
        h = blk.norm2(a)
        mlp_ad = blk.beside_mlp.experts["msa"]
        want = a + blk.mlp(h) + 0.5 * mlp_ad.up(F.gelu(mlp_ad.down(h)))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    adapters.set_active(model, None)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), base)
    adapters.remove_adapter(model, "msa")
    assert all(
        b.after_attn is None and b.on_attn_out is None and b.beside_mlp is None for b in model.image_encoder.blocks
    )
    with pytest.raises(AdapterError, match="merged"):
        adapters.add_bottleneck(model, "b2", BottleneckConfig(dim=4))
        adapters.merge(model, "b2")


def test_bottleneck_trains_and_round_trips(model, tmp_path, data_dir):
    adapters.add_bottleneck(model, "msa", BottleneckConfig(dim=8, blocks=(1,), places=("beside_mlp",)))
    x = _x(model, 1)
    target = torch.randn_like(model.encode_image(x))
    params = adapters.adapter_parameters(model, "msa")
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = F.mse_loss(model.encode_image(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    path = adapters.save_adapter(model, "msa", tmp_path / "msa.safetensors")
    fresh = SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer").eval()
    fresh.load_state_dict(adapters.base_state_dict(model))
    adapters.load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(x), model.encode_image(x))


@pytest.mark.parametrize("kind", ["lora", "bottleneck"])
def test_tag_mixture_routes_each_image_to_its_expert(model, kind):
    cfg = MixtureConfig(
        experts=("mr", "pet"),
        kind=kind,
        routing="tag",
        tags={"ct": "identity", "mri": "mr"},
        lora=LoraConfig(rank=4, targets=QV),
        bottleneck=BottleneckConfig(dim=8),
    )
    names = adapters.add_mixture(model, "moa", cfg)
    assert names == ["moa/mr", "moa/pet"]
    x = _x(model, 3)
    with torch.no_grad():
        base = model.encode_image(x)
        with adapters.route(adapters.route_for(model, "moa", modalities=["ct", "mri", "ct"])):
            assert torch.equal(model.encode_image(x), base)  # every expert starts at zero
    for n in names:
        _perturb(model, n)
    with torch.no_grad():
        alone = {}
        for n in (None, "moa/mr"):
            adapters.set_active(model, n)
            alone[n] = model.encode_image(x)
        adapters.set_active(model, None)
        with adapters.prompt_context(modalities=["ct", "mri", "ct"]):
            r = adapters.route_for(model, "moa", images=x)
        with adapters.route(r):
            routed = model.encode_image(x)
    assert r.index.tolist() == [-1, 0, -1]
    assert torch.equal(routed[0], base[0]) and torch.equal(routed[2], base[2])  # CT stays the base model exactly
    torch.testing.assert_close(routed[1], alone["moa/mr"][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["top1", "soft"])
def test_learned_router_learns_and_balances(model, routing):
    cfg = MixtureConfig(experts=("a", "b"), routing=routing, lora=LoraConfig(rank=4, targets=QV))
    adapters.add_mixture(model, "moa", cfg)
    x = _x(model, 4)
    with torch.no_grad():
        base = model.encode_image(x)
        with adapters.route(adapters.route_for(model, "moa", images=x)):
            assert torch.equal(model.encode_image(x), base)  # identity at step 0
    target = torch.randn_like(base)
    params = adapters.adapter_parameters(model, "moa")
    router = model.mixture_routers["moa"]
    assert any(p is router.proj.weight for p in params)
    w_init = router.proj.weight.detach().clone()
    opt = torch.optim.AdamW(params, lr=5e-2)
    losses = []
    for _ in range(8):
        r = adapters.route_for(model, "moa", images=x)
        with adapters.route(r):
            loss = F.mse_loss(model.encode_image(x), target)
        if router.aux_loss is not None:
            loss = loss + router.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # the router itself trained: Adam moves a weight with any gradient by ~lr a step (0.05 here),
    # while weight decay alone moves these (|w| < 0.2) by < 1e-3 in 8 steps; a router cut off from
    # the loss (its logits detached, or its gates or balancing loss not reaching it) keeps its init
    assert (router.proj.weight.detach() - w_init).abs().max() > 1e-2
    r = adapters.route_for(model, "moa", images=x)
    with adapters.route(r):
        F.mse_loss(model.encode_image(x), target).backward()  # no balancing loss: task gradient only
    if routing == "soft" or bool((r.gates.detach() != 0).any()):
        assert router.proj.weight.grad.abs().sum() > 0  # the task loss reaches the router through the gates
    if routing == "top1":
        assert router.aux_loss is not None and router.aux_loss.item() > 0


def test_mixture_save_load_and_errors(model, tmp_path, data_dir):
    cfg = MixtureConfig(experts=("a", "b"), routing="top1", lora=LoraConfig(rank=2, targets=QV))
    adapters.add_mixture(model, "moa", cfg)
    for n in ("moa/a", "moa/b", "moa"):
        _perturb(model, n)
    x = _x(model, 2)
    path = adapters.save_adapter(model, "moa", tmp_path / "moa.safetensors")
    fresh = SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer").eval()
    fresh.load_state_dict(adapters.base_state_dict(model))
    assert adapters.load_adapter(fresh, path) == "moa"
    with torch.no_grad():
        with adapters.route(adapters.route_for(model, "moa", images=x)) as r1:
            want = model.encode_image(x)
        with adapters.route(adapters.route_for(fresh, "moa", images=x)) as r2:
            got = fresh.encode_image(x)
    assert r1.index.tolist() == r2.index.tolist()
    assert torch.equal(got, want)
    with pytest.raises(AdapterError, match="mixture"):
        adapters.set_active(model, "moa")
    with pytest.raises(AdapterError, match="unknown experts"):
        MixtureConfig(experts=("a",), tags={"mri": "b"})
    with pytest.raises(AdapterError, match="needs tags"):
        MixtureConfig(experts=("a",), routing="tag")
    tag = MixtureConfig(experts=("a",), tags={"mri": "a"}, lora=LoraConfig(rank=2, targets=QV))
    adapters.add_mixture(model, "tagged", tag)
    with pytest.raises(AdapterError, match="no tag for modality"):
        adapters.route_for(model, "tagged", modalities=["ct"])
    with pytest.raises(AdapterError, match="modalities"):
        adapters.route_for(model, "tagged")
