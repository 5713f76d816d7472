"""The trainer: the loss falls, adapter-only steps, the schedule, clipping, bit-exact resume,
evaluation, metric files, AMP and gradient checkpointing (tiny model, shared real CT/MR)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.errors import CheckpointError, InvalidArgumentError
from segevol_fast.train.cases import cases_from_files
from segevol_fast.train.datasets import SegmentationDataset
from segevol_fast.train.schedule import warmup_cosine
from segevol_fast.train.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def cases(data_dir):
    lm = json.loads((data_dir / "labels.json").read_text())
    ct = cases_from_files(
        [(data_dir / "ct_abdomen_sm.nii.gz", data_dir / "ct_abdomen_sm_labels.nii.gz")], lm["ct"], "ct", "ct_sm"
    )
    mr = cases_from_files(
        [(data_dir / "mr_abdomen_sm.nii.gz", data_dir / "mr_abdomen_sm_labels.nii.gz")], lm["mr"], "mri", "mr_sm"
    )
    return {"ct": ct, "mr": mr, "tokenizer": data_dir / "clip_tokenizer"}


SIZE = SegVolConfig.tiny().spatial_size


@pytest.fixture(scope="module")
def ct_eval(cases):
    """The whole CT resized (no augmentation): a fixed target for loss-falls and evaluation."""
    ds = SegmentationDataset(cases["ct"], SIZE, train=False)
    ds.preload()
    return ds


@pytest.fixture(scope="module")
def mixed_train(cases):
    """CT, MR, CT (3 cases: with batch 2 an epoch is 2 steps, so resume lands mid-epoch)."""
    ds = SegmentationDataset(cases["ct"] + cases["mr"] + cases["ct"], SIZE, train=True, seed=7)
    ds.preload()
    return ds


def _model(cases, seed: int = 0, lora: bool = False, dropout: float = 0.0) -> SegVol:
    """The same base for a given seed (independent of the global RNG before the call)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SegVol(SegVolConfig.tiny(), tokenizer=cases["tokenizer"])
        if lora:
            adapters.add_lora(model, "mri", adapters.LoraConfig(rank=4, alpha=8, dropout=dropout))
            # B starts at zero; give it values so that A receives gradients too
            for p in adapters.adapter_parameters(model):
                p.data.normal_(0, 0.05)
    return model


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------ config
def test_config_round_trip_and_validation():
    cfg = TrainConfig(steps=7, batch_size=2, amp="bf16", grad_clip=0.5, mixes=("text", "box"), out_dir="x")
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    for bad in (
        {"steps": 0},
        {"amp": "fp8"},
        {"mixes": ("text", "nope")},
        {"grad_clip": 0.0},
        {"batch_size": 1.5},
        {"categories_per_image": 0},
    ):
        with pytest.raises(InvalidArgumentError):
            TrainConfig(**bad)
    with pytest.raises(InvalidArgumentError):
        TrainConfig.from_dict({"steps": 3, "learning_rate": 1.0})


# ------------------------------------------------------------------------------ schedule
def test_schedule_warmup_then_cosine_by_hand():
    total, warm, ratio = int(torch.randint(8, 30, ())), int(torch.randint(1, 6, ())), float(torch.rand(()) * 0.5)
    base = 0.01
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=base)
    sched = warmup_cosine(opt, total, warm, ratio)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = []
    for s in range(total):
        if s < warm:
            expected.append(base * (s + 1) / warm)
        else:
            t = (s - warm) / (total - warm)
            expected.append(base * (ratio + (1 - ratio) * (math.cos(math.pi * t) + 1) / 2))
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert seen[warm - 1] == pytest.approx(base) and max(seen) == pytest.approx(base)


def test_trainer_logs_the_scheduled_lr(cases, ct_eval):
    cfg = TrainConfig(steps=4, batch_size=1, lr=2e-3, warmup_steps=2, min_lr_ratio=0.25, categories_per_image=1)
    tr = Trainer(_model(cases), cfg, ct_eval)
    lrs = [r["lr"] for r in tr.fit(progress=False)]
    # steps 2, 3 are cosine progress 0 and 1/2 of the 2 post-warm-up steps
    assert lrs == pytest.approx([1e-3, 2e-3, 2e-3, 2e-3 * (0.25 + 0.75 * 0.5)], rel=1e-12)


# ------------------------------------------------------------------------------ learning
def test_loss_falls_on_the_real_ct(cases, ct_eval):
    # 20 steps: over random seeds the last-3 / first-3 mean ratio measured 0.75-0.90 (at 10 steps
    # 0.89-0.98, so about one seed in 25 missed the 0.97 bound without any fault)
    cfg = TrainConfig(steps=20, batch_size=1, lr=3e-3, seed=int(torch.randint(0, 10_000, ())))
    losses = [
        r["loss"] for r in Trainer(_model(cases, seed=int(torch.randint(0, 100, ()))), cfg, ct_eval).fit(progress=False)
    ]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.97 * sum(losses[:3]) / 3, losses


def test_adapter_only_step_leaves_the_base_untouched(cases, mixed_train):
    model = _model(cases, lora=True)
    before = _params(model)
    adapter_names = {n for n, p in model.named_parameters() if any(p is q for q in adapters.adapter_parameters(model))}
    tr = Trainer(model, TrainConfig(steps=1, batch_size=2, lr=1e-3, categories_per_image=2), mixed_train)
    assert {n for n in tr.param_names} == adapter_names
    tr.fit(progress=False)
    after = _params(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "nothing was trained"
    assert changed <= adapter_names, sorted(changed - adapter_names)[:5]
    # every LoRA matrix moves (A gets gradients since B was made non-zero)
    assert changed == adapter_names


def test_gradient_clipping_bounds_the_norm(cases, ct_eval):
    clip = 1e-3
    tr = Trainer(_model(cases), TrainConfig(steps=1, batch_size=1, grad_clip=clip, categories_per_image=3), ct_eval)
    row = tr.fit(progress=False)[0]
    assert row["grad_norm"] > 10 * clip  # the logged norm is the one before clipping
    # gradients stay on the parameters after the step: their global norm is the clipped one
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in tr.params if p.grad is not None])
    )
    assert float(norm) <= clip * (1 + 1e-5)
    assert float(norm) == pytest.approx(clip, rel=1e-4)


def test_unclipped_gradients_are_left_alone(cases, ct_eval):
    tr = Trainer(_model(cases), TrainConfig(steps=1, batch_size=1, categories_per_image=3), ct_eval)
    row = tr.fit(progress=False)[0]
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in tr.params if p.grad is not None])
    )
    assert float(norm) == pytest.approx(row["grad_norm"], rel=1e-5)


# ------------------------------------------------------------------------------ resume
def test_resume_is_bit_exact(cases, mixed_train, tmp_path):
    """N steps straight == k steps, checkpoint, a fresh model + trainer, resume, N - k steps; for
    k mid-epoch in epochs 0 and 1 and on the epoch edge (an epoch is 2 steps here)."""
    n = 4
    cfg = {
        "steps": n,
        "batch_size": 2,
        "lr": 1e-3,
        "warmup_steps": 1,
        "categories_per_image": 2,
        "box_jitter": 2,
        "grad_clip": 1.0,
        "seed": int(torch.randint(0, 10_000, ())),
    }
    straight = Trainer(
        _model(cases, lora=True, dropout=0.1), TrainConfig(**cfg, out_dir=str(tmp_path / "a")), mixed_train
    )
    straight_rows = straight.fit(progress=False)
    drop = ("step_time",)
    for k in (1, 2, 3):
        first = Trainer(
            _model(cases, lora=True, dropout=0.1), TrainConfig(**cfg, out_dir=str(tmp_path / f"b{k}")), mixed_train
        )
        first.fit(progress=False, until=k)
        ckpt = first.save_checkpoint(tmp_path / f"b{k}" / "mid.pt")
        torch.manual_seed(int(torch.randint(0, 10_000, ())))  # scramble the global RNG: resume must restore it

        fresh = _model(cases, lora=True, dropout=0.1)
        second = Trainer(fresh, TrainConfig(**cfg, out_dir=str(tmp_path / f"b{k}")), mixed_train).resume(ckpt)
        assert second.step == k
        resumed_rows = second.fit(progress=False)
        assert [{a: v for a, v in r.items() if a not in drop} for r in resumed_rows] == [
            {a: v for a, v in r.items() if a not in drop} for r in straight_rows[k:]
        ], k
        for (name, p), (_, q) in zip(straight.model.named_parameters(), fresh.named_parameters()):
            assert torch.equal(p, q), (k, name)
        for sa, sb in zip(straight.optimizer.state.values(), second.optimizer.state.values()):
            assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_resume_refuses_another_data_stream_or_model(cases, mixed_train, tmp_path):
    tr = Trainer(
        _model(cases, lora=True), TrainConfig(steps=2, batch_size=2, seed=1, categories_per_image=1), mixed_train
    )
    path = tr.save_checkpoint(tmp_path / "c.pt")
    other_seed = Trainer(
        _model(cases, lora=True), TrainConfig(steps=2, batch_size=2, seed=2, categories_per_image=1), mixed_train
    )
    with pytest.raises(CheckpointError, match="seed"):
        other_seed.resume(path)
    no_lora = Trainer(_model(cases), TrainConfig(steps=2, batch_size=2, seed=1, categories_per_image=1), mixed_train)
    with pytest.raises(CheckpointError, match="other parameters"):
        no_lora.resume(path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        tr.resume(tmp_path / "junk.pt")
    assert not list(tmp_path.glob(".*tmp*")), "atomic write left a temporary file"


# ------------------------------------------------------------------------------ files
def _rows(path):
    lines = path.read_text().splitlines()
    return lines


def test_metric_files_one_row_per_logged_step_and_resume_appends(cases, mixed_train, tmp_path):
    base = {
        "batch_size": 2,
        "categories_per_image": 1,
        "log_every": 2,
        "out_dir": str(tmp_path),
        "mixes": ("text", "box"),
    }
    first = Trainer(_model(cases), TrainConfig(steps=4, **base), mixed_train)
    first.fit(progress=False)
    assert (tmp_path / "checkpoint_0000004.pt").is_file()
    csv_lines, jsonl = _rows(tmp_path / "train_log.csv"), _rows(tmp_path / "train_log.jsonl")
    assert len(csv_lines) == 1 + 2 and len(jsonl) == 2
    assert [json.loads(x)["step"] for x in jsonl] == [2, 4]
    header = csv_lines[0].split(",")
    assert {"step", "loss", "bce", "dice", "lr", "grad_norm", "step_time", "loss[text]", "loss[box]"} <= set(header)

    second = Trainer(_model(cases), TrainConfig(steps=6, **base), mixed_train).resume(
        tmp_path / "checkpoint_0000004.pt"
    )
    second.fit(progress=False)
    csv_lines, jsonl = _rows(tmp_path / "train_log.csv"), _rows(tmp_path / "train_log.jsonl")
    assert len(csv_lines) == 1 + 3 and [json.loads(x)["step"] for x in jsonl] == [2, 4, 6]
    row = json.loads(jsonl[-1])
    assert row["loss"] == pytest.approx(row["loss[text]"] + row["loss[box]"])


# ------------------------------------------------------------------------------ evaluation
def test_evaluate_dice_in_range_and_deterministic(cases, ct_eval):
    model = _model(cases)
    tr = Trainer(model, TrainConfig(steps=1, batch_size=1), ct_eval)
    model.train()
    a = tr.evaluate(ct_eval, jitter=5)
    b = tr.evaluate(ct_eval, jitter=5)
    assert model.training, "evaluate must restore train mode"
    assert a == b
    assert set(a["mean"]) == {"text", "box", "jittered_box"}
    assert a["per_label"], "no label evaluated"
    for row in a["per_label"]:
        for kind in ("text", "box", "jittered_box"):
            assert 0.0 <= row[kind] <= 1.0
    for kind in a["mean"]:
        assert a["mean"][kind] == pytest.approx(sum(r[kind] for r in a["per_label"]) / len(a["per_label"]))
    labels = ct_eval[0]["labels"]
    assert len(a["per_label"]) == int(sum(bool((labels[c] > 0.5).any()) for c in range(labels.shape[0])))
    with pytest.raises(InvalidArgumentError):
        tr.evaluate(ct_eval, prompts=("points",))


def test_evaluate_dice_matches_an_independent_computation(cases, ct_eval):
    model = _model(cases)
    tr = Trainer(model, TrainConfig(steps=1, batch_size=1), ct_eval)
    res = tr.evaluate(ct_eval, prompts=("box",))
    sample = ct_eval[0]
    row = res["per_label"][0]
    c = sample["names"].index(row["label"])
    mask = sample["labels"][c] > 0.5
    idx = torch.nonzero(mask)
    box = torch.cat([idx.min(0).values, idx.max(0).values]).float()[None]
    with torch.no_grad():
        logits = model.decode(model.encode_image(sample["image"][None]), boxes=box)
    pred = logits[0, 0] > 0
    expected = 2 * (pred & mask).sum().item() / (pred.sum().item() + mask.sum().item())
    assert row["box"] == pytest.approx(expected)


# ------------------------------------------------------------------------------ precision, memory
def test_amp_bf16_on_cpu_trains_like_fp32(cases, ct_eval):
    """bf16 autocast runs the same steps as fp32 to bf16 accuracy, on fp32 weights.

    Measured (tiny model, 2 steps): losses agree to 4e-5 relative, gradient norms to 3e-3, and the
    parameter updates have a cosine similarity of 0.99; rows bit-equal to fp32 mean autocast was
    not applied, a gradient scaled under AMP (a loss scaler left on) moves the norms, and weights
    cast to bf16 show in their dtype."""

    def run(amp: str):
        model = _model(cases)
        before = _params(model)
        cfg = TrainConfig(steps=2, batch_size=1, amp=amp, categories_per_image=2, seed=3)
        rows = Trainer(model, cfg, ct_eval).fit(progress=False)
        after = _params(model)
        step = torch.cat([(after[n] - before[n]).flatten() for n in before])
        return rows, step, {p.dtype for p in after.values()}

    (fp32, fp32_step, _), (bf16, bf16_step, dtypes) = run("off"), run("bf16")
    assert dtypes == {torch.float32}  # autocast computes in bf16; the weights (and Adam) stay fp32
    assert [r["loss"] for r in bf16] != [r["loss"] for r in fp32]  # bf16 arithmetic really ran
    for a, b in zip(fp32, bf16):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=3e-2)
    assert bf16_step.norm() > 0
    assert float(torch.nn.functional.cosine_similarity(fp32_step, bf16_step, dim=0)) > 0.9


def test_gradient_checkpointing_gives_the_same_gradients(cases, mixed_train):
    def grads(checkpointing: bool):
        model = _model(cases, lora=True)
        tr = Trainer(
            model,
            TrainConfig(steps=1, batch_size=2, categories_per_image=2, grad_checkpointing=checkpointing),
            mixed_train,
        )
        assert model.image_encoder.gradient_checkpointing is checkpointing
        batch = next(iter(tr.loader))
        loss, _, _ = tr.loss_on(batch)
        loss.backward()
        return [p.grad.clone() for p in tr.params]

    plain, recomputed = grads(False), grads(True)
    assert any(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ command line
def _cli(argv):
    import argparse

    from segevol_fast.cli.finetune import add_finetune_arguments, run_finetune

    args = add_finetune_arguments(argparse.ArgumentParser()).parse_args(argv)
    return run_finetune(args)


def test_finetune_command_trains_evaluates_and_resumes(data_dir, tmp_path, capsys):
    from segevol_fast.adapters.io import read_adapter_file

    d = str(data_dir)
    common = [
        "--image",
        f"{d}/ct_abdomen_sm.nii.gz",
        "--label",
        f"{d}/ct_abdomen_sm_labels.nii.gz",
        "--label-map",
        f"{d}/labels.json",
        "--label-map-key",
        "ct",
        "--modality",
        "ct",
        "--eval-image",
        f"{d}/ct_abdomen_sm.nii.gz",
        "--eval-label",
        f"{d}/ct_abdomen_sm_labels.nii.gz",
        "--random-weights",
        "--config",
        "tiny",
        "--tokenizer",
        f"{d}/clip_tokenizer",
        "--batch-size",
        "1",
        "--categories-per-image",
        "2",
        "--lora-rank",
        "2",
        "--mixes",
        "text",
        "box",
        "-q",
        "--out",
        str(tmp_path),
    ]
    assert _cli(common + ["--steps", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and set(summary["eval"]) >= {"dice_text", "dice_box", "dice_jittered_box"}
    tensors, meta = read_adapter_file(tmp_path / "adapter_default.safetensors")
    assert meta["config"]["rank"] == 2 and tensors
    assert _cli(common + ["--steps", "3", "--resume", str(tmp_path / "checkpoint_0000002.pt")]) == 0
    steps = [json.loads(x)["step"] for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (tmp_path / "checkpoint_0000003.pt").is_file()


@pytest.mark.parametrize(
    "argv, match",
    [
        ([], "nothing to train on"),
        (["--image", "a.nii.gz"], "pairs"),
        (["--image", "a.nii.gz", "--label", "b.nii.gz", "--label-map", "x.json"], "modality"),
        (["--image", "a.nii.gz", "--label", "b.nii.gz", "--modality", "ct"], "label-map"),
        (["--image", "a.nii.gz", "--label", "b.nii.gz", "--modality", "ct", "--steps", "0"], "steps"),
    ],
)
def test_finetune_command_usage_errors(argv, match, tmp_path):
    from segevol_fast.errors import UsageError

    with pytest.raises(UsageError, match=match):
        _cli(argv + ["--random-weights", "--config", "tiny", "--out", str(tmp_path)])


def test_finetune_command_label_map_key_errors(data_dir, tmp_path):
    from segevol_fast.errors import UsageError

    d = str(data_dir)
    base = [
        "--image",
        f"{d}/ct_abdomen_sm.nii.gz",
        "--label",
        f"{d}/ct_abdomen_sm_labels.nii.gz",
        "--modality",
        "ct",
        "--random-weights",
        "--config",
        "tiny",
        "--out",
        str(tmp_path),
        "--label-map",
        f"{d}/labels.json",
    ]
    with pytest.raises(UsageError, match="label-map-key"):
        _cli(base)
    with pytest.raises(UsageError, match="no key"):
        _cli(base + ["--label-map-key", "pet"])


def test_loader_workers_do_not_change_the_run(cases, mixed_train):
    cfg = {
        "steps": 2,
        "batch_size": 2,
        "categories_per_image": 1,
        "seed": int(torch.randint(0, 10_000, ())),
        "mixes": ("box",),
    }
    rows = []
    for workers in (0, 1):
        tr = Trainer(_model(cases), TrainConfig(**cfg, workers=workers), mixed_train)
        rows.append([{k: v for k, v in r.items() if k != "step_time"} for r in tr.fit(progress=False)])
    assert rows[0] == rows[1]


def test_text_mixes_need_a_tokenizer(cases, ct_eval):
    model = _model(cases)
    model.tokenizer = None
    with pytest.raises(InvalidArgumentError, match="tokenizer"):
        Trainer(model, TrainConfig(steps=1, batch_size=1), ct_eval)
    rows = Trainer(
        model, TrainConfig(steps=1, batch_size=1, mixes=("box", "points"), categories_per_image=1), ct_eval
    ).fit(progress=False)
    assert math.isfinite(rows[0]["loss"])


def test_explicit_params_train_only_those(cases, ct_eval):
    model = _model(cases)
    head = list(model.mask_decoder.parameters())
    before = _params(model)
    tr = Trainer(model, TrainConfig(steps=1, batch_size=1, lr=1e-2, categories_per_image=2), ct_eval, params=head)
    tr.fit(progress=False)
    head_names = {n for n, p in model.named_parameters() if any(p is q for q in head)}
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= head_names
    assert all(p.requires_grad == (n in head_names) for n, p in model.named_parameters())
    with pytest.raises(InvalidArgumentError, match="not parameters"):
        Trainer(model, TrainConfig(steps=1, batch_size=1), ct_eval, params=[torch.nn.Parameter(torch.zeros(2))])


def test_finetune_command_full_from_saved_weights(data_dir, tmp_path, capsys):
    base = _model({"tokenizer": data_dir / "clip_tokenizer"}, seed=3)
    base.save_pretrained(tmp_path / "base")
    d = str(data_dir)
    out = tmp_path / "run"
    assert (
        _cli(
            [
                "--image",
                f"{d}/ct_abdomen_sm.nii.gz",
                "--label",
                f"{d}/ct_abdomen_sm_labels.nii.gz",
                "--label-map",
                f"{d}/labels.json",
                "--label-map-key",
                "ct",
                "--modality",
                "ct",
                "--weights",
                str(tmp_path / "base"),
                "--method",
                "full",
                "--steps",
                "1",
                "--batch-size",
                "1",
                "--categories-per-image",
                "1",
                "--lr",
                "1e-2",
                "-q",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    tuned = SegVol.from_pretrained(out / "model")
    old, new = dict(base.named_parameters()), dict(tuned.named_parameters())
    assert set(old) == set(new)
    assert not torch.equal(old["mask_decoder.output_upscaling.0.weight"], new["mask_decoder.output_upscaling.0.weight"])
    # the frozen CLIP tower stays as it was
    assert all(torch.equal(p, new[n]) for n, p in old.items() if n.startswith("text_encoder.clip_text_model"))
