"""Context priors on prompts without a task (a box or points alone): the learned "no task" prior.
segment() runs them, a fresh prior leaves the base model's probabilities bit for bit, a trained one
acts, the prior round-trips through files, and priors saved before it existed still load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segevol_fast import adapters
from segevol_fast.adapters.context_prior import ContextPriorConfig, add_context_priors, load_context_priors
from segevol_fast.errors import AdapterError

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = ("additive", "hermes")
BOX = (30, 25, 8, 80, 70, 20)  # voxel indices of the shared CT (122 x 101 x 30)
POINTS = {"points": [[55, 50, 14], [60, 45, 15]], "point_labels": [1, 1]}
PROMPTS = {"box": {"box": BOX}, "points": POINTS}


def _config(variant: str) -> ContextPriorConfig:
    return ContextPriorConfig(variant=variant, tasks=("liver", "spleen"), ffn_dim=16)


def _probabilities(model, volume, prompt: str, mode: str = "fast") -> np.ndarray:
    res = model.segment(volume, modality="ct", mode=mode, return_probabilities=True, progress=False, **PROMPTS[prompt])
    (probs,) = res.probabilities.values()
    return probs


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_fresh_priors_leave_taskless_prompts_exactly_the_base(tiny_model, ct, variant, prompt):
    base = _probabilities(tiny_model, ct, prompt)
    priors = add_context_priors(tiny_model, "p", _config(variant))
    assert np.array_equal(_probabilities(tiny_model, ct, prompt), base)
    assert priors.decoder_side.null_prior is not None


@pytest.mark.parametrize("mode", ("fast", "exact"))
def test_trained_null_prior_changes_taskless_prompts(tiny_model, ct, mode):
    base = _probabilities(tiny_model, ct, "box", mode)
    priors = add_context_priors(tiny_model, "p", _config("additive"))
    with torch.no_grad():
        last = priors.decoder_side.posterior[-1]  # the zero-initialised layer every task token passes
        last.weight.normal_(0.0, 0.3)
        priors.decoder_side.null_prior.normal_(0.0, 0.3)
    assert not np.array_equal(_probabilities(tiny_model, ct, "box", mode), base)


def test_null_prior_reaches_the_posterior_and_gets_gradients(tiny_model):
    priors = add_context_priors(tiny_model, "p", _config("hermes"))
    with torch.no_grad():
        priors.decoder_side.posterior[-1].weight.normal_(0.0, 0.3)
    x = torch.rand(1, 1, *tiny_model.config.spatial_size)
    box = torch.tensor([[1.0, 2.0, 3.0, 20.0, 40.0, 40.0]] * 3)
    with adapters.prompt_context(modalities=["ct"], tasks=["liver", None, None]):
        logits = tiny_model.decode(tiny_model.encode_image(x), boxes=box, upsample=False)
    assert torch.equal(logits[1], logits[2]) and not torch.equal(logits[0], logits[1])
    logits[1:].sum().backward()
    null_grad, task_grad = priors.decoder_side.null_prior.grad, priors.decoder_side.priors.grad
    assert null_grad is not None and null_grad.abs().sum() > 0
    assert task_grad is None or task_grad.abs().sum() == 0  # only the null token was used by rows 1, 2


def test_null_prior_round_trips_and_old_files_still_load(tiny_model, tmp_path):
    import copy

    from segevol_fast.adapters.io import read_adapter_file, save_adapter_file

    plain = copy.deepcopy(tiny_model)
    priors = add_context_priors(tiny_model, "p", _config("additive"))
    with torch.no_grad():
        priors.decoder_side.null_prior.normal_(0.0, 1.0)
    path = tmp_path / "priors.safetensors"
    adapters.save_adapter(tiny_model, "p", path)
    tensors, meta = read_adapter_file(path)
    assert meta["config"]["null_task"] is True
    loaded = load_context_priors(copy.deepcopy(plain), path)
    assert torch.equal(loaded.decoder_side.null_prior, priors.decoder_side.null_prior)

    # a file written before the null prior existed: no such tensor, no such config key
    del tensors["mask_decoder.after_transformer.null_prior"]
    del meta["config"]["null_task"]
    old = tmp_path / "old.safetensors"
    save_adapter_file(old, tensors, meta)
    before = copy.deepcopy(plain)
    old_priors = load_context_priors(before, old)
    assert old_priors.decoder_side.null_prior is None
    x = torch.rand(1, 1, *before.config.spatial_size)
    box = torch.tensor([[1.0, 2.0, 3.0, 20.0, 40.0, 40.0]])
    with adapters.prompt_context(modalities=["ct"], tasks=[None]), pytest.raises(AdapterError, match="no 'no task'"):
        before.decode(before.encode_image(x), boxes=box)
