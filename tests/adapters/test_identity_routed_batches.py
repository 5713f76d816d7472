"""Training a tag-routed mixture on batches that reach no trained expert (every image routed to the
identity, e.g. an all-CT batch with bottleneck experts): the step runs, the gradients are exactly
zero for every trained parameter, the model stays the base model on CT, and under DDP a rank with
such a batch takes part in the gradient all-reduce like the others (2 gloo processes = 1 process)."""

from __future__ import annotations

import json

import pytest
import torch

from segevol_fast import SegVol, SegVolConfig, adapters, distributed
from segevol_fast.adapters import BottleneckConfig, LoraConfig, MixtureConfig
from segevol_fast.train.cases import cases_from_files
from segevol_fast.train.datasets import SegmentationDataset
from segevol_fast.train.loader import collate_samples
from segevol_fast.train.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = SegVolConfig.tiny().spatial_size
TAGS = {"ct": "identity", "mri": "mr"}
STEP = dict(categories_per_image=2, mixes=("box", "points", "box+points"), lr=1e-3)


def _dataset(data_dir) -> SegmentationDataset:
    """The shared CT (index 0) and MR (index 1), resized, no augmentation."""
    lm = json.loads((data_dir / "labels.json").read_text())
    ct = cases_from_files(
        [(data_dir / "ct_abdomen_sm.nii.gz", data_dir / "ct_abdomen_sm_labels.nii.gz")], lm["ct"], "ct", "ct_sm"
    )
    mr = cases_from_files(
        [(data_dir / "mr_abdomen_sm.nii.gz", data_dir / "mr_abdomen_sm_labels.nii.gz")], lm["mr"], "mri", "mr_sm"
    )
    ds = SegmentationDataset(ct + mr, SIZE, train=False)
    ds.preload()
    return ds


def _model(kind: str) -> SegVol:
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = SegVol(SegVolConfig.tiny())
        config = MixtureConfig(
            experts=("mr",), kind=kind, tags=TAGS, lora=LoraConfig(rank=4), bottleneck=BottleneckConfig(dim=4)
        )
        adapters.add_mixture(model, "moa", config)
        with torch.no_grad():  # a partly trained expert: its gradients are not trivially zero
            for p in adapters.adapter_parameters(model):
                p.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize("kind", ("bottleneck", "lora"))
def test_an_all_ct_batch_gives_every_trained_parameter_a_zero_gradient(data_dir, kind):
    ds = _dataset(data_dir)
    tr = Trainer(_model(kind), TrainConfig(steps=1, batch_size=1, **STEP), ds)
    parts, count = tr.backward(collate_samples([ds[0]]))
    assert count > 0 and torch.isfinite(parts).all()
    assert tr.params and all(p.grad is not None and not p.grad.any() for p in tr.params)


def test_fit_on_ct_alone_keeps_the_base_model_on_ct(data_dir):
    ds = _dataset(data_dir)
    ct_only = SegmentationDataset(ds.cases[:1], SIZE, train=False)
    model = _model("bottleneck")
    with torch.no_grad():  # an expert that starts at zero: the mixture is the base model
        for _, m in adapters.adapter_modules(model, "moa"):
            if hasattr(m, "up"):
                m.up.weight.zero_()
                m.up.bias.zero_()
    x = ds[0]["image"][None]
    with torch.no_grad():
        route = adapters.route_for(model, "moa", modalities=["ct"])
        with adapters.route(route):
            before = model.encode_image(x)
    rows = Trainer(model, TrainConfig(steps=3, batch_size=1, weight_decay=0.0, **STEP), ct_only).fit(progress=False)
    assert [r["grad_norm"] for r in rows] == [0.0, 0.0, 0.0]
    assert all(r["categories"] > 0 and r["loss"] == r["loss"] for r in rows)
    with torch.no_grad(), adapters.route(route):
        assert torch.equal(model.encode_image(x), before)


# ------------------------------------------------------------------------------ DDP
def _ddp_rank(rank: int, world: int, init: str, data_dir, out: str) -> None:
    """One gloo rank of a 2-image global batch [CT, MR]: rank 0 holds the CT, rank 1 the MR."""
    import faulthandler

    import torch.distributed as dist

    faulthandler.enable(all_threads=True)  # a rank killed by a signal prints its Python stacks first
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    clean = False
    try:
        ds = _dataset(data_dir)
        tr = Trainer(_model("bottleneck"), TrainConfig(steps=2, batch_size=2, **STEP), ds)
        tr.train_step(collate_samples([ds[rank]]))
        if rank == 0:
            torch.save({n: p.detach() for n, p in zip(tr.param_names, tr.params)}, out)
        clean = True
    finally:
        distributed.shutdown(clean)


@pytest.mark.slow
def test_two_ranks_one_with_only_ct_step_like_one_process(data_dir, tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    out = tmp_path / "rank0.pt"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # a failing rank makes spawn stop the other one and raise here, instead of a hang
    mp.spawn(_ddp_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", data_dir, str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)

    ds = _dataset(data_dir)
    tr = Trainer(_model("bottleneck"), TrainConfig(steps=2, batch_size=2, **STEP), ds)
    start = {n: p.detach().clone() for n, p in zip(tr.param_names, tr.params)}
    tr.train_step(collate_samples([ds[0], ds[1]]))
    one = {n: p.detach() for n, p in zip(tr.param_names, tr.params)}
    assert one.keys() == two.keys()
    assert any(not torch.equal(one[n], start[n]) for n in one)  # the MR image trained the expert
    for n in one:
        torch.testing.assert_close(two[n], one[n], rtol=1e-5, atol=1e-6, msg=n)
