"""Context priors (both variants): identity at step 0, learning, kv_len masking of padded prior
slots, image embeddings independent of tasks, per-prompt posteriors, files, errors, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.adapters import context_prior as cp
from segevol_fast.adapters.context_prior import (
    ContextPriorConfig,
    add_context_priors,
    load_context_priors,
    remove_context_priors,
    save_context_priors,
)
from segevol_fast.errors import AdapterError, AdapterMismatchError, CheckpointError
from segevol_fast.model.seams import adapter_state

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = ("additive", "hermes")
TASKS = ("liver", "spleen", "left kidney")


@pytest.fixture
def model():
    return SegVol(SegVolConfig.tiny()).eval()  # fresh random weights (conftest's fresh seed)


def _config(variant, **kw):
    # hidden 32 in the tiny model: 4 heads of 8, a small FFN
    return ContextPriorConfig(variant=variant, tasks=TASKS, ffn_dim=16, **kw)


def _inputs(model, n_images=2, n_prompts=3):
    cfg = model.config
    x = torch.rand(n_images, 1, *cfg.spatial_size)
    D, H, W = cfg.spatial_size
    lo = torch.tensor([1.0, 2.0, 3.0])
    boxes = torch.stack(
        [torch.cat([lo + i, torch.tensor([D - 2.0, H - 3.0 - i, W - 4.0 - i])]) for i in range(n_prompts)]
    )
    return x, boxes


def _run(model, x, boxes, modalities, tasks, image_row=0):
    """Encode all images; decode every prompt against image `image_row` (batch-1 embedding)."""
    with adapters.prompt_context(modalities=modalities, tasks=tasks):
        emb = model.encode_image(x)
        return emb, model.decode(emb[image_row : image_row + 1], boxes=boxes, upsample=False)


def _perturb(priors, std=0.3):
    """Move every prior parameter off its initial value (as training would)."""
    with torch.no_grad():
        for p in priors.parameters():
            p.normal_(0.0, std)


# ---------------------------------------------------------------------------- identity at init
@pytest.mark.parametrize("variant", VARIANTS)
def test_fresh_priors_are_an_exact_identity(model, variant):
    x, boxes = _inputs(model)
    with torch.no_grad():
        base_emb = model.encode_image(x)
        base_shared = model.decode(base_emb[:1], boxes=boxes[:3], upsample=False)
        base_paired = model.decode(base_emb, boxes=boxes[:2])  # one prompt per image row
    add_context_priors(model, "p", _config(variant))
    with torch.no_grad(), adapters.prompt_context(modalities=["mri", "ct"], tasks=["liver", "spleen", "liver"]):
        emb = model.encode_image(x)
        shared = model.decode(emb[:1], boxes=boxes[:3], upsample=False)
    with torch.no_grad(), adapters.prompt_context(modalities=["mri", "ct"], tasks=["left kidney", "spleen"]):
        paired = model.decode(model.encode_image(x), boxes=boxes[:2])
    assert torch.equal(emb, base_emb)
    assert torch.equal(shared, base_shared)
    assert torch.equal(paired, base_paired)


def test_remove_restores_the_base_model_and_seams_are_exclusive(model):
    x, boxes = _inputs(model)
    with torch.no_grad():
        base = model.decode(model.encode_image(x)[:1], boxes=boxes, upsample=False)
    priors = add_context_priors(model, "p", _config("additive"))
    with pytest.raises(AdapterError, match="already taken"):
        add_context_priors(model, "q", _config("hermes"))
    _perturb(priors)
    with torch.no_grad():
        changed = _run(model, x, boxes, ["ct"], ["liver"])[1]
    assert not torch.equal(changed, base)
    remove_context_priors(model)
    assert model.image_encoder.after_encoder is None and model.mask_decoder.after_transformer is None
    with torch.no_grad():  # no context needed any more, and the hook is gone
        assert torch.equal(model.decode(model.encode_image(x)[:1], boxes=boxes, upsample=False), base)


# ---------------------------------------------------------------------------- learning
@pytest.mark.parametrize("variant", VARIANTS)
def test_priors_learn_a_task_dependent_posterior(model, variant):
    """Only prior parameters train. Toy objective on one image and one box: liver prompts should
    score higher than spleen prompts (loss = mean spleen logit - mean liver logit, 0 at init);
    only the task posterior can separate two prompts that share image and box."""
    x, boxes = _inputs(model, n_images=1, n_prompts=1)
    priors = add_context_priors(model, "p", _config(variant))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable and trainable == {id(p) for p in priors.parameters()}
    prompts, tasks = boxes.expand(2, -1), ["liver", "spleen"]

    def loss_and_outputs():
        emb, logits = _run(model, x, prompts, ["mri"], tasks)
        loss = logits[1].mean() - logits[0].mean()
        if priors.aux_loss is not None:
            loss = loss + priors.aux_loss - priors.aux_loss.detach()  # its gradient, not its value
        return loss, emb, logits

    with torch.no_grad():
        loss0, emb0, logits0 = loss_and_outputs()
    assert loss0 == 0 and torch.equal(logits0[0], logits0[1])  # at init the task changes nothing
    opt = torch.optim.AdamW(priors.parameters(), lr=1e-2)
    for _ in range(10):
        opt.zero_grad()
        loss_and_outputs()[0].backward()
        opt.step()
    with torch.no_grad():
        loss1, emb1, logits1 = loss_and_outputs()
    # the tiny random base moves its logits little (d logit / d mask token ~ 1e-2): a small margin
    assert loss1 < -1e-4
    assert not torch.equal(emb1, emb0)  # the image side learned too
    # the posterior is per prompt: a batch of mixed tasks equals decoding each task alone
    with torch.no_grad():
        for i, task in enumerate(tasks):
            alone = _run(model, x, boxes, ["mri"], [task])[1]
            torch.testing.assert_close(alone[0], logits1[i], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- kv_len and padding
def _garbage_padding(monkeypatch):
    """Make pad_keys write large random values into its alignment slots."""
    real = cp.pad_keys

    def noisy(parts, lengths, fill=0.0):
        keys, kv_len = real(parts, lengths, fill)
        total = sum(p.shape[1] for p in parts)
        keys = keys.clone()
        keys[:, total:] = torch.randn_like(keys[:, total:]) * 1e3
        return keys, kv_len

    monkeypatch.setattr(cp, "pad_keys", noisy)


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_prior_slots_do_not_change_the_output(model, variant, monkeypatch):
    x, boxes = _inputs(model)
    priors = add_context_priors(model, "p", _config(variant))
    _perturb(priors)
    n_tokens = math.prod(model.config.grid_size)
    keys_total = (n_tokens + 1) if variant == "additive" else priors.config.tokens_per_modality
    assert keys_total % cp.KV_ALIGN, "the test needs padding slots to exist"
    with torch.no_grad():
        emb, logits = _run(model, x, boxes, ["ct", "mri"], ["spleen"])
        _garbage_padding(monkeypatch)
        emb2, logits2 = _run(model, x, boxes, ["ct", "mri"], ["spleen"])
    assert torch.equal(emb, emb2) and torch.equal(logits, logits2)


def test_cross_attention_over_padded_keys_matches_plain_softmax():
    """Independent expectation: softmax attention over the valid keys only, in float64."""
    hidden, heads, B = 16, 4, 3
    att = cp.CrossAttention(hidden, heads).double()
    x = torch.randn(B, 5, hidden, dtype=torch.float64)
    image = torch.randn(B, 7, hidden, dtype=torch.float64)
    prior = torch.randn(B, 4, hidden, dtype=torch.float64)
    valid = torch.tensor([4, 1, 2])  # row b has valid[b] prior tokens, the rest are padding
    keys, kv_len = cp.pad_keys([image, prior], [torch.full((B,), 7), valid], fill=7.0)
    assert keys.shape[1] % cp.KV_ALIGN == 0 and kv_len.tolist() == (7 + valid).tolist()
    with torch.no_grad():
        out = att(x, keys, kv_len)
        d = hidden // heads
        for b in range(B):
            kv = torch.cat([image[b], prior[b, : valid[b]]])
            q = att.q_proj(x[b]).view(5, heads, d).transpose(0, 1)
            k = att.k_proj(kv).view(-1, heads, d).transpose(0, 1)
            v = att.v_proj(kv).view(-1, heads, d).transpose(0, 1)
            w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
            expected = att.out_proj((w @ v).transpose(0, 1).reshape(5, hidden))
            torch.testing.assert_close(out[b], expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- one embedding per image
@pytest.mark.parametrize("variant", VARIANTS)
def test_image_embedding_depends_on_modality_not_on_tasks(model, variant):
    x, _ = _inputs(model)
    priors = add_context_priors(model, "p", _config(variant))
    _perturb(priors)
    with torch.no_grad():
        with adapters.prompt_context(modalities=["ct", "mri"], tasks=["liver"]):
            a = model.encode_image(x)
            key_ct = adapter_state(model.image_encoder)
        with adapters.prompt_context(modalities=["ct", "mri"], tasks=["spleen", "left kidney"]):
            b = model.encode_image(x)
        with adapters.prompt_context(modalities=["mri", "mri"], tasks=["liver"]):
            c = model.encode_image(x)
            key_mri = adapter_state(model.image_encoder)
    assert torch.equal(a, b)
    assert torch.equal(a[1], c[1]) and not torch.equal(a[0], c[0])  # row 0 changed modality only
    assert key_ct != key_mri  # the window cache keys on the modality rows


# ---------------------------------------------------------------------------- files
@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip(model, variant, tmp_path):
    x, boxes = _inputs(model)
    priors = add_context_priors(model, "mr", _config(variant))
    _perturb(priors)
    with torch.no_grad():
        expected = _run(model, x, boxes, ["mri", "ct"], ["left kidney", "liver", "spleen"])
    path = save_context_priors(model, tmp_path / "priors.safetensors")
    other = SegVol(SegVolConfig.tiny()).eval()
    other.load_state_dict(adapters.base_state_dict(model))
    loaded = load_context_priors(other, path)
    assert loaded.name == "mr" and loaded.config == priors.config
    with torch.no_grad():
        got = _run(other, x, boxes, ["mri", "ct"], ["left kidney", "liver", "spleen"])
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_load_refuses_other_base_weights(model, tmp_path):
    add_context_priors(model, "mr", _config("additive"))
    path = save_context_priors(model, tmp_path / "priors.safetensors")
    other = SegVol(SegVolConfig.tiny()).eval()  # other random base weights
    with pytest.raises(AdapterMismatchError):
        load_context_priors(other, path)
    assert other.image_encoder.after_encoder is None  # nothing half-attached
    load_context_priors(other, path, check_base=False)
    assert isinstance(other.mask_decoder.after_transformer, cp.TaskPosterior)


def test_load_refuses_a_lora_file(model, tmp_path):
    adapters.add_lora(model, "mr", adapters.LoraConfig(rank=2, targets=("image_encoder.blocks.*.attn.qkv:q,v",)))
    path = adapters.save_adapter(model, "mr", tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="not a .context_prior. one"):
        load_context_priors(model, path)


# ---------------------------------------------------------------------------- errors
def test_unknown_task_or_modality_names_the_known_ones(model):
    x, boxes = _inputs(model, n_images=1)
    add_context_priors(model, "p", _config("additive", modalities=("ct",)))
    with pytest.raises(AdapterError, match=r"task 'pancreas'.*'liver', 'spleen', 'left kidney'"):
        _run(model, x, boxes, ["ct"], ["liver", "pancreas", "spleen"])
    with pytest.raises(AdapterError, match=r"modality 'mri'.*\['ct'\]"):
        _run(model, x, boxes, ["mri"], ["liver"])


def test_missing_context_is_an_error(model):
    x, boxes = _inputs(model, n_images=1)
    add_context_priors(model, "p", _config("hermes"))
    with pytest.raises(AdapterError, match="prompt_context"):
        model.encode_image(x)
    with adapters.prompt_context(modalities=["ct"]):
        emb = model.encode_image(x)
    with pytest.raises(AdapterError, match="tasks"):  # the decoder needs the tasks
        model.decode(emb, boxes=boxes)


def test_config_defaults_round_trip_and_checks():
    h = ContextPriorConfig(variant="hermes", modalities=("CT", "MR"), tasks=("liver",))
    assert (h.tokens_per_modality, h.aux_modality_loss_weight, h.modalities) == (10, 0.01, ("ct", "mri"))
    a = ContextPriorConfig(tasks=["liver", "spleen"])
    assert (a.tokens_per_modality, a.aux_modality_loss_weight, a.posterior_scale) == (1, 0.0, 0.1)
    for c in (h, a):
        assert ContextPriorConfig.from_dict(c.to_dict()) == c
    for bad in (
        {"variant": "x", "tasks": ("a",)},
        {"tasks": ()},
        {"tasks": ("a", "a")},
        {"tasks": ("a",), "modalities": ("pet",)},
        {"tasks": ("a",), "tokens_per_modality": 3},
        {"tasks": ("a",), "aux_modality_loss_weight": 0.1},
        {"variant": "hermes", "tasks": ("a",), "heads": 0},
    ):
        with pytest.raises(AdapterError):
            ContextPriorConfig(**bad)


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_the_used_prior_tokens_only(model, variant):
    x, boxes = _inputs(model, n_images=1, n_prompts=2)
    priors = add_context_priors(model, "p", _config(variant))
    # one SGD-like move of the zero-initialised output layers opens the paths (as a first step does)
    with torch.no_grad():
        for layer in (
            priors.image_side.gate if variant == "additive" else priors.image_side.image_from_prior.out_proj,
            priors.decoder_side.posterior[-1],
        ):
            layer.weight.normal_(0.0, 0.3)
    _, logits = _run(model, x, boxes, ["mri"], ["spleen", "left kidney"])
    loss = logits.square().mean()
    if priors.aux_loss is not None:
        loss = loss + priors.aux_loss
    loss.backward()
    mod, task = priors.image_side.priors.grad, priors.decoder_side.priors.grad
    assert mod[1].abs().sum() > 0 and torch.count_nonzero(mod[0]) == 0  # "mri" used, "ct" not
    assert task[1].abs().sum() > 0 and task[2].abs().sum() > 0 and torch.count_nonzero(task[0]) == 0


def test_hermes_aux_modality_loss(model):
    x, _boxes = _inputs(model)
    priors = add_context_priors(model, "p", _config("hermes"))
    with adapters.prompt_context(modalities=["ct", "mri"], tasks=["liver"]):
        model.encode_image(x)
    aux = priors.aux_loss
    assert aux is not None and aux.dim() == 0 and math.isfinite(aux.item())
    # 0.01 * a 2-class cross-entropy whose logits start small: near 0.01 * ln 2
    assert 0.0 < aux.item() < 0.01 * 3 * math.log(2)
    aux.backward()
    assert priors.image_side.modality_head[1].weight.grad.abs().sum() > 0
    none = add_context_priors(SegVol(SegVolConfig.tiny()), "p", _config("hermes", aux_modality_loss_weight=0.0))
    assert none.aux_loss is None and not hasattr(none.image_side, "modality_head")


def test_a_deep_copied_model_records_into_its_own_posterior(model):
    import copy

    x, boxes = _inputs(model)
    _perturb(add_context_priors(model, "p", _config("hermes")))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        expected = _run(model, x, boxes, ["ct"], ["liver"])[1]
        assert torch.equal(_run(twin, x, boxes, ["ct"], ["liver"])[1], expected)
