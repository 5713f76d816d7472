"""Gradient accumulation: batch B as `accumulate` micro-batches gives the big batch's gradients,
synchronises DDP only on the last micro-batch, and resumes bit for bit (tiny model, real CT/MR)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.errors import InvalidArgumentError
from segevol_fast.train.datasets import SegmentationDataset
from segevol_fast.train.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mixed_train(abdomen_cases):
    """CT, MR, CT, MR: with batch 4 each step sees every case, with batch 2 an epoch is 2 steps."""
    ct, mr = abdomen_cases["ct"], abdomen_cases["mri"]
    ds = SegmentationDataset(ct + mr + ct + mr, SegVolConfig.tiny().spatial_size, train=True, seed=5)
    ds.preload()
    return ds


def _model(data_dir, dropout: float = 0.0) -> SegVol:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer")
        adapters.add_lora(model, "mri", adapters.LoraConfig(rank=4, alpha=8, dropout=dropout))
        for p in adapters.adapter_parameters(model):  # B starts at zero: give A gradients too
            p.data.normal_(0, 0.05)
    return model


BASE = {"batch_size": 4, "categories_per_image": 2, "mixes": ("text", "box"), "lr": 1e-3}


def test_accumulated_gradients_equal_the_full_batch_gradients(data_dir, mixed_train):
    """The micro-batches hold different numbers of pairs only if the scaling is per micro-batch:
    categories_per_image 2 on cases with many organs gives 2 pairs per image, and the gradient is
    the mean over all 8 pairs of the step, not a sum or a mean of micro-batch means."""
    grads, parts = [], []
    for accumulate in (1, 2, 4):
        tr = Trainer(_model(data_dir), TrainConfig(steps=1, accumulate=accumulate, **BASE), mixed_train)
        batch = next(iter(tr.loader))
        p, count = tr.backward(batch)
        assert count == 8
        grads.append([q.grad.clone() for q in tr.params])
        parts.append(p)
    assert any(g.abs().sum() > 0 for g in grads[0])
    for other, other_parts in zip(grads[1:], parts[1:]):
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(other_parts, parts[0], rtol=1e-5, atol=1e-8)


def test_accumulated_run_trains_like_the_big_batch(data_dir, mixed_train):
    rows = []
    for accumulate in (1, 4):
        tr = Trainer(_model(data_dir), TrainConfig(steps=2, accumulate=accumulate, **BASE), mixed_train)
        rows.append(tr.fit(progress=False))
    for a, b in zip(*rows):
        assert (a["step"], a["categories"], a["lr"]) == (b["step"], b["categories"], b["lr"])
        for key in ("loss", "bce", "dice", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key


class _SyncSpy(torch.nn.Module):
    """Stands in for DDP around the step module: records whether each forward ran inside no_sync."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.holding, self.calls = inner, False, []

    @contextlib.contextmanager
    def no_sync(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False

    def forward(self, images, plans):
        self.calls.append((images.shape[0], self.holding))
        return self.inner(images, plans)


def test_ddp_synchronises_only_the_last_micro_batch(data_dir, mixed_train):
    tr = Trainer(_model(data_dir), TrainConfig(steps=1, accumulate=4, **BASE), mixed_train)
    spy = tr._engine = _SyncSpy(tr._step_module)
    tr.fit(progress=False)
    assert spy.calls == [(1, True), (1, True), (1, True), (1, False)]
    spy.calls.clear()
    tr1 = Trainer(_model(data_dir), TrainConfig(steps=1, accumulate=1, **BASE), mixed_train)
    spy = tr1._engine = _SyncSpy(tr1._step_module)
    tr1.fit(progress=False)
    assert spy.calls == [(4, False)]


def test_resume_with_accumulation_is_bit_exact(data_dir, mixed_train, tmp_path):
    cfg = dict(BASE, batch_size=2, accumulate=2, steps=3, box_jitter=2, grad_clip=1.0, seed=11)
    straight = Trainer(_model(data_dir, dropout=0.1), TrainConfig(**cfg), mixed_train)
    straight_rows = straight.fit(progress=False)
    first = Trainer(_model(data_dir, dropout=0.1), TrainConfig(**cfg), mixed_train)
    first.fit(progress=False, until=1)
    ckpt = first.save_checkpoint(tmp_path / "mid.pt")
    torch.manual_seed(123)  # resume must restore the global RNG (LoRA dropout draws from it)
    fresh = _model(data_dir, dropout=0.1)
    second = Trainer(fresh, TrainConfig(**cfg), mixed_train).resume(ckpt)
    resumed = second.fit(progress=False)

    def drop(rows):
        return [{k: v for k, v in r.items() if k != "step_time"} for r in rows]

    assert drop(resumed) == drop(straight_rows[1:])
    for (name, p), (_, q) in zip(straight.model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), name


def test_accumulate_must_divide_the_batch(data_dir, mixed_train):
    with pytest.raises(InvalidArgumentError, match="accumulate"):
        TrainConfig(batch_size=4, accumulate=3)
    with pytest.raises(InvalidArgumentError):
        TrainConfig(accumulate=0)
