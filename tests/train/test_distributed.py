"""DDP through torchrun: the environment, the single-process fallbacks, and a real 2-process gloo
run of `finetune` whose losses, gradient norms and trained weights match 1 process on the same
global batch."""

from __future__ import annotations

import json

import pytest
import torch

from segevol_fast import distributed
from segevol_fast.errors import InvalidArgumentError
from tests.launch import TORCHRUN_VARS, run_python

# 1 vs 2 processes differ only in float summation order (a batch of 2 encoded together vs two of
# 1; gloo's gradient sum): measured ~1e-8 relative over 3 steps, asserted with margin
LOSS_RTOL = 1e-5
# max gradient norm, far below the 0.2 to 0.7 measured here, so that clipping acts on every step
GRAD_CLIP = 0.01
LR = 1e-3
# trained weights after 3 steps: measured <= 4e-8 apart (1 vs 2 processes), while rank 0 stepping
# on its own share's gradient (no all-reduce) put them ~4e-3 apart: Adam moves a weight ~LR a step
WEIGHT_ATOL = 0.1 * LR


def _clear_torchrun_env(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_no_torchrun_environment_is_one_process(monkeypatch):
    _clear_torchrun_env(monkeypatch)
    env = distributed.init_from_env(device="cpu")
    assert tuple(env) == (0, 1, 0, torch.device("cpu"))
    assert not distributed.is_active() and distributed.is_main()
    t = torch.rand(3)
    assert torch.equal(distributed.all_reduce_sum(t.clone()), t)
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object("x") == "x"
    distributed.barrier()


def test_bad_torchrun_environment_is_refused(monkeypatch):
    _clear_torchrun_env(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(InvalidArgumentError, match="MASTER_ADDR"):
        distributed.init_from_env(device="cpu")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(InvalidArgumentError, match="RANK"):
        distributed.init_from_env(device="cpu")
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(InvalidArgumentError, match="integer"):
        distributed.init_from_env(device="cpu")


@pytest.mark.parametrize("clean", (True, False))
def test_shutdown_meets_the_other_ranks_only_on_a_clean_exit(tmp_path, monkeypatch, clean):
    """A clean shutdown passes a barrier before leaving the group (a rank exiting while gloo still
    frees a collective's tensors aborts); after an error it must not wait for ranks that may be
    gone."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier"))
    destroy = dist.destroy_process_group
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: (calls.append("destroy"), destroy(*a, **k)))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        distributed.all_reduce_sum(torch.ones(2))
        distributed.shutdown(clean)
    finally:
        if dist.is_initialized():
            destroy()
    assert calls == (["barrier", "destroy"] if clean else ["destroy"])
    assert not dist.is_initialized()
    distributed.shutdown()  # no group: nothing to do
    assert len(calls) == (2 if clean else 1)


def _finetune(out, data_dir, nproc: int, seed: int, cases: list[tuple], extra: tuple[str, ...] = ()) -> list[dict]:
    d = str(data_dir)
    args = [
        *(arg for image, label in cases for arg in ("--image", str(image), "--label", str(label))),
        "--label-map",
        f"{d}/labels.json",
        "--label-map-key",
        "ct",
        "--modality",
        "ct",
        "--random-weights",
        "--config",
        "tiny",
        "--tokenizer",
        f"{d}/clip_tokenizer",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--categories-per-image",
        "3",
        "--lora-rank",
        "4",
        "--lr",
        str(LR),
        "--seed",
        str(seed),
        "--device",
        "cpu",
        "-q",
        "--out",
        str(out),
        *extra,
    ]
    proc = run_python(["-m", "segevol_fast.cli.finetune"], args, nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture
def distinct_cases(data_dir, tmp_path) -> list[tuple]:
    """The shared CT cut into its caudal and cranial halves: two cases of different anatomy, so
    that the ranks' shares of a batch carry different gradients (identical shares would hide a
    missing gradient all-reduce)."""
    nib = pytest.importorskip("nibabel")
    image, label = (nib.load(data_dir / name) for name in ("ct_abdomen_sm.nii.gz", "ct_abdomen_sm_labels.nii.gz"))
    half = image.shape[2] // 2
    cases = []
    for part, cut in (("caudal", slice(None, half)), ("cranial", slice(half, None))):
        pair = []
        for kind, vol in (("image", image), ("labels", label)):
            path = tmp_path / f"ct_{part}_{kind}.nii.gz"
            nib.save(vol.slicer[:, :, cut], path)
            pair.append(path)
        cases.append(tuple(pair))
    return cases


def _trained(out) -> dict[str, torch.Tensor]:
    """The trained parameters in the run's final checkpoint, by name."""
    (path,) = out.glob("checkpoint_*.pt")
    return torch.load(path, map_location="cpu", weights_only=True)["trainable"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(data_dir, distinct_cases, tmp_path):
    """2 ranks, each on its half of the global batch, train exactly as 1 process on all of it."""
    seed = int(torch.randint(0, 10_000, ()))
    extra = ("--grad-clip", str(GRAD_CLIP))
    one = _finetune(tmp_path / "one", data_dir, 1, seed, distinct_cases, extra)
    two = _finetune(tmp_path / "two", data_dir, 2, seed, distinct_cases, extra)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert a["categories"] == b["categories"]  # the same samples and categories were trained
        assert a["lr"] == b["lr"]
        # the norm of the gradient the optimizer saw (before clipping): rank 0's gradient must be
        # the global batch's, neither its own share's (no all-reduce) nor a sum or half of it
        # (world-size factor); Adam and clipping would hide a constant factor from the weights
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=LOSS_RTOL), a["step"]
        assert a["grad_norm"] > GRAD_CLIP  # clipping acted on every step
        for key in ("loss", "bce", "dice"):
            assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL), (a["step"], key)
    # the training moved the loss: the comparison is not of three copies of the initial loss
    assert len({round(r["loss"], 6) for r in one}) == 3
    # only rank 0 wrote: one row per step, one checkpoint, one adapter
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    # and the weights it wrote are those of the one-process run: each Adam step moves a weight by
    # up to ~lr, so a gradient of another direction on rank 0 shows as differences of order lr
    one_w, two_w = _trained(tmp_path / "one"), _trained(tmp_path / "two")
    assert one_w.keys() == two_w.keys()
    for name, w in one_w.items():
        torch.testing.assert_close(two_w[name], w, rtol=0, atol=WEIGHT_ATOL, msg=name)
