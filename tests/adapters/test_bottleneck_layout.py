"""The "msa" bottleneck layout (Medical SAM Adapter's: the space adapter on the attention output,
before the attention's residual add): identity at step 0 in segment(), the layout recorded in
files (files without one load as "stream"), and tag-routed mixtures of msa-layout experts. Its
formula is tested beside the default layout's in test_bottleneck_mixture.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.adapters import BottleneckConfig, MixtureConfig
from segevol_fast.adapters.io import read_adapter_file, save_adapter_file
from segevol_fast.adapters.manage import entry_of
from segevol_fast.errors import AdapterError

pytestmark = pytest.mark.usefixtures("one_thread")
BOX = (30, 25, 8, 80, 70, 20)  # voxel indices of the shared CT (122 x 101 x 30)


def _x(model, n):
    return torch.rand(n, 1, *model.config.spatial_size)


def _perturb(model, name, std=0.3):
    """Give adapter `name` nonzero up-projections (as training would)."""
    with torch.no_grad():
        for _, m in adapters.adapter_modules(model, name):
            m.up.weight.normal_(0, std)
            m.up.bias.normal_(0, std)


def _probabilities(model, volume, mode):
    res = model.segment(volume, box=BOX, mode=mode, return_probabilities=True, progress=False)
    (probs,) = res.probabilities.values()
    return probs


@pytest.mark.parametrize("mode", ("fast", "exact"))
def test_fresh_msa_layout_leaves_segment_exactly_the_base(tiny_model, ct, mode):
    base = _probabilities(tiny_model, ct, mode)
    adapters.add_bottleneck(tiny_model, "msa", BottleneckConfig(dim=8, layout="msa"))
    assert np.array_equal(_probabilities(tiny_model, ct, mode), base)
    _perturb(tiny_model, "msa")
    assert not np.array_equal(_probabilities(tiny_model, ct, mode), base)


def test_layout_is_saved_and_files_without_it_load_as_stream(tiny_model, tmp_path, data_dir):
    model = tiny_model
    x = _x(model, 1)
    for layout in ("msa", "stream"):
        adapters.add_bottleneck(model, layout, BottleneckConfig(dim=8, blocks=(1,), layout=layout))
        _perturb(model, layout)
    fresh = SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer").eval()
    fresh.load_state_dict(adapters.base_state_dict(model))
    for layout in ("msa", "stream"):
        path = adapters.save_adapter(model, layout, tmp_path / f"{layout}.safetensors")
        assert read_adapter_file(path)[1]["config"]["layout"] == layout
        adapters.load_adapter(fresh, path)
        adapters.set_active(model, layout)
        adapters.set_active(fresh, layout)
        with torch.no_grad():
            assert torch.equal(fresh.encode_image(x), model.encode_image(x))
    # a file written before layouts existed: its config has no "layout" key
    tensors, meta = read_adapter_file(tmp_path / "stream.safetensors")
    del meta["config"]["layout"]
    save_adapter_file(tmp_path / "old.safetensors", tensors, meta)
    assert "layout" not in json.dumps(read_adapter_file(tmp_path / "old.safetensors")[1]["config"])
    adapters.remove_adapter(fresh, "stream")
    adapters.load_adapter(fresh, tmp_path / "old.safetensors")
    assert entry_of(fresh, "stream").config.layout == "stream"
    assert fresh.image_encoder.blocks[1].after_attn is not None
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(x), model.encode_image(x))
    with pytest.raises(AdapterError, match="layout"):
        BottleneckConfig(layout="depth")


def test_tag_mixture_of_msa_layout_experts(tiny_model):
    model = tiny_model
    cfg = MixtureConfig(
        experts=("mr", "pet"),
        kind="bottleneck",
        routing="tag",
        tags={"ct": "identity", "mri": "mr", "pet": "pet"},
        bottleneck=BottleneckConfig(dim=8, layout="msa"),
    )
    names = adapters.add_mixture(model, "moa", cfg)
    assert all(
        p.rsplit(".", 1)[1] in ("on_attn_out", "beside_mlp")
        for n in names
        for p, _ in adapters.adapter_modules(model, n)
    )
    x = _x(model, 3)
    modalities = ["ct", "mri", "pet"]
    with torch.no_grad():
        base = model.encode_image(x)
        with adapters.route(adapters.route_for(model, "moa", modalities=modalities)):
            assert torch.equal(model.encode_image(x), base)  # every expert starts at zero
    with adapters.route(adapters.route_for(model, "moa", modalities=modalities)):
        model.encode_image(x).square().mean().backward()
    for n in names:
        ups = [m.up.weight.grad for p, m in adapters.adapter_modules(model, n) if p.endswith(".on_attn_out")]
        assert ups and all(g is not None and g.abs().sum() > 0 for g in ups)  # the loss reaches each expert
    _perturb(model, "moa/mr")
    with torch.no_grad():
        adapters.set_active(model, "moa/mr")
        alone = model.encode_image(x)
        adapters.set_active(model, None)
        with adapters.route(adapters.route_for(model, "moa", modalities=modalities)):
            routed = model.encode_image(x)
    assert torch.equal(routed[0], base[0])  # CT stays the base model exactly
    torch.testing.assert_close(routed[1], alone[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(routed[1], base[1])
