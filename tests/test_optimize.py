"""`segevol_fast.optimize`: MONAI ViT (einsum and SDPA attention), peft-LoRA ViT and our SegVol,
each compared with the original module (float64 copy = exact reference) under tests/numerics.py."""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("einops")

import segevol_fast  # noqa: E402
from bench.monai_vit import monai_vit  # noqa: E402
from segevol_fast import SegVol, SegVolConfig, optimize  # noqa: E402
from segevol_fast.ops import _backend  # noqa: E402
from tests.numerics import assert_matches_reference  # noqa: E402


def tiny_vit(sdpa: bool = False):
    """SegVol-config tiny MONAI ViT in eval mode, weights moved off their initial values."""
    cfg = SegVolConfig.tiny()
    vit = monai_vit(cfg).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for block in vit.blocks:  # the SDPA variant is a flag of the same SABlock class
        block.attn.use_flash_attention = sdpa
    return vit, cfg


def backends_used(monkeypatch) -> list[tuple[str, str]]:
    """Record (op, backend) for every op call from now on."""
    calls: list[tuple[str, str]] = []
    real = _backend.implementation

    def recording(op, device_type):
        calls.append((op, _backend.select(op, device_type)))
        return real(op, device_type)

    monkeypatch.setattr(_backend, "implementation", recording)
    return calls


def compare(model, x, backend=None, what="output"):
    """Optimize `model` in place; assert its output matches the original within the rule."""
    exact_model = copy.deepcopy(model).double()
    with torch.no_grad():
        before = model(x)[0]
        exact = exact_model(x.double())[0]
        report = optimize(model, backend=backend)
        after = model(x)[0]
    assert_matches_reference(after, before, exact, what)
    return report


@pytest.mark.parametrize("sdpa", [False, True], ids=["einsum", "sdpa"])
def test_monai_vit_matches_original(sdpa, monkeypatch):
    vit, cfg = tiny_vit(sdpa)
    params = {k: p.data_ptr() for k, p in vit.named_parameters()}
    calls = backends_used(monkeypatch)
    report = compare(vit, torch.rand(2, 1, *cfg.spatial_size), what=f"vit {sdpa=}")
    swapped = {(s.path, s.kind, s.replacement) for s in report.replaced}
    assert swapped == {("patch_embedding", "monai.PatchEmbeddingBlock", "ops.patch_embed")} | {
        (f"blocks.{i}.attn", "monai.SABlock", "ops.flash_attention") for i in range(cfg.num_layers)
    }
    assert report.left_alone == [] and report.backend is None
    assert {op for op, _ in calls} == {"patch_embed", "flash_attention"}
    # weights untouched: same tensors, nothing copied
    assert {k: p.data_ptr() for k, p in vit.named_parameters()} == params
    assert "ops.flash_attention" in str(report)


def test_non_contiguous_input_and_reoptimize(monkeypatch):
    vit, cfg = tiny_vit()
    x = torch.rand(2, 1, cfg.spatial_size[2], cfg.spatial_size[1], cfg.spatial_size[0]).permute(0, 1, 4, 3, 2)
    assert not x.is_contiguous()
    compare(vit, x, what="vit non-contiguous")
    calls = backends_used(monkeypatch)
    report = optimize(vit, backend="ref")  # a second call replaces the first swap, not stacks on it
    assert len(report.replaced) == 1 + cfg.num_layers
    with torch.no_grad():
        vit(x)
    assert calls and {b for _, b in calls} == {"ref"}


def test_optimized_model_copies_and_pickles(monkeypatch):
    vit, cfg = tiny_vit()
    optimize(vit, backend="ref")
    x = torch.rand(1, 1, *cfg.spatial_size)
    buf = io.BytesIO()
    torch.save(vit, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(vit), torch.load(buf, weights_only=False)):
        # the copy's swapped forwards read the copy's own weights, not the original's
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(1.5)
        calls = backends_used(monkeypatch)
        with torch.no_grad():
            out, want = twin(x)[0], vit(x)[0]
        assert calls and {b for _, b in calls} == {"ref"}
        assert not torch.allclose(out, want)
        attn = twin.blocks[0].attn
        assert attn.forward.module is attn and attn.__dict__["_segevol_fast_original_forward"].args[0] is attn


def test_backend_ref_is_a_no_kernel_run(monkeypatch):
    vit, cfg = tiny_vit(sdpa=True)
    calls = backends_used(monkeypatch)
    report = compare(vit, torch.rand(1, 1, *cfg.spatial_size), backend="ref", what="vit ref backend")
    assert report.backend == "ref"
    assert {op for op, _ in calls} == {"patch_embed", "flash_attention"}
    assert {b for _, b in calls} == {"ref"}
    with pytest.raises(ValueError, match="unknown backend"):
        optimize(vit, backend="cuda-please")


def test_unsupported_blocks_are_left_alone_with_reason():
    from monai.networks.blocks.selfattention import SABlock

    x = torch.randn(2, 7, 16)
    drop = SABlock(16, 4, dropout_rate=0.1, use_flash_attention=True).eval()  # SDPA drops in eval too
    causal = SABlock(16, 4, causal=True, sequence_length=7).eval()
    report = optimize(torch.nn.ModuleDict({"drop": drop, "causal": causal}))
    assert report.replaced == []
    reasons = {s.path: s.reason for s in report.left_alone}
    assert "dropout" in reasons["drop"] and "causal" in reasons["causal"]

    # A swapped block whose call needs what the op lacks (a mask) runs its original forward.
    plain = SABlock(16, 4).eval()
    exact_model = copy.deepcopy(plain).double()
    assert len(optimize(plain).replaced) == 1
    mask = torch.ones(2, 7)
    mask[0, 5:] = 0
    with torch.no_grad():
        out = plain(x, mask)
        exact = exact_model(x.double(), mask.double())
    assert_matches_reference(out, out, exact, "masked fallback")  # same path: bound is the floor


def test_peft_lora_vit(monkeypatch):
    peft = pytest.importorskip("peft")
    vit, cfg = tiny_vit()
    model = peft.get_peft_model(vit, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"], lora_dropout=0.0))
    model.eval()
    with torch.no_grad():  # lora_B starts at zero: make the LoRA term count
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn_like(p))
    original = copy.deepcopy(model)
    lora_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora_params and all("lora_" in n for n in lora_params)
    x = torch.rand(2, 1, *cfg.spatial_size)
    calls = backends_used(monkeypatch)
    report = compare(model, x, what="peft vit")
    kinds = [s.kind for s in report.replaced]
    assert kinds.count("peft.lora.Linear") == cfg.num_layers and kinds.count("monai.SABlock") == cfg.num_layers
    assert "lora_linear" in {op for op, _ in calls}

    # Gradients still reach the LoRA parameters, and match the original peft model's.
    w = torch.randn_like(original(x)[0])
    (original(x)[0] * w).sum().backward()
    (model(x)[0] * w).sum().backward()
    ref_grads = dict(original.named_parameters())
    for n, p in lora_params.items():
        assert p.grad is not None and p.grad.abs().max() > 0, n
        g_ref = ref_grads[n].grad
        assert (p.grad - g_ref).abs().max() <= 1e-4 * g_ref.abs().max(), n


def test_lora_dropout_runs_original_while_training(monkeypatch):
    peft = pytest.importorskip("peft")
    from monai.networks.blocks.selfattention import SABlock

    block = SABlock(16, 4, dropout_rate=0.2)
    model = peft.get_peft_model(block, peft.LoraConfig(r=2, target_modules=["qkv"], lora_dropout=0.3)).train()
    original = copy.deepcopy(model)
    report = optimize(model)  # training now, but eval() later must get the ops: swapped, not skipped
    assert {s.kind for s in report.replaced} == {"monai.SABlock", "peft.lora.Linear"}
    x = torch.randn(2, 9, 16)
    calls = backends_used(monkeypatch)
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)
    assert torch.equal(out, original(x)) and calls == []  # same dropout draws: the original ran
    model.eval()
    with torch.no_grad():
        model(x)
    assert {op for op, _ in calls} == {"flash_attention", "lora_linear"}


def test_segvol_is_already_on_ops(monkeypatch):
    cfg = SegVolConfig.tiny()
    model = SegVol(cfg).eval()
    params = {k: p.data_ptr() for k, p in model.named_parameters()}
    report = optimize(model)
    assert report.replaced == [] and [s.kind for s in report.left_alone] == ["segevol_fast.SegVol"]
    assert "nothing to swap" in report.left_alone[0].reason

    calls = backends_used(monkeypatch)
    report = optimize(model, backend="ref")
    assert "'ref' applied" in report.left_alone[0].reason
    with torch.no_grad():
        model.encode_image(torch.rand(1, 1, *cfg.spatial_size))
    assert calls and {b for _, b in calls} == {"ref"}
    assert {k: p.data_ptr() for k, p in model.named_parameters()} == params


def test_not_a_module():
    with pytest.raises(TypeError):
        optimize("vit")


def test_monai_and_peft_not_imported_by_segevol_fast():
    code = "import sys, segevol_fast; print(sorted({m.split('.')[0] for m in sys.modules} & {'monai', 'peft'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert segevol_fast.optimize is optimize


def _einsum_attention(q, k, v, scale):
    return torch.einsum("bhxy,bhyd->bhxd", (torch.einsum("bhxd,bhyd->bhxy", q, k) * scale).softmax(-1), v)


class _FutureSABlock(torch.nn.Module):
    """A `monai` SABlock whose attributes no MONAI release has (head size under another name):
    the swap cannot read its layout, so it must keep its own forward."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.num_heads, self.head_size = heads, hidden // heads
        self.qkv, self.out_proj = torch.nn.Linear(hidden, 3 * hidden), torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4)
        return self.out_proj(_einsum_attention(q, k, v, self.head_size**-0.5).transpose(1, 2).reshape(b, n, -1))


_FutureSABlock.__module__, _FutureSABlock.__name__ = "monai.networks.blocks.selfattention", "SABlock"


def test_blocks_whose_attributes_do_not_fit_are_left_alone_and_run(monkeypatch):
    from einops.layers.torch import Rearrange
    from monai.networks.blocks.selfattention import SABlock

    x = torch.randn(2, 7, 16)
    future = _FutureSABlock(16, 4).eval()
    # A real block whose q/k/v split interleaves per head: a layout no MONAI release has, which
    # the swap would misread as q | k | v.
    interleaved = SABlock(16, 4).eval()
    interleaved.input_rearrange = Rearrange("b h (l qkv d) -> qkv b l h d", qkv=3, l=4)
    model = torch.nn.ModuleDict({"future": future, "interleaved": interleaved})
    with torch.no_grad():
        want = {name: m(x) for name, m in model.items()}
    report = optimize(model)
    assert report.replaced == []
    reasons = {s.path: s.reason for s in report.left_alone}
    assert set(reasons) == {"future", "interleaved"}
    assert "dim_head / head_dim" in reasons["future"] and "input_rearrange" in reasons["interleaved"]
    calls = backends_used(monkeypatch)
    with torch.no_grad():
        for name, m in model.items():
            assert torch.equal(m(x), want[name]), name
    assert calls == []


@pytest.mark.parametrize(
    "variant",
    [
        dict(use_combined_linear=False),
        dict(include_fc=False, use_flash_attention=True),
        dict(dim_head=8, qkv_bias=True),
    ],
    ids=["separate-qkv", "no-fc-sdpa", "dim_head"],
)
def test_sablock_variants_match_original(variant, monkeypatch):
    from monai.networks.blocks.selfattention import SABlock

    block = SABlock(16, 4, **variant).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 9, 16)
    exact_model = copy.deepcopy(block).double()
    with torch.no_grad():
        before, exact = block(x), exact_model(x.double())
        assert len(optimize(block).replaced) == 1
        calls = backends_used(monkeypatch)
        after = block(x, attn_mask=None)  # what MONAI's TransformerBlock passes to every block
    assert [op for op, _ in calls] == ["flash_attention"]
    assert_matches_reference(after, before, exact, f"SABlock {variant}")


def test_einsum_dropout_read_from_drop_weights(monkeypatch):
    """Releases before MONAI 1.4 have no `dropout_rate`: the rate lives in `drop_weights` alone."""
    from monai.networks.blocks.selfattention import SABlock

    block = SABlock(16, 4, dropout_rate=0.3).train()
    del block.dropout_rate  # the einsum forward never reads it
    original = copy.deepcopy(block)
    assert len(optimize(block).replaced) == 1  # training is a passing state: swapped, checked per call
    x = torch.randn(2, 9, 16)
    calls = backends_used(monkeypatch)
    torch.manual_seed(3)
    out = block(x)
    torch.manual_seed(3)
    assert torch.equal(out, original(x)) and calls == []  # same dropout draws: the original ran
    with torch.no_grad():
        block.eval()(x)
    assert [op for op, _ in calls] == ["flash_attention"]


def test_patch_embedding_input_the_op_would_misread_runs_monai(monkeypatch):
    """A volume that is not whole patches: MONAI raises; the op alone would drop the remainder."""
    from monai.networks.blocks.patchembedding import PatchEmbeddingBlock

    block = PatchEmbeddingBlock(1, (8, 32, 32), (4, 16, 16), 32, 4, proj_type="perceptron").eval()
    original = copy.deepcopy(block)
    assert len(optimize(block).replaced) == 1
    calls = backends_used(monkeypatch)
    x = torch.rand(1, 1, 9, 32, 32)
    with pytest.raises(Exception) as want:
        original(x)
    with pytest.raises(want.type):
        block(x)
    assert calls == []
    with torch.no_grad():
        block(torch.rand(1, 1, 8, 32, 32))
    assert [op for op, _ in calls] == ["patch_embed"]
