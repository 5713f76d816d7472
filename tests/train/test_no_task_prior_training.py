"""Training matches inference for prompts without text: segment() gives a box or points alone no
task, so the trainer decodes its box / points mixes with no task too when the context priors have
a "no task" prior, and that prior learns from them (and only from them)."""

from __future__ import annotations

import pytest
import torch

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.adapters import ContextPriorConfig
from segevol_fast.train.datasets import SegmentationDataset
from segevol_fast.train.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ct_train(abdomen_cases):
    """The CT resized whole (every step trains on the same image), read once for all tests."""
    data = SegmentationDataset(abdomen_cases["ct"], SegVolConfig.tiny().spatial_size, train=False)
    data.preload()
    return data


def _model(data_dir, cases, priors: bool = True, null_task: bool = True) -> SegVol:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer")
        if priors:
            tasks = tuple(dict.fromkeys(n for c in cases for n in c.label_map.values()))
            config = ContextPriorConfig(tasks=tasks, null_task=null_task, ffn_dim=16)
            adapters.add_context_priors(model, "p", config)
    return model


def _trainer(model, data, mixes, steps: int = 3) -> Trainer:
    cfg = TrainConfig(steps=steps, batch_size=1, lr=1e-2, categories_per_image=2, mixes=mixes, seed=5)
    return Trainer(model, cfg, data)


def _null_prior(model) -> torch.Tensor:
    return adapters.get_context_priors(model).decoder_side.null_prior.detach().clone()


@pytest.mark.parametrize("mixes", [("box",), ("points",), ("box", "points", "box+points")])
def test_mixes_without_text_train_the_no_task_prior(data_dir, abdomen_cases, ct_train, mixes):
    model = _model(data_dir, abdomen_cases["ct"])
    before = _null_prior(model)
    _trainer(model, ct_train, mixes).fit(progress=False)
    assert not torch.equal(_null_prior(model), before)


def test_text_mixes_leave_the_no_task_prior_as_it_was(data_dir, abdomen_cases, ct_train):
    model = _model(data_dir, abdomen_cases["ct"])
    before = _null_prior(model)
    tasks_before = adapters.get_context_priors(model).decoder_side.priors.detach().clone()
    _trainer(model, ct_train, ("text", "box+text", "points+text")).fit(progress=False)
    assert torch.equal(_null_prior(model), before)
    assert not torch.equal(adapters.get_context_priors(model).decoder_side.priors, tasks_before)


def test_step_zero_is_still_the_base_model(data_dir, abdomen_cases, ct_train):
    """Fresh priors, decoding mixes with and without a task, give the base model's loss exactly."""
    mixes = ("box", "points", "text", "box+text")
    losses = []
    for priors in (False, True):
        tr = _trainer(_model(data_dir, abdomen_cases["ct"], priors=priors), ct_train, mixes)
        batch = next(iter(tr.loader))
        with torch.no_grad():
            _, parts, _ = tr.loss_on(batch)
        losses.append(parts)
    assert torch.equal(losses[0], losses[1])


def test_priors_without_a_no_task_prior_keep_the_structure_task(data_dir, abdomen_cases, ct_train):
    """Priors saved before the "no task" prior existed cannot take task None: box mixes still
    train with the structure's task, as they always did."""
    model = _model(data_dir, abdomen_cases["ct"], null_task=False)
    assert adapters.get_context_priors(model).decoder_side.null_prior is None
    rows = _trainer(model, ct_train, ("box",), steps=2).fit(progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


@pytest.mark.parametrize("null_task", [True, False])
def test_resized_validation_scores_a_box_as_segment_gives_it(data_dir, abdomen_cases, ct_train, monkeypatch, null_task):
    """Validation's box prompts reach the priors as segment() gives them: task None through the
    no-task prior when there is one, the structure's task otherwise; text keeps its task."""
    from segevol_fast.train import validation

    model = _model(data_dir, abdomen_cases["ct"], null_task=null_task)
    seen = []
    real = validation.adapters.prompt_context

    def spy(**kw):
        seen.append(kw.get("tasks"))
        return real(**kw)

    monkeypatch.setattr(validation.adapters, "prompt_context", spy)
    validation.resized_validation(model, ct_train, ("text", "box"))
    text_tasks, box_tasks = [t for t in seen if t is not None][-2:]
    assert all(t is not None for t in text_tasks)
    assert box_tasks == ([None] * len(text_tasks) if null_task else text_tasks)
