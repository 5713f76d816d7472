"""The mixture's learned router: the same input for an image in training and inference, alone or
in a batch; a resumed run routes like an uninterrupted one; the task loss reaches the router when
an image takes the identity expert; it learns which expert each kind of input needs; files of the
earlier router layout are refused with their reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.adapters import BottleneckConfig, LoraConfig, MixtureConfig
from segevol_fast.adapters.io import read_adapter_file, save_adapter_file
from segevol_fast.errors import CheckpointError
from segevol_fast.train.trainer import TrainConfig, Trainer
from tests.train import test_trainer

pytestmark = pytest.mark.usefixtures("one_thread")
cases, mixed_train = test_trainer.cases, test_trainer.mixed_train  # fixtures: CT, MR, CT at the tiny size
QV = ("image_encoder.blocks.*.attn.qkv:q,v", "mask_decoder.transformer.layers.*.self_attn.q_proj")
EXPERT_OUTPUTS = ("lora_B", "up.")  # zero at the start: what makes a new expert the identity


def _model(tokenizer, routing: str = "top1", kind: str = "lora", expert_std: float = 0.0, seed: int = 0) -> SegVol:
    """A tiny base with a two-expert mixture, the same for a given seed; expert_std > 0 gives the
    experts nonzero outputs (as some training would; they start as the identity)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SegVol(SegVolConfig.tiny(), tokenizer=tokenizer).eval()
        expert = {"lora": LoraConfig(rank=4, targets=QV)} if kind == "lora" else {"bottleneck": BottleneckConfig(dim=8)}
        adapters.add_mixture(model, "moa", MixtureConfig(experts=("a", "b"), routing=routing, kind=kind, **expert))
        if expert_std:
            with torch.no_grad():
                for e in ("moa/a", "moa/b"):
                    for _, m in adapters.adapter_modules(model, e):
                        for name, p in m.named_parameters():
                            if any(name.startswith(k) or f".{k}" in name for k in EXPERT_OUTPUTS):
                                p.normal_(0, expert_std)
    return model


def _shuffle_router(model) -> None:
    """Random router weights, large enough that the images of a batch go different ways."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for p in model.mixture_routers["moa"].proj.parameters():
            p.normal_(0, 1.0)


def _images(model, n: int, seed: int) -> torch.Tensor:
    """n images of different brightness and texture."""
    g = torch.Generator().manual_seed(seed)
    brightness = torch.linspace(0.2, 1.0, n).view(n, 1, 1, 1, 1)
    return brightness * torch.rand(n, 1, *model.config.spatial_size, generator=g)


def _choices(r: adapters.Route) -> list[int]:
    """Expert per row, -1 the identity (a training route's gates are the one-hot choice)."""
    if r.index is not None:
        return r.index.tolist()
    return [int(g.argmax()) if float(g.max()) > 0.5 else -1 for g in r.gates.detach()]


# ------------------------------------------------------------------------------ same input
def test_an_image_gets_the_same_router_probabilities_in_training_and_inference_alone_or_batched(data_dir):
    model = _model(data_dir / "clip_tokenizer", routing="soft")  # soft gates are the router's probabilities
    _shuffle_router(model)
    x = _images(model, 4, seed=1)

    def probs(images, training):
        model.train(training)
        with torch.set_grad_enabled(training):
            return adapters.route_for(model, "moa", images=images).gates.detach()

    for pair in (x[:2], x[2:], x[1:3]):  # training-mode calls leave nothing behind that changes the next
        trained = probs(pair, True)
        assert torch.equal(trained, probs(pair, False))
        for i in range(2):
            alone = probs(pair[i : i + 1], True)
            assert torch.equal(alone, probs(pair[i : i + 1], False))
            torch.testing.assert_close(alone[0], trained[i], rtol=1e-5, atol=1e-6)


def test_an_image_takes_the_same_expert_in_training_and_inference_alone_or_batched(data_dir):
    model = _model(data_dir / "clip_tokenizer")
    _shuffle_router(model)
    x = _images(model, 4, seed=2)
    from segevol_fast.adapters.router import scan_features

    with torch.no_grad():  # centred on these images and no bias: they split between the experts
        model.mixture_routers["moa"].centre.copy_(scan_features(x, model.image_encoder.patch_embedding).mean(0))
        model.mixture_routers["moa"].proj.bias.zero_()
    model.train()
    trained = _choices(adapters.route_for(model, "moa", images=x))
    assert len(set(trained)) > 1  # the batch is split: which way each image goes is tested
    model.eval()
    with torch.no_grad():
        assert _choices(adapters.route_for(model, "moa", images=x)) == trained
        assert [_choices(adapters.route_for(model, "moa", images=x[i : i + 1]))[0] for i in range(4)] == trained


# ------------------------------------------------------------------------------ resume
def test_a_resumed_run_routes_like_an_uninterrupted_one(data_dir, mixed_train, tmp_path):
    def mixture_model():  # experts already off zero, so that the task loss reaches the router at once
        return _model(data_dir / "clip_tokenizer", routing="soft", expert_std=0.05)

    cfg = {"steps": 4, "batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "categories_per_image": 1, "seed": 3}
    straight = Trainer(mixture_model(), TrainConfig(**cfg, out_dir=str(tmp_path / "a")), mixed_train)
    straight.fit(progress=False)
    first = Trainer(mixture_model(), TrainConfig(**cfg, out_dir=str(tmp_path / "b")), mixed_train)
    first.fit(progress=False, until=2)
    ckpt = first.save_checkpoint(tmp_path / "b" / "mid.pt")
    resumed_model = mixture_model()
    Trainer(resumed_model, TrainConfig(**cfg, out_dir=str(tmp_path / "b")), mixed_train).resume(ckpt).fit(
        progress=False
    )
    x = torch.stack([mixed_train[i]["image"] for i in range(2)])
    with torch.no_grad():
        want = adapters.route_for(straight.model.eval(), "moa", images=x).gates
        got = adapters.route_for(resumed_model.eval(), "moa", images=x).gates
        fresh = adapters.route_for(mixture_model(), "moa", images=x).gates
    assert not torch.equal(want, fresh)  # the router trained: the comparison below means something
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------ identity gradient
@pytest.mark.parametrize("kind", ["lora", "bottleneck"])
def test_the_router_learns_from_an_image_routed_to_the_identity(data_dir, kind):
    model = _model(data_dir / "clip_tokenizer", kind=kind, expert_std=0.3)
    router = model.mixture_routers["moa"]
    with torch.no_grad():
        router.proj.bias.copy_(torch.tensor([20.0, 0.0, 0.0]))  # every image takes the identity
    x = _images(model, 2, seed=4)
    with torch.no_grad():
        base = model.encode_image(x)
    r = adapters.route_for(model, "moa", images=x)
    assert _choices(r) == [-1, -1]
    with adapters.route(r):
        out = model.encode_image(x)
    assert torch.equal(out, base)  # the identity expert is the base model, in training too
    F.mse_loss(out, torch.zeros_like(out)).backward()  # the task loss alone, no balancing loss
    assert router.proj.weight.grad is not None and router.proj.weight.grad.abs().sum() > 0
    assert router.proj.bias.grad[0] != 0  # in particular on the identity's own logit


@pytest.mark.parametrize("kind", ["lora", "bottleneck"])
def test_training_routes_start_as_the_base_model(data_dir, kind):
    """Step 0 with autograd on (straight-through gates) is still the base model, bit for bit."""
    model = _model(data_dir / "clip_tokenizer", kind=kind)
    _shuffle_router(model)  # some images to an expert, some to the identity
    x = _images(model, 4, seed=5)
    with torch.no_grad():
        base = model.encode_image(x)
    r = adapters.route_for(model, "moa", images=x)
    assert r.gates is not None and r.gates.requires_grad
    with adapters.route(r):
        assert torch.equal(model.encode_image(x), base)


# ------------------------------------------------------------------------------ it learns
def test_the_router_learns_which_expert_each_kind_of_input_needs(data_dir):
    """Two kinds of input (darker, brighter), the first served by expert a's output and the
    second by b's (the experts are fixed; only the router trains): after 30 steps the router sends
    each kind to its expert (3 choices with the identity: chance is 1/3)."""
    model = _model(data_dir / "clip_tokenizer", expert_std=0.3)
    router = model.mixture_routers["moa"]
    g = torch.Generator().manual_seed(0)

    def batch(n):
        kind = torch.arange(n) % 2
        x = 0.25 + 0.4 * kind.view(-1, 1, 1, 1, 1) + 0.1 * torch.rand(n, 1, *model.config.spatial_size, generator=g)
        return x, kind

    def wanted(x, kind):
        with torch.no_grad():
            outs = []
            for e in (0, 1):
                with adapters.route(["moa/a", "moa/b"], index=[e] * len(x)):
                    outs.append(model.encode_image(x))
        return torch.stack(outs)[kind, torch.arange(len(x))]

    test_x, test_kind = batch(16)
    opt = torch.optim.Adam(router.parameters(), lr=2e-2)
    for _ in range(30):
        x, kind = batch(6)
        target = wanted(x, kind)
        with adapters.route(adapters.route_for(model, "moa", images=x)):
            loss = F.mse_loss(model.encode_image(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        chosen = adapters.route_for(model, "moa", images=test_x).index
    accuracy = float((chosen == test_kind).float().mean())
    assert accuracy >= 0.9, chosen.tolist()


# ------------------------------------------------------------------------------ files
def test_a_file_of_the_earlier_router_layout_is_refused_with_its_reason(data_dir, tmp_path):
    model = _model(data_dir / "clip_tokenizer")
    path = adapters.save_adapter(model, "moa", tmp_path / "moa.safetensors")
    tensors, meta = read_adapter_file(path)
    hidden = model.config.hidden_size
    del tensors["mixture_routers.moa.centre"]
    tensors["mixture_routers.moa.running_mean"] = torch.zeros(hidden)
    tensors["mixture_routers.moa.running_var"] = torch.ones(hidden)
    tensors["mixture_routers.moa.batches_seen"] = torch.tensor(3)
    save_adapter_file(tmp_path / "old.safetensors", tensors, meta)
    fresh = SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer")
    fresh.load_state_dict(adapters.base_state_dict(model))
    with pytest.raises(CheckpointError, match="running batch statistics"):
        adapters.load_adapter(fresh, tmp_path / "old.safetensors")
    assert not adapters.adapter_names(fresh)  # nothing half-attached
    assert adapters.load_adapter(fresh, path) == "moa"
