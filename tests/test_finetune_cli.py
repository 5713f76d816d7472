"""`segevol-fast finetune`'s run flags: accumulation, validation by segment(), the best checkpoint,
early stopping and TensorBoard reach the trainer, bad values are usage errors (exit 2), the summary
says where the best validation's adapter is, and --export merged writes a plain model that loads
with `SegVol.from_pretrained` and segments as the adapted model (tiny model, a two-organ MR)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from segevol_fast import SegVol, SegVolConfig, adapters, cli
from segevol_fast.train.checkpoint import read_checkpoint

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:model weights are random"),
]

ORGANS = {"1": "spleen", "5": "liver"}


@pytest.fixture(scope="module")
def two_organs(data_dir, tmp_path_factory) -> list[str]:
    """The shared MR at half resolution in-plane with only its spleen and liver labelled, and their
    label map: a validation by segment() of two organs takes seconds."""
    out = tmp_path_factory.mktemp("two_organs")
    image, label = (nib.load(data_dir / n) for n in ("mr_abdomen_sm.nii.gz", "mr_abdomen_sm_labels.nii.gz"))
    image, label = image.slicer[::2, ::2, :], label.slicer[::2, ::2, :]
    ids = np.asarray(label.dataobj)
    kept = np.where(np.isin(ids, [int(k) for k in ORGANS]), ids, 0).astype(np.int16)
    nib.save(image, out / "mr.nii.gz")
    nib.save(nib.Nifti1Image(kept, label.affine), out / "mr_labels.nii.gz")
    (out / "labels.json").write_text(json.dumps(ORGANS))
    case = ["--image", str(out / "mr.nii.gz"), "--label", str(out / "mr_labels.nii.gz")]
    held_out = ["--eval-image", str(out / "mr.nii.gz"), "--eval-label", str(out / "mr_labels.nii.gz")]
    return [*case, *held_out, "--label-map", str(out / "labels.json"), "--modality", "mri"]


def _argv(two_organs, data_dir, out, *extra: str) -> list[str]:
    model = f"--random-weights --config tiny --tokenizer {data_dir}/clip_tokenizer --lora-rank 2"
    steps = "--batch-size 1 --categories-per-image 2 --mixes text box --steps 1 --device cpu -q"
    return ["finetune", *two_organs, *model.split(), *steps.split(), "--out", str(out), *extra]


def _run(argv, capsys) -> tuple[dict, list[str]]:
    """The command's exit must be 0; returns its JSON summary and the lines printed before it."""
    assert cli.main(argv) == 0
    *lines, last = capsys.readouterr().out.strip().splitlines()
    return json.loads(last), lines


def test_run_flags_reach_the_trainer_and_the_best_validation_is_reported(two_organs, data_dir, tmp_path, capsys):
    flags = (
        "--batch-size 2 --accumulate 2 --steps 4 --eval-every 1 --eval-mode segment --eval-prompts box point "
        "--eval-points 2 --no-eval-zoom-in --best-metric dice_box --patience 1 --min-delta 0.5 --tensorboard"
    )
    summary, lines = _run(_argv(two_organs, data_dir, tmp_path, *flags.split()), capsys)

    config = read_checkpoint(next(tmp_path.glob("checkpoint_*.pt")))["config"]
    expected = {
        "batch_size": 2,
        "accumulate": 2,
        "eval_mode": "segment",
        "eval_prompts": ["box", "point"],
        "eval_points": 2,
        "eval_zoom_in": False,
        "best_metric": "dice_box",
        "save_best": True,
        "patience": 1,
        "min_delta": 0.5,
        "tensorboard": True,
    }
    assert {k: config[k] for k in expected} == expected
    assert (tmp_path / "tensorboard").is_dir()

    # no Dice beats the first by 0.5: one validation more and the run stops, its best at step 1
    assert summary["steps"] == 2 and summary["stopped_early"] is True
    assert set(summary["eval"]) == {"step", "dice", "dice_box", "dice_point", "labels"}
    best = tmp_path / "best" / "adapter_default.safetensors"
    assert summary["best"] == {
        "step": 1,
        "metric": "dice_box",
        "value": json.loads((tmp_path / "best" / "best.json").read_text())["value"],
        "path": str(best),
    }
    assert best.is_file()
    assert lines[-1].startswith("best validation: dice_box ") and str(best) in lines[-1]
    assert "stopped early at step 2" in lines[-1]


def test_defaults_validate_resized_and_keep_the_best(two_organs, data_dir, tmp_path, capsys):
    summary, lines = _run(_argv(two_organs, data_dir, tmp_path, "--no-save-best"), capsys)
    assert set(summary["eval"]) >= {"dice_text", "dice_box", "dice_jittered_box"}
    assert summary["stopped_early"] is False
    assert summary["best"]["path"] is None and not (tmp_path / "best").exists()
    assert "not saved" in lines[-1] and "stopped early" not in lines[-1]
    config = read_checkpoint(tmp_path / "checkpoint_0000001.pt")["config"]
    assert (config["eval_mode"], config["accumulate"], config["patience"], config["tensorboard"]) == (
        "resized",
        1,
        0,
        False,
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--accumulate", "0"], "--accumulate: must be >= 1"),
        (["--accumulate", "x"], "--accumulate: expected an integer"),
        (["--eval-mode", "fast"], "--eval-mode: invalid choice"),
        (["--eval-prompts", "mask"], "--eval-prompts: invalid choice"),
        (["--eval-points", "0"], "--eval-points: must be >= 1"),
        (["--patience", "-1"], "--patience: must be >= 0"),
        (["--min-delta", "nan"], "--min-delta: must be a finite number >= 0"),
        (["--best-metric", "loss"], "--best-metric: invalid choice"),
        (["--export", "onnx"], "--export: invalid choice"),
    ],
)
def test_bad_values_are_argparse_errors(two_organs, data_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv(two_organs, data_dir, tmp_path, *extra))
    assert exc.value.code == cli.EXIT_USAGE
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eval-mode", "segment", "--eval-prompts", "jittered_box"], "jittered_box needs --eval-mode resized"),
        (["--eval-prompts", "point"], "point needs --eval-mode segment"),
        (["--eval-prompts", "box", "box"], "name each prompt type once"),
        (["--eval-prompts", "text", "--best-metric", "dice_box"], "--best-metric dice_box: that prompt type"),
        (["--batch-size", "4", "--accumulate", "3"], "multiple of accumulate"),
        (["--export", "merged", "--method", "bottleneck"], "--export merged needs --method lora"),
        (["--export", "merged", "--method", "full"], "already writes the whole model"),
    ],
)
def test_inconsistent_flags_are_usage_errors(two_organs, data_dir, tmp_path, capsys, extra, message):
    assert cli.main(_argv(two_organs, data_dir, tmp_path, *extra)) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "train_log.csv").exists()  # refused before any training


def test_export_merged_loads_as_a_plain_model_and_segments_as_the_adapted_one(two_organs, data_dir, tmp_path, capsys):
    summary, _ = _run(
        _argv(two_organs, data_dir, tmp_path, "--steps", "2", "--lr", "1e-2", "--export", "merged"), capsys
    )
    assert summary["merged"] == str(tmp_path / "merged")
    merged = SegVol.from_pretrained(tmp_path / "merged")
    assert not adapters.adapter_names(merged)

    torch.manual_seed(0)  # finetune --random-weights --config tiny's base (--model-seed 0)
    adapted = SegVol(SegVolConfig.tiny())
    base = SegVol(SegVolConfig.tiny())
    base.load_state_dict(adapted.state_dict())
    adapters.load_adapter(adapted, tmp_path / "adapter_default.safetensors")

    x = torch.rand(1, 1, *SegVolConfig.tiny().spatial_size, generator=torch.Generator().manual_seed(1))
    box = torch.tensor([[2.0, 10.0, 10.0, 20.0, 60.0, 60.0]])
    with torch.no_grad():
        out = {k: m.eval().decode(m.encode_image(x), boxes=box) for k, m in [("merged", merged), ("adapted", adapted)]}
        plain = base.eval().decode(base.encode_image(x), boxes=box)
    torch.testing.assert_close(out["merged"], out["adapted"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out["merged"], plain, rtol=1e-5, atol=1e-5)  # the training did change it
