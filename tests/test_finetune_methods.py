"""`segevol-fast finetune --method ...`: every method trains one step on the tiny model, and what it
writes loads back (an adapter file onto the same base weights, or the whole model)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from segevol_fast import adapters, cli
from segevol_fast.adapters.io import read_adapter_file
from segevol_fast.cli.finetune import add_finetune_arguments, run_finetune
from segevol_fast.errors import UsageError
from segevol_fast.model import SegVolConfig, SegVolNetwork
from segevol_fast.train.cases import segvol_name

CONFIGS = {
    "lora": adapters.LoraConfig,
    "bottleneck": adapters.BottleneckConfig,
    "mixture": adapters.MixtureConfig,
    "context_prior": adapters.ContextPriorConfig,
    "rotation_branch": adapters.RotationBranchConfig,
}
ATTACH = {
    "lora": adapters.add_lora,
    "bottleneck": adapters.add_bottleneck,
    "mixture": adapters.add_mixture,
    "context_prior": adapters.add_context_priors,
    "rotation_branch": adapters.add_rotation_branch,
}


def _argv(data_dir, out, *extra: str) -> list[str]:
    d = str(data_dir)
    case = f"--image {d}/mr_abdomen_sm.nii.gz --label {d}/mr_abdomen_sm_labels.nii.gz --modality mri"
    labels = f"--label-map {d}/labels.json --label-map-key mr"
    model = f"--random-weights --config tiny --tokenizer {d}/clip_tokenizer"
    steps = "--batch-size 1 --categories-per-image 2 --mixes text box --steps 1 --device cpu -q"
    return ["finetune", *f"{case} {labels} {model} {steps}".split(), "--out", str(out), *extra]


def _tiny() -> SegVolNetwork:
    """The base model finetune --random-weights --config tiny starts from (--model-seed 0)."""
    torch.manual_seed(0)
    return SegVolNetwork(SegVolConfig.tiny())


def _zero_tensors(path) -> int:
    tensors, _ = read_adapter_file(path)
    return sum(1 for t in tensors.values() if not t.any())


def _finetune(data_dir, out, capsys, *extra: str) -> dict:
    assert cli.main(_argv(data_dir, out, *extra)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 1 and np.isfinite(summary["last_loss"])
    return summary


@pytest.mark.parametrize(
    "method, extra, kind",
    [
        ("lora", ["--lora-rank", "2"], "lora"),
        ("bottleneck", ["--bottleneck-dim", "8"], "bottleneck"),
        ("mixture", ["--lora-rank", "2"], "mixture"),
        ("mixture", ["--expert-kind", "bottleneck", "--experts", "a", "b", "--routing", "top1"], "mixture"),
        ("priors", [], "context_prior"),
        (
            "rotation",
            ["--rotation-group", "box", "--rotation-features", "4", "--rotation-deg", "30"],
            "rotation_branch",
        ),
    ],
    ids=["lora", "bottleneck", "mixture-tag-lora", "mixture-top1-bottleneck", "priors", "rotation"],
)
def test_each_adapter_method_trains_and_loads_back(data_dir, tmp_path, capsys, method, extra, kind):
    summary = _finetune(data_dir, tmp_path, capsys, "--method", method, *extra)
    path = tmp_path / "adapter_default.safetensors"
    assert summary["result"] == str(path)
    _, meta = read_adapter_file(path)
    assert meta["kind"] == kind

    model = _tiny()
    assert adapters.load_adapter(model, path) == "default"
    assert "default" in adapters.adapter_names(model)

    # trained: zero-initialised tensors (LoRA B, up-projections, prior outputs) moved off zero
    fresh = _tiny()
    ATTACH[kind](fresh, "default", CONFIGS[kind].from_dict(meta["config"]))
    adapters.save_adapter(fresh, "default", tmp_path / "fresh.safetensors")
    assert _zero_tensors(path) < _zero_tensors(tmp_path / "fresh.safetensors")


def test_lora_defaults_are_segevolutions(data_dir, tmp_path, capsys):
    """r 16, alpha 16, rsLoRA: SegEVOLution's training runs; --no-rslora turns the scaling off."""
    _finetune(data_dir, tmp_path / "default", capsys)
    _, meta = read_adapter_file(tmp_path / "default" / "adapter_default.safetensors")
    assert meta["kind"] == "lora"
    assert {k: meta["config"][k] for k in ("rank", "alpha", "rslora")} == {"rank": 16, "alpha": 16.0, "rslora": True}
    args = cli.build_parser().parse_args(_argv(data_dir, tmp_path, "--no-rslora"))
    assert args.rslora is False


def test_bottleneck_layout_flag_reaches_the_adapter(data_dir, tmp_path, capsys):
    """--bottleneck-layout msa: Medical SAM Adapter's layout, recorded in the file; stream by default."""
    _finetune(
        data_dir, tmp_path, capsys, "--method", "bottleneck", "--bottleneck-dim", "8", "--bottleneck-layout", "msa"
    )
    _, meta = read_adapter_file(tmp_path / "adapter_default.safetensors")
    assert meta["config"]["layout"] == "msa"
    model = _tiny()
    adapters.load_adapter(model, tmp_path / "adapter_default.safetensors")
    assert all(b.on_attn_out is not None and b.after_attn is None for b in model.image_encoder.blocks)
    assert cli.build_parser().parse_args(_argv(data_dir, tmp_path)).bottleneck_layout is None


def test_mixture_defaults_to_segevolutions_switch(data_dir, tmp_path, capsys):
    """CT keeps the base model (the identity expert), MRI goes to the one expert."""
    _finetune(data_dir, tmp_path, capsys, "--method", "mixture", "--lora-rank", "2")
    _, meta = read_adapter_file(tmp_path / "adapter_default.safetensors")
    config = meta["config"]
    assert config["experts"] == ["mri"] and config["routing"] == "tag"
    assert config["tags"] == {"ct": "identity", "mri": "mri"}


def test_priors_tasks_come_from_the_label_map(data_dir, tmp_path, capsys):
    _finetune(data_dir, tmp_path, capsys, "--method", "priors", "--priors-variant", "hermes")
    _, meta = read_adapter_file(tmp_path / "adapter_default.safetensors")
    names = json.loads((data_dir / "labels.json").read_text())["mr"].values()
    assert meta["config"]["tasks"] == [segvol_name(n) for n in names]
    assert meta["config"]["variant"] == "hermes"


def test_full_fine_tuning_writes_a_model(data_dir, tmp_path, capsys):
    from segevol_fast import SegVol

    summary = _finetune(data_dir, tmp_path, capsys, "--method", "full")
    assert summary["result"] == str(tmp_path / "model")
    model = SegVol.from_pretrained(tmp_path / "model")
    assert not adapters.adapter_names(model)


def test_the_written_adapter_runs_in_segment(data_dir, tmp_path, capsys):
    """finetune's --random-weights --config tiny base is segment's: the file attaches with --adapter."""
    _finetune(data_dir, tmp_path, capsys, "--method", "mixture", "--lora-rank", "2")
    scan = str(data_dir / "mr_abdomen_sm.nii.gz")
    run = "--box 10 10 2 40 40 15 --modality mri --random-weights --config tiny --no-zoom-in --device cpu -q".split()
    adapter = str(tmp_path / "adapter_default.safetensors")
    argv = ["segment", scan, *run, "--adapter", adapter, "--out", str(tmp_path / "seg")]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "seg" / "summary.json").read_text())
    assert summary["adapter"].startswith("default")


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--method", "mixture", "--tag", "mri"], "MODALITY=EXPERT"),
        (["--method", "mixture", "--tag", "pet=mri"], "modality must be"),
        (["--method", "mixture", "--tag", "ct=mri"], "no --tag for modality 'mri'"),
        (["--method", "mixture", "--tag", "mri=nobody"], "unknown experts"),
        (["--method", "priors", "--tasks", "liver"], "--tasks has no"),
        (["--method", "bottleneck", "--bottleneck-dim", "0"], "positive"),
    ],
)
def test_method_flags_that_make_no_adapter_are_usage_errors(data_dir, tmp_path, capsys, extra, match):
    assert cli.main(_argv(data_dir, tmp_path, *extra)) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert match in err, err


def test_method_errors_are_usage_errors_from_the_module_too(data_dir, tmp_path):
    args = add_finetune_arguments(argparse.ArgumentParser()).parse_args(
        _argv(data_dir, tmp_path, "--method", "mixture", "--tag", "x")[1:]
    )
    with pytest.raises(UsageError, match="MODALITY=EXPERT"):
        run_finetune(args)
