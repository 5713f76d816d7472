"""Mixtures of adapters under gradient checkpointing: the backward pass recomputes the encoder
blocks after the route's `with` block has ended, and must still see the route, giving the
gradients of a run without checkpointing (tag, top-1 and soft routing; LoRA and bottleneck
experts)."""

from __future__ import annotations

import pytest
import torch

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.adapters import BottleneckConfig, LoraConfig, MixtureConfig

pytestmark = pytest.mark.usefixtures("one_thread")

MODALITIES = ["mri", "ct", "mri"]  # with tags: expert "mr", the identity, "mr"
TAGS = {"ct": "identity", "mri": "mr"}


def _model(kind: str, routing: str) -> SegVol:
    """The same model, experts and router for a given (kind, routing), whatever ran before."""
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = SegVol(SegVolConfig.tiny()).train()
        config = MixtureConfig(
            experts=("mr", "other"),
            kind=kind,
            routing=routing,
            tags=TAGS,
            lora=LoraConfig(
                rank=4, targets=("image_encoder.blocks.*.attn.qkv:q,v", "image_encoder.blocks.*.mlp.linear2")
            ),
            bottleneck=BottleneckConfig(dim=4),
        )
        adapters.add_mixture(model, "moa", config)
        with torch.no_grad():
            for p in adapters.adapter_parameters(model):
                p.normal_(0.0, 0.05)  # trained-looking experts: every expert tensor gets gradients
        return model


def _inputs(model):
    g = torch.Generator().manual_seed(11)
    x = torch.rand(len(MODALITIES), 1, *model.config.spatial_size, generator=g)
    box = torch.tensor([[1.0, 2.0, 3.0, 20.0, 40.0, 40.0]])
    return x, box


def _gradients(kind: str, routing: str, checkpointing: bool) -> tuple[dict, torch.Tensor]:
    """Gradients of a trainer-like step: encode under the route, decode each image under its row,
    backward after every `with` block has ended (as `Trainer.train_step` does)."""
    model = _model(kind, routing)
    model.image_encoder.gradient_checkpointing = checkpointing
    x, box = _inputs(model)
    route = adapters.batch_route(model, x, MODALITIES)
    with adapters.prompt_context(modalities=MODALITIES), adapters.route(route):
        emb = model.encode_image(x)
    loss = emb.float().square().mean()
    for i, modality in enumerate(MODALITIES):
        with adapters.prompt_context(modalities=[modality]), adapters.route(route.row(i)):
            loss = loss + model.decode(emb[i : i + 1], boxes=box, upsample=False).float().sigmoid().mean()
    aux = adapters.aux_loss(model)
    if aux is not None:
        loss = loss + aux
    loss.backward()
    names = {id(p): n for n, p in model.named_parameters()}
    grads = {names[id(p)]: p.grad for p in adapters.adapter_parameters(model) if p.grad is not None}
    return grads, route.index if route.index is not None else route.gates.detach()


@pytest.mark.parametrize("kind", ("lora", "bottleneck"))
@pytest.mark.parametrize("routing", ("tag", "top1", "soft"))
def test_checkpointed_mixture_gives_the_gradients_of_a_plain_run(kind, routing):
    plain, route = _gradients(kind, routing, checkpointing=False)
    recomputed, same_route = _gradients(kind, routing, checkpointing=True)
    assert torch.equal(route, same_route)
    if routing == "tag":
        assert route.tolist() == [0, -1, 0]
    assert any(n.startswith("image_encoder.blocks.") and g.abs().sum() > 0 for n, g in plain.items())
    if routing != "tag":  # the router learns through the straight-through gate / the soft gates
        assert any(n.startswith("mixture_routers.") and g.abs().sum() > 0 for n, g in plain.items())
    assert plain.keys() == recomputed.keys()
    for name, g in plain.items():
        torch.testing.assert_close(recomputed[name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", ("lora", "bottleneck"))
def test_trainer_with_checkpointing_trains_a_mixture_like_without(data_dir, kind):
    import json

    from segevol_fast.train.cases import cases_from_files
    from segevol_fast.train.datasets import SegmentationDataset
    from segevol_fast.train.loader import collate_samples
    from segevol_fast.train.trainer import TrainConfig, Trainer

    lm = json.loads((data_dir / "labels.json").read_text())
    pairs = [("ct_abdomen_sm", "ct", "ct"), ("mr_abdomen_sm", "mr", "mri")]
    cases = [
        c
        for stem, key, modality in pairs
        for c in cases_from_files(
            [(data_dir / f"{stem}.nii.gz", data_dir / f"{stem}_labels.nii.gz")], lm[key], modality, stem
        )
    ]
    ds = SegmentationDataset(cases, SegVolConfig.tiny().spatial_size, train=False)
    batch = collate_samples([ds[0], ds[1]])  # a CT (identity) and an MR (expert "mr")

    def step(checkpointing: bool) -> dict:
        model = _model(kind, "tag")
        config = TrainConfig(
            steps=1, batch_size=2, categories_per_image=2, mixes=("box", "points"), grad_checkpointing=checkpointing
        )
        tr = Trainer(model, config, ds, params=adapters.adapter_parameters(model))
        tr.backward(batch)
        return {n: p.grad for n, p in zip(tr.param_names, tr.params) if p.grad is not None}

    plain, recomputed = step(False), step(True)
    assert any(g.abs().sum() > 0 for g in plain.values())
    assert plain.keys() == recomputed.keys()
    for name, g in plain.items():
        torch.testing.assert_close(recomputed[name], g, rtol=1e-5, atol=1e-7, msg=name)
