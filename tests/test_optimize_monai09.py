"""`optimize` on the model the official SegVol code builds: its image encoder is MONAI 0.9.0's ViT
(the release that code pins), whose SABlock and PatchEmbeddingBlock name their attributes
differently from MONAI 1.x.

MONAI 0.9.0 cannot share the test environment with the current MONAI, so `make` installs it
beside the virtual environment (`pip install --no-deps --target $(VENV)/monai-0.9.0`) and this
file runs itself in a child process with that folder first on PYTHONPATH. The child builds the
official encoder, optimizes it, checks the numerics and prints what happened; the test checks the
report. Run as a script it is that child.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
# Where `make` installs MONAI 0.9.0: beside the packages of the interpreter running the tests.
MONAI09 = pathlib.Path(sys.prefix).resolve() / "monai-0.9.0"
MARK = "@@OPTIMIZE-MONAI09@@"
# The official encoder's arguments (build_sam.py), on a smaller window for speed: 4x4x4 tokens.
IMG, PATCH = (16, 64, 64), (4, 16, 16)
OFFICIAL_VIT = dict(
    in_channels=1,
    img_size=IMG,
    patch_size=PATCH,
    hidden_size=768,
    mlp_dim=3072,
    num_layers=12,
    num_heads=12,
    pos_embed="perceptron",
    classification=False,
    dropout_rate=0.0,
)


# ---------------------------------------------------------------------------- the child process
@contextlib.contextmanager
def _recording_ops():
    """The name of every op called inside the block."""
    from segevol_fast.ops import _backend

    calls, real = [], _backend.implementation

    def recording(op, device_type):
        calls.append(op)
        return real(op, device_type)

    _backend.implementation = recording
    try:
        yield calls
    finally:
        _backend.implementation = real


def _report(report) -> dict:
    return {
        "replaced": [[s.path, s.kind, s.replacement] for s in report.replaced],
        "left_alone": [[s.path, s.kind, s.reason] for s in report.left_alone],
    }


def _official_model():
    """Same module structure as the official SegVol's encoder path (`model.image_encoder` = ViT)."""
    import torch
    from monai.networks.nets import ViT

    model = torch.nn.Module()
    model.image_encoder = ViT(**OFFICIAL_VIT).eval()
    with torch.no_grad():  # move LayerNorm affines and biases off their 1 / 0 initial values
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _check_official_encoder(out: dict) -> None:
    import copy

    import torch

    from segevol_fast import optimize
    from tests.numerics import assert_matches_reference

    model = _official_model()
    exact_model = copy.deepcopy(model).double()
    x = torch.rand(2, 1, *IMG)
    with torch.no_grad(), _recording_ops() as calls:
        before = model.image_encoder(x)[0]
        exact = exact_model.image_encoder(x.double())[0]
        report = optimize(model)
        after = model.image_encoder(x)[0]
    assert_matches_reference(after, before, exact, "official encoder on MONAI 0.9.0")
    out["encoder"] = _report(report) | {"ops": sorted(set(calls)), "max_abs_diff": (after - before).abs().max().item()}


def _check_dropout_in_training(out: dict) -> None:
    """MONAI 0.9.0 keeps the attention dropout rate in `drop_weights` alone (no `dropout_rate`)."""
    import copy

    import torch
    from monai.networks.blocks.selfattention import SABlock

    from segevol_fast import optimize

    block = SABlock(64, 4, dropout_rate=0.2).train()
    original = copy.deepcopy(block)
    report = optimize(block)
    x = torch.randn(2, 9, 64)
    with _recording_ops() as in_training:
        torch.manual_seed(5)
        got = block(x)
        torch.manual_seed(5)
        same_draws = torch.equal(got, original(x))
    with torch.no_grad(), _recording_ops() as in_eval:
        block.eval()(x)
    out["dropout"] = _report(report) | {
        "same_draws_in_training": same_draws,
        "ops_in_training": in_training,
        "ops_in_eval": in_eval,
    }


def _check_conv_projection(out: dict) -> None:
    import torch
    from monai.networks.blocks import PatchEmbeddingBlock

    from segevol_fast import optimize

    block = PatchEmbeddingBlock(1, IMG, PATCH, 64, 4, pos_embed="conv").eval()
    report = optimize(block)
    with torch.no_grad():
        tokens = block(torch.rand(1, 1, *IMG))
    out["conv"] = _report(report) | {"shape": list(tokens.shape)}


def child() -> None:
    import monai
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = {"monai": monai.__version__, "monai_file": monai.__file__}
    _check_official_encoder(out)
    _check_dropout_in_training(out)
    _check_conv_projection(out)
    print(MARK + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------- the test
def _require_monai09() -> None:
    import pytest

    if (MONAI09 / "monai" / "__init__.py").is_file():
        return
    how = f"`make build` installs it, or: {sys.executable} -m pip install --no-deps --target {MONAI09} monai==0.9.0"
    # `make test` (which sets SEGEVOL_FAST_REQUIRE_NATIVE=1) and CI must run this test, not skip it.
    if os.environ.get("SEGEVOL_FAST_REQUIRE_NATIVE") == "1" or os.environ.get("CI"):
        pytest.fail(f"MONAI 0.9.0 is not installed at {MONAI09}; {how}")
    pytest.skip(f"MONAI 0.9.0 is not installed at {MONAI09}; {how}")


def _run_child() -> dict:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(MONAI09), str(REPO), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    line = next((out for out in proc.stdout.splitlines() if out.startswith(MARK)), None)
    assert proc.returncode == 0 and line, (
        f"child failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return json.loads(line[len(MARK) :])


def test_official_segvol_encoder_on_monai_0_9():
    _require_monai09()
    out = _run_child()
    assert out["monai"] == "0.9.0" and pathlib.Path(out["monai_file"]).resolve().is_relative_to(MONAI09)

    enc = out["encoder"]
    assert sorted(map(tuple, enc["replaced"])) == sorted(
        [("image_encoder.patch_embedding", "monai.PatchEmbeddingBlock", "ops.patch_embed")]
        + [(f"image_encoder.blocks.{i}.attn", "monai.SABlock", "ops.flash_attention") for i in range(12)]
    )
    assert enc["left_alone"] == [] and enc["ops"] == ["flash_attention", "patch_embed"]

    drop = out["dropout"]  # swapped (training is a passing state), yet the original ran while training
    assert [r[1] for r in drop["replaced"]] == ["monai.SABlock"]
    assert drop["same_draws_in_training"] and drop["ops_in_training"] == []
    assert drop["ops_in_eval"] == ["flash_attention"]

    conv = out["conv"]
    assert conv["replaced"] == [] and conv["shape"] == [1, 64, 64]
    [(path, kind, reason)] = conv["left_alone"]
    assert kind == "monai.PatchEmbeddingBlock" and "'conv'" in reason


if __name__ == "__main__":
    child()
