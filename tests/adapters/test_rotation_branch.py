"""The rotation-robust patch branch: exactly the base model when fresh (embeddings and segment()),
features invariant under its rotation group, trainable with the base frozen (by hand and by the
Trainer with rotation augmentation), files, selection, routing, cache keys and config checks."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from segevol_fast import SegVol, SegVolConfig, adapters
from segevol_fast.adapters import RotationBranchConfig
from segevol_fast.adapters.rotation_branch import RotationBranch, rotate, rotation_group
from segevol_fast.errors import AdapterError
from segevol_fast.model import SegVolNetwork
from segevol_fast.model.seams import adapter_state
from segevol_fast.phantom import make_phantom
from segevol_fast.train.cases import cases_from_files
from segevol_fast.train.datasets import SegmentationDataset
from segevol_fast.train.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
BOX = (30, 25, 8, 80, 70, 20)  # voxel indices of the shared CT (122 x 101 x 30)


def _x(model, n):
    return torch.rand(n, 1, *model.config.spatial_size)


def _branch(model, name):
    ((_, branch),) = adapters.adapter_modules(model, name)
    return branch


def _open_gate(model, name, std=0.3):
    """Give branch `name` a non-zero gate (as training would)."""
    with torch.no_grad():
        _branch(model, name).gate.normal_(0, std)


def _encode(model, x):
    with torch.no_grad():
        return model.encode_image(x)


def _probabilities(model, volume):
    res = model.segment(volume, box=BOX, mode="fast", return_probabilities=True, progress=False)
    (probs,) = res.probabilities.values()
    return probs


# ---------------------------------------------------------------------------- step 0 is the base
@pytest.mark.parametrize("group", ("c4", "box"))
def test_fresh_branch_leaves_the_embeddings_exactly_the_base(tiny_model, group):
    x = _x(tiny_model, 2)
    base = _encode(tiny_model, x)
    adapters.add_rotation_branch(tiny_model, "rot", RotationBranchConfig(group=group, features=8))
    assert torch.equal(_encode(tiny_model, x), base)
    # the comparison sees a branch that adds anything at all
    _open_gate(tiny_model, "rot")
    assert not torch.equal(_encode(tiny_model, x), base)


@pytest.mark.slow  # the zoom-in's sliding windows: about 4 s per segment() on a 2-core CPU
def test_fresh_branch_leaves_segment_exactly_the_base(tiny_model, ct):
    base = _probabilities(tiny_model, ct)
    adapters.add_rotation_branch(tiny_model, "rot", RotationBranchConfig(group="box", features=8))
    assert np.array_equal(_probabilities(tiny_model, ct), base)


# ---------------------------------------------------------------------------- invariance
@pytest.mark.parametrize(
    "group, patch, order",
    [("c4", (4, 16, 16), 4), ("box", (4, 16, 16), 8), ("box", (4, 8, 8), 8), ("box", (4, 4, 4), 24)],
)
def test_pooled_features_are_the_same_for_every_rotation_of_the_patch(group, patch, order):
    branch = RotationBranch(patch, 16, RotationBranchConfig(group=group, features=6)).double()
    rotations = rotation_group(group, patch)
    assert len(rotations) == order and rotations[0].perm == (0, 1, 2) and not rotations[0].flips
    patches = torch.randn(3, 1, *patch, dtype=torch.float64)
    features = branch.invariant_features(patches)
    plain = branch.responses(patches)[:, :, 0]  # one orientation's responses, before pooling
    moved = 0
    for r in rotations:
        turned = rotate(patches, r)
        assert turned.shape == patches.shape
        torch.testing.assert_close(branch.invariant_features(turned), features, rtol=1e-12, atol=1e-12)
        moved += not torch.allclose(branch.responses(turned)[:, :, 0], plain)
    assert moved == order - 1, "every rotation but the identity changes the unpooled responses"


def test_the_groups_are_closed_under_composition():
    t = torch.randn(4, 8, 8)
    for group in ("c4", "box"):
        images = [rotate(t, r) for r in rotation_group(group, t.shape)]
        for a in images:
            for r in rotation_group(group, t.shape):
                assert any(torch.equal(rotate(a, r), b) for b in images)


@pytest.mark.parametrize("k", (1, 2, 3))
def test_turning_the_window_about_d_turns_the_branch_tokens_with_it(k):
    cfg = SegVolConfig.tiny()
    branch = RotationBranch(cfg.patch_size, cfg.hidden_size, RotationBranchConfig(group="c4", features=8))
    with torch.no_grad():
        branch.gate.normal_()
    x = torch.rand(2, 1, *cfg.spatial_size)
    with torch.no_grad():
        grid = branch(x).unflatten(1, cfg.grid_size)  # (B, gd, gh, gw, hidden)
        turned = branch(torch.rot90(x, k, dims=(3, 4))).unflatten(1, cfg.grid_size)
    # float32 convolutions sum the rotated patch in another order (more so on AVX2): ~1e-6 apart
    torch.testing.assert_close(turned, torch.rot90(grid, k, dims=(2, 3)), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(turned, grid, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- training
def test_one_step_opens_the_gate_and_leaves_the_base_frozen(tiny_model):
    model = tiny_model
    adapters.add_rotation_branch(model, "rot", RotationBranchConfig(features=8))
    base = {k: v.clone() for k, v in adapters.base_state_dict(model).items()}
    params = adapters.adapter_parameters(model, "rot")
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in adapters.base_parameters(model))
    branch = _branch(model, "rot")
    x = _x(model, 1)
    loss = (model.encode_image(x) - 1).square().mean()
    loss.backward()
    assert branch.gate.grad.abs().sum() > 0, "a zero gate still receives a gradient"
    torch.optim.SGD(params, lr=0.1).step()
    with torch.no_grad():
        assert branch(x).abs().sum() > 0
    after = adapters.base_state_dict(model)
    assert all(torch.equal(base[k], after[k]) for k in base)


def test_a_trainer_step_with_rotation_augmentation_trains_the_gate(tmp_path):
    volume, labels, names = make_phantom(shape=(40, 40, 16), spacing=(6.0, 6.0, 12.0))
    nib.save(nib.Nifti1Image(volume.array, volume.affine), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(labels, volume.affine), str(tmp_path / "lab.nii.gz"))
    cases = cases_from_files([(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")], names, "ct", "phantom")
    model = SegVolNetwork(SegVolConfig.tiny())
    adapters.add_rotation_branch(model, "rot", RotationBranchConfig(features=4))
    data = SegmentationDataset(cases, model.config.spatial_size, rotation_deg=30.0, seed=1)
    trainer = Trainer(model, TrainConfig(steps=1, batch_size=1, lr=1e-2, categories_per_image=1, mixes=("box",)), data)
    gate = _branch(model, "rot").gate
    assert set(trainer.param_names) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith(".gate") for n in trainer.param_names)
    (row,) = trainer.fit(progress=False)
    assert np.isfinite(row["loss"])
    assert gate.abs().sum() > 0


# ---------------------------------------------------------------------------- files and selection
def test_saved_branch_loads_back_to_the_same_outputs(tiny_model, tmp_path, data_dir):
    adapters.add_rotation_branch(tiny_model, "rot", RotationBranchConfig(group="box", features=8))
    _open_gate(tiny_model, "rot")
    path = adapters.save_adapter(tiny_model, "rot", tmp_path / "rot.safetensors")
    fresh = SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer").eval()
    fresh.load_state_dict(adapters.base_state_dict(tiny_model))
    assert adapters.load_adapter(fresh, path) == "rot"
    assert adapters.active_adapter(fresh) == "rot"
    x = _x(tiny_model, 2)
    assert torch.equal(_encode(fresh, x), _encode(tiny_model, x))
    with pytest.raises(AdapterError, match="merged"):
        adapters.merge(fresh, "rot")


def test_selection_and_removal_give_back_the_base(tiny_model):
    model = tiny_model
    x = _x(model, 2)
    base = _encode(model, x)
    for name in ("a", "b"):
        adapters.add_rotation_branch(model, name, RotationBranchConfig(features=4))
        _open_gate(model, name)
    with_b = _encode(model, x)
    assert not torch.equal(with_b, base)
    adapters.set_active(model, None)
    assert torch.equal(_encode(model, x), base)
    adapters.set_active(model, "a")
    assert not torch.equal(_encode(model, x), with_b)
    adapters.remove_adapter(model, "a")
    assert adapters.active_adapter(model) is None
    assert torch.equal(_encode(model, x), base)
    adapters.remove_adapter(model, "b")
    assert model.image_encoder.beside_patch_embed is None
    assert torch.equal(_encode(model, x), base)


def test_each_batch_row_takes_its_routed_branch(tiny_model):
    model = tiny_model
    x = _x(model, 3)
    base = _encode(model, x)
    alone = {}
    for name in ("a", "b"):
        adapters.add_rotation_branch(model, name, RotationBranchConfig(features=4))
        _open_gate(model, name)
        alone[name] = _encode(model, x)
    adapters.set_active(model, None)
    with adapters.route(["a", "b"], index=[1, -1, 0]):
        routed = _encode(model, x)
    torch.testing.assert_close(routed[0], alone["b"][0], rtol=1e-5, atol=1e-6)
    assert torch.equal(routed[1], base[1])
    torch.testing.assert_close(routed[2], alone["a"][2], rtol=1e-5, atol=1e-6)
    # one-hot gates are the same choice
    with adapters.route(["a", "b"], gates=torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])):
        torch.testing.assert_close(_encode(model, x), routed, rtol=1e-5, atol=1e-6)


def test_cache_key_follows_the_active_branch_and_the_route(tiny_model):
    encoder = tiny_model.image_encoder
    plain = adapter_state(encoder)
    for name in ("a", "b"):
        adapters.add_rotation_branch(tiny_model, name, RotationBranchConfig(features=4))
    keys = {}
    for name in ("a", "b", None):
        adapters.set_active(tiny_model, name)
        keys[name] = adapter_state(encoder)
    with adapters.route(["a", "b"], index=[0, 1]):
        keys["routed"] = adapter_state(encoder)
    assert len(set(keys.values())) == 4
    adapters.remove_adapter(tiny_model, "a")
    adapters.remove_adapter(tiny_model, "b")
    assert adapter_state(encoder) == plain


# ---------------------------------------------------------------------------- config checks
def test_config_round_trips_and_refuses_bad_values():
    config = RotationBranchConfig(group="box", features=12)
    assert RotationBranchConfig.from_dict(config.to_dict()) == config
    with pytest.raises(AdapterError, match="group"):
        RotationBranchConfig(group="so3")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(AdapterError, match="features"):
            RotationBranchConfig(features=bad)


def test_group_must_fit_the_models_patch():
    model = SegVolNetwork(SegVolConfig.tiny(patch_size=(4, 8, 16)))
    with pytest.raises(AdapterError, match="group='box'"):
        adapters.add_rotation_branch(model, "rot", RotationBranchConfig(group="c4"))
    assert adapters.adapter_names(model) == [] and model.image_encoder.beside_patch_embed is None
    # box: only the half turns map a 4 x 8 x 16 box onto itself
    adapters.add_rotation_branch(model, "rot", RotationBranchConfig(group="box"))
    assert len(_branch(model, "rot").rotations) == 4
