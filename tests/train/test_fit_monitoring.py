"""What a run shows and keeps besides its last checkpoint: the best validation's checkpoint and
adapter files, early stopping, the progress bar, TensorBoard logs (tiny model, shared real CT)."""

from __future__ import annotations

import io
import json
import math
import sys

import pytest
import torch

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.errors import InvalidArgumentError, MissingDependencyError
from segevol_fast.train.datasets import SegmentationDataset
from segevol_fast.train.logs import tag
from segevol_fast.train.progress import TrainProgress
from segevol_fast.train.selection import BestTracker
from segevol_fast.train.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# cheap steps and validations: one category, box prompts only
FAST = {"batch_size": 1, "categories_per_image": 1, "mixes": ("box",), "eval_prompts": ("box",), "lr": 1e-3}


@pytest.fixture(scope="module")
def ct(abdomen_cases):
    ds = SegmentationDataset(abdomen_cases["ct"], SegVolConfig.tiny().spatial_size, train=False)
    ds.preload()
    return ds


def _model(data_dir) -> SegVol:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer")
        adapters.add_lora(model, "ct", adapters.LoraConfig(rank=2, alpha=4))
        for p in adapters.adapter_parameters(model):
            p.data.normal_(0, 0.05)
    return model


# ------------------------------------------------------------------------------ best / early stop
def test_best_tracker_rule():
    t = BestTracker(patience=2, min_delta=0.01)
    assert t.update(0.5, 1) and t.best_step == 1
    assert not t.update(0.505, 2)  # within min_delta: no improvement
    assert not t.should_stop
    assert not t.update(float("nan"), 3) and t.should_stop  # nan never improves
    assert t.update(0.6, 4) and not t.should_stop and t.since_best == 0
    again = BestTracker(patience=2, min_delta=0.01)
    again.load_state_dict(t.state_dict())
    assert (again.best, again.best_step, again.since_best) == (0.6, 4, 0)
    assert not BestTracker(patience=0).should_stop


def test_best_checkpoint_holds_the_best_validation_weights(data_dir, ct, tmp_path):
    """min_delta 2 (Dice is at most 1): only the first validation is ever a best, so best/ must
    hold the weights of step 1 while training goes on to step 3."""
    cfg = TrainConfig(steps=3, eval_every=1, save_every=1, min_delta=2.0, out_dir=str(tmp_path), **FAST)
    model = _model(data_dir)
    tr = Trainer(model, cfg, ct, ct)
    tr.fit(progress=False)
    assert tr.step == 3 and not tr.stopped_early and (tr.best.best_step, tr.best.since_best) == (1, 2)
    best = torch.load(tmp_path / "best" / "checkpoint.pt", weights_only=True)
    step1 = torch.load(tmp_path / "checkpoint_0000001.pt", weights_only=True)
    last = torch.load(tmp_path / "checkpoint_0000003.pt", weights_only=True)
    assert best["step"] == 1
    for name, w in step1["trainable"].items():
        assert torch.equal(best["trainable"][name], w), name
    assert any(not torch.equal(w, last["trainable"][n]) for n, w in step1["trainable"].items())
    summary = json.loads((tmp_path / "best" / "best.json").read_text())
    assert summary["step"] == 1 and summary["metric"] == "dice" and summary["value"] == tr.eval_history[0]["dice"]
    # the adapter file of the best step loads and reproduces its weights
    fresh = _model(data_dir)
    adapters.remove_adapter(fresh, "ct")
    adapters.load_adapter(fresh, tmp_path / "best" / "adapter_ct.safetensors")
    named = dict(fresh.named_parameters())
    for name, w in step1["trainable"].items():
        assert torch.equal(named[name], w), name
    # load_weights puts the best weights into a trainer's model
    other = Trainer(_model(data_dir), cfg, ct, ct).load_weights(tmp_path / "best" / "checkpoint.pt")
    for name, p in zip(other.param_names, other.params):
        assert torch.equal(p, best["trainable"][name])
    # the best so far travels in the last checkpoint
    resumed = Trainer(_model(data_dir), TrainConfig(**{**cfg.to_dict(), "steps": 4}), ct, ct)
    resumed.resume(tmp_path / "checkpoint_0000003.pt")
    assert (resumed.best.best, resumed.best.best_step, resumed.best.since_best) == (
        tr.best.best,
        1,
        2,
    )


def test_early_stopping_stops_after_patience_validations(data_dir, ct, tmp_path):
    cfg = TrainConfig(steps=10, eval_every=1, patience=2, min_delta=2.0, out_dir=str(tmp_path), **FAST)
    tr = Trainer(_model(data_dir), cfg, ct, ct)
    rows = tr.fit(progress=False)
    # validation 1 is the best, 2 and 3 are not: stop after step 3, with its checkpoint written
    assert tr.stopped_early and tr.step == 3 and [r["step"] for r in rows] == [1, 2, 3]
    assert [r["step"] for r in tr.eval_history] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pt")) == ["checkpoint_0000003.pt"]
    without = Trainer(_model(data_dir), TrainConfig(**{**cfg.to_dict(), "patience": 0, "steps": 4}), ct, ct)
    without.fit(progress=False)
    assert not without.stopped_early and without.step == 4


def test_best_metric_must_be_a_validated_column():
    with pytest.raises(InvalidArgumentError, match="best_metric"):
        TrainConfig(eval_prompts=("box",), best_metric="dice_text")
    with pytest.raises(InvalidArgumentError, match="min_delta"):
        TrainConfig(min_delta=-0.1)


# ------------------------------------------------------------------------------ progress
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_loss_and_validation_dice_on_a_terminal():
    screen = _Terminal()
    bar = TrainProgress(total=5, enabled=True, file=screen)
    bar.step({"loss": 0.8125, "lr": 1e-3})
    bar.validated(0.4321)
    bar.close()
    text = screen.getvalue()
    assert "loss=0.8125" in text and "val_dice=0.4321" in text and "1/5" in text
    for enabled, stream in ((False, _Terminal()), (True, io.StringIO())):  # asked off / not a terminal
        quiet = TrainProgress(total=5, enabled=enabled, file=stream)
        quiet.step({"loss": 0.5, "lr": 1e-3})
        quiet.close()
        assert stream.getvalue() == ""


def test_progress_bar_only_on_rank_0(monkeypatch):
    import segevol_fast.train.progress as progress

    monkeypatch.setattr(progress.dist_utils, "is_main", lambda: False)
    screen = _Terminal()
    bar = TrainProgress(total=5, enabled=True, file=screen)
    bar.step({"loss": 0.5, "lr": 1e-3})
    bar.close()
    assert screen.getvalue() == ""


def test_fit_draws_on_a_terminal_only(data_dir, ct, monkeypatch):
    cfg = TrainConfig(steps=1, **FAST)
    screen = _Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    Trainer(_model(data_dir), cfg, ct, ct).fit(progress=True)
    assert "finetune" in screen.getvalue() and "val_dice=" in screen.getvalue()
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    Trainer(_model(data_dir), cfg, ct, ct).fit(progress=True)
    assert piped.getvalue() == ""


# ------------------------------------------------------------------------------ tensorboard
def test_tensorboard_event_file_holds_the_scalars(data_dir, ct, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(steps=2, eval_every=1, tensorboard=True, out_dir=str(tmp_path), **FAST)
    tr = Trainer(_model(data_dir), cfg, ct, ct)
    rows = tr.fit(progress=False)
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/loss/box", "val/dice", "val/dice_box"} <= tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    val = acc.Scalars("val/dice_box")
    assert [e.value for e in val] == pytest.approx([r["dice_box"] for r in tr.eval_history], rel=1e-6)
    assert any(t.startswith("val/box/") for t in tags)  # per organ
    assert all(math.isfinite(e.value) for e in loss)


def test_tensorboard_asked_without_the_package_names_the_install(data_dir, ct, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    cfg = TrainConfig(steps=1, tensorboard=True, out_dir=str(tmp_path), **FAST)
    with pytest.raises(MissingDependencyError, match="pip install tensorboard"):
        Trainer(_model(data_dir), cfg, ct)
    with pytest.raises(InvalidArgumentError, match="out_dir"):
        Trainer(_model(data_dir), TrainConfig(steps=1, tensorboard=True, **FAST), ct)
    Trainer(_model(data_dir), TrainConfig(steps=1, out_dir=str(tmp_path), **FAST), ct).fit(progress=False)
    assert not (tmp_path / "tensorboard").exists()  # off unless asked


def test_tensorboard_tags():
    assert tag("train/loss[points+text]") == "train/loss/points_text"
    assert tag("val/text/right kidney") == "val/text/right_kidney"
