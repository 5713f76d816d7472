"""`segevol-fast segment` and `demo` with a stand-in for segment() (the model is real, tiny and random)."""

from __future__ import annotations

import json
import sys
import types

import nibabel as nib
import numpy as np
import pytest
import torch

from segevol_fast import cli
from segevol_fast.cli.common import build_model
from segevol_fast.cli.segment import run_segment
from segevol_fast.errors import PromptError
from segevol_fast.inference.result import SegmentationResult
from segevol_fast.io import save_nifti

SHAPE = (24, 20, 10)


@pytest.fixture
def fake_segment(monkeypatch):
    """Install a fake `segevol_fast.inference.segment` module; returns the list of its calls."""
    calls = []

    def segment(
        model,
        volume,
        text=None,
        box=None,
        points=None,
        point_labels=None,
        coords="voxel",
        modality=None,
        mode="fast",
        zoom_in=True,
        max_memory=None,
        device=None,
        progress=True,
        return_probabilities=False,
        precision="auto",
        **kwargs,
    ):  # **kwargs: keywords segment() gains later (series=...) pass
        calls.append(
            dict(
                model=model,
                volume=volume,
                text=text,
                box=box,
                points=points,
                point_labels=point_labels,
                coords=coords,
                modality=modality,
                mode=mode,
                zoom_in=zoom_in,
                max_memory=max_memory,
                device=device,
                progress=progress,
                return_probabilities=return_probabilities,
                precision=precision,
                **kwargs,
            )
        )
        if text:
            labels = list(text)
        elif box is not None:
            labels = [f"box {i}" for i in range(len(np.atleast_2d(box)))]
        else:
            labels = ["points"]
        masks = {}
        for n, label in enumerate(labels):
            m = np.zeros(volume.shape, bool)
            m[n : n + 4, 2:6, 1:3] = True
            masks[label] = m
        probs = {k: v.astype(np.float32) for k, v in masks.items()} if return_probabilities else None
        return SegmentationResult(
            masks,
            volume.affine,
            modality=modality,
            probabilities=probs,
            timings={"total": 0.01},
            peak_memory_bytes=2**20,
            mode=mode,
        )

    monkeypatch.setitem(sys.modules, "segevol_fast.inference.segment", types.SimpleNamespace(segment=segment))
    return calls


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """No weights, no tokenizer, no shared data anywhere the CLI looks."""
    for var in ("SEGEVOL_WEIGHTS", "HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SEGEVOL_DATA", str(tmp_path / "nodata"))
    return tmp_path


@pytest.fixture
def ct(tmp_path):
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    aff[:3, 3] = (-20, 10, 5)
    arr = np.random.default_rng(0).integers(-1000, 400, SHAPE).astype(np.int16)
    return save_nifti(tmp_path / "scan.nii.gz", arr, aff)


def test_parse_size():
    assert cli.parse_size("2GB") == 2 * 10**9
    assert cli.parse_size("1.5GiB") == int(1.5 * 2**30)
    assert cli.parse_size("512mb") == 512 * 10**6
    assert cli.parse_size("1000") == 1000
    with pytest.raises(Exception, match="memory size"):
        cli.parse_size("lots")


def test_segment_arguments_parse():
    args = cli.build_parser().parse_args(
        [
            "segment",
            "x.nii.gz",
            "--text",
            "liver",
            "left kidney",
            "--box",
            "1",
            "2",
            "3",
            "4",
            "5",
            "6",
            "--box",
            "0",
            "0",
            "0",
            "9",
            "9",
            "9",
            "--points",
            "1",
            "2",
            "3",
            "--points",
            "4",
            "5",
            "6",
            "--point-labels",
            "1",
            "0",
            "--coords",
            "world",
            "--modality",
            "mri",
            "--max-memory",
            "2GB",
            "--mode",
            "exact",
            "--no-zoom-in",
            "--preview",
            "--probabilities",
            "--device",
            "cpu",
            "--precision",
            "bf16",
        ]
    )
    assert args.text == ["liver", "left kidney"] and args.precision == "bf16"
    assert args.box == [[1, 2, 3, 4, 5, 6], [0, 0, 0, 9, 9, 9]] and args.points == [[1, 2, 3], [4, 5, 6]]
    assert args.point_labels == [1, 0] and args.coords == "world" and args.modality == "mri"
    assert args.max_memory == 2 * 10**9 and args.mode == "exact" and args.no_zoom_in
    assert args.preview and args.probabilities and args.func is run_segment
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["segment", "x", "--box", "1", "2", "3"])


def test_segment_end_to_end_random_weights(ct, tmp_path, fake_segment, no_weights, capsys):
    out = tmp_path / "out"
    rc = cli.main(
        [
            "segment",
            str(ct),
            "--box",
            "1",
            "2",
            "1",
            "8",
            "9",
            "5",
            "--box",
            "3",
            "3",
            "2",
            "9",
            "9",
            "6",
            "--points",
            "4",
            "4",
            "3",
            "--point-labels",
            "1",
            "--random-weights",
            "--config",
            "tiny",
            "--out",
            str(out),
            "--max-memory",
            "1GB",
            "--no-zoom-in",
            "--preview",
            "--probabilities",
            "--device",
            "cpu",
            "-q",
            "--precision",
            "fp16",
        ]
    )
    assert rc == 0
    (call,) = fake_segment
    assert call["precision"] == "fp16"
    assert call["box"].shape == (2, 6) and call["points"].shape == (1, 3) and call["point_labels"].tolist() == [1]
    assert (
        call["max_memory"] == 10**9 and call["zoom_in"] is False and not call["progress"]
    )  # -q: a display that draws nothing
    assert call["return_probabilities"] and call["device"] == "cpu" and call["mode"] == "fast"
    assert call["model"].config.hidden_size == 32  # the tiny config
    assert call["volume"].shape == SHAPE
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "box_0.nii.gz",
        "box_0_prob.nii.gz",
        "box_1.nii.gz",
        "box_1_prob.nii.gz",
        "label_map.nii.gz",
        "preview.png",
        "summary.json",
    ]
    assert np.allclose(nib.load(out / "box_0.nii.gz").affine, nib.load(ct).affine)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["notes"] == [cli.RANDOM_NOTE]
    captured = capsys.readouterr()
    assert "RANDOM WEIGHTS" in captured.err and "MEANINGLESS" in captured.err
    assert "box 0" in captured.out and " mL" in captured.out
    assert "peak memory" in captured.out and "time:" in captured.out


def test_segment_single_label_map_and_default_out(ct, tmp_path, fake_segment, no_weights, monkeypatch, capsys):
    out = tmp_path / "labels.nii.gz"
    assert (
        cli.main(
            [
                "segment",
                str(ct),
                "--points",
                "4",
                "4",
                "3",
                "--random-weights",
                "--config",
                "tiny",
                "--out",
                str(out),
                "--preview",
                "-q",
            ]
        )
        == 0
    )
    assert out.is_file() and (tmp_path / "labels.json").is_file() and (tmp_path / "labels.png").is_file()
    assert json.loads((tmp_path / "labels.json").read_text())["labels"] == {"1": "points"}
    monkeypatch.chdir(tmp_path)
    assert cli.main(["segment", str(ct), "--points", "4", "4", "3", "--random-weights", "--config", "tiny", "-q"]) == 0
    assert (tmp_path / "segevol_out" / "scan" / "summary.json").is_file()


def test_segment_text_with_tokenizer(ct, tmp_path, fake_segment, no_weights, data_dir):
    rc = cli.main(
        [
            "segment",
            str(ct),
            "--text",
            "liver",
            "left kidney",
            "--random-weights",
            "--config",
            "tiny",
            "--tokenizer",
            str(data_dir / "clip_tokenizer"),
            "--out",
            str(tmp_path / "o"),
            "-q",
        ]
    )
    assert rc == 0
    assert fake_segment[0]["text"] == ["liver", "left kidney"]
    assert (tmp_path / "o" / "left_kidney.nii.gz").is_file()


def test_text_without_tokenizer_is_a_usage_error(ct, fake_segment, no_weights, capsys):
    assert cli.main(["segment", str(ct), "--text", "liver", "--random-weights", "--config", "tiny", "-q"]) == 2
    assert "tokenizer" in capsys.readouterr().err and fake_segment == []


def test_missing_weights_exit_2_with_how_to(ct, fake_segment, no_weights, capsys):
    assert cli.main(["segment", str(ct), "--text", "liver"]) == 2
    err = capsys.readouterr().err
    assert "BAAI/SegVol" in err and "SEGEVOL_WEIGHTS=" in err and "--weights" in err and "SegVol_v1.pth" in err
    assert fake_segment == []


def test_usage_and_run_errors(ct, tmp_path, fake_segment, no_weights, monkeypatch, capsys):
    assert cli.main(["segment", str(ct), "--random-weights"]) == 2  # no prompt
    assert "at least one prompt" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "segment",
                str(tmp_path / "nope.nii.gz"),
                "--points",
                "1",
                "1",
                "1",
                "--random-weights",
                "--config",
                "tiny",
            ]
        )
        == 1
    )  # unreadable input
    assert "no such" in capsys.readouterr().err

    def bad(*a, **k):
        raise PromptError("box corner lies outside the volume")

    monkeypatch.setitem(sys.modules, "segevol_fast.inference.segment", types.SimpleNamespace(segment=bad))
    assert cli.main(["segment", str(ct), "--points", "99", "1", "1", "--random-weights", "--config", "tiny", "-q"]) == 1
    assert "outside the volume" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_gpu_is_a_usage_error(ct, fake_segment, no_weights, capsys):
    assert cli.main(["segment", str(ct), "--points", "1", "1", "1", "--random-weights", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_demo_on_the_phantom_with_box_fallback(tmp_path, fake_segment, no_weights, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--device", "cpu", "-q"]) == 0
    (call,) = fake_segment
    assert call["text"] is None and call["box"].shape == (4, 6)  # no tokenizer anywhere: ground-truth boxes
    assert call["model"].config.hidden_size == 32  # tiny unless --full
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"] == ["liver", "spleen", "left kidney", "right kidney"]
    assert summary["notes"] == [cli.RANDOM_NOTE]
    assert (out / "preview.png").is_file() and (out / "left_kidney.nii.gz").is_file()
    captured = capsys.readouterr()
    assert "synthetic phantom" in captured.out and "Dice" in captured.out and "peak memory" in captured.out
    assert "RANDOM WEIGHTS" in captured.err


def test_demo_on_the_shared_ct_uses_text(tmp_path, fake_segment, no_weights, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("SEGEVOL_DATA", str(data_dir))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--device", "cpu", "-q"]) == 0
    assert fake_segment[0]["text"] == ["liver", "spleen", "left kidney", "right kidney"]
    assert fake_segment[0]["volume"].shape == (122, 101, 30)
    assert "real CT" in capsys.readouterr().out
    assert (out / "summary.json").is_file()


def test_demo_without_segevol_data_runs_on_the_phantom_and_names_the_variable(
    tmp_path, fake_segment, no_weights, monkeypatch, capsys
):
    """An installed command line has no data folder of its own: without $SEGEVOL_DATA it looks
    nowhere else (not beside the package, where a source checkout keeps ../shared/data)."""
    monkeypatch.delenv("SEGEVOL_DATA")
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu", "-q"]) == 0
    out = capsys.readouterr().out
    assert "synthetic phantom" in out and "set SEGEVOL_DATA to a folder holding ct_abdomen_sm.nii.gz" in out
    assert fake_segment[0]["volume"].shape != (122, 101, 30)  # not the shared CT, though it exists


def test_demo_explicit_bad_weights_is_an_error(tmp_path, fake_segment, no_weights, capsys):
    assert cli.main(["demo", "--weights", str(tmp_path / "missing"), "--out", str(tmp_path / "d")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------- adapters, cohorts, warnings
def test_adapter_file_is_applied(ct, tmp_path, no_weights, capsys):
    from tests.inference.test_cohort import save_test_lora

    lora = save_test_lora(build_model(None, "tiny", None, "cpu"), tmp_path / "lora.safetensors")
    base = [
        "segment",
        str(ct),
        "--box",
        "1",
        "2",
        "1",
        "20",
        "17",
        "8",
        "--random-weights",
        "--config",
        "tiny",
        "--no-zoom-in",
        "--device",
        "cpu",
        "-q",
        "--probabilities",
    ]
    assert cli.main([*base, "--out", str(tmp_path / "with"), "--adapter", str(lora)]) == 0
    assert cli.main([*base, "--out", str(tmp_path / "without")]) == 0
    summary = json.loads((tmp_path / "with" / "summary.json").read_text())
    assert summary["adapter"] == "liver_lora" and f"adapter 'liver_lora' loaded from {lora}" in summary["notes"]
    prob = {n: np.asarray(nib.load(tmp_path / n / "box_0_prob.nii.gz").dataobj) for n in ("with", "without")}
    assert not np.array_equal(prob["with"], prob["without"])
    capsys.readouterr()
    assert cli.main([*base, "--out", str(tmp_path / "x"), "--adapter", str(tmp_path / "nope.safetensors")]) == 2
    assert "--adapter" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_cohort_manifest_row_with_an_adapter_file(ct, tmp_path, no_weights):
    from segevol_fast.inference.cohort import SUMMARY, iter_rows
    from tests.inference.test_cohort import save_test_lora

    save_test_lora(build_model(None, "tiny", None, "cpu"), tmp_path / "lora.safetensors")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"input,name,adapter\n{ct.name},with,lora.safetensors\n{ct.name},without,\n")
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "segment",
                str(manifest),
                "--box",
                "1",
                "2",
                "1",
                "20",
                "17",
                "8",
                "--random-weights",
                "--config",
                "tiny",
                "--no-zoom-in",
                "--device",
                "cpu",
                "-q",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert [r["adapter"] for r in iter_rows(out / SUMMARY)] == ["liver_lora", "as set on the model"]


def test_cohort_checks_the_tokenizer_before_the_first_scan(ct, tmp_path, fake_segment, no_weights, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"input,text,box\n{ct.name},,1 2 1 8 9 5\n{ct.name},liver,\n")
    out = tmp_path / "out"
    argv = ["segment", str(manifest), "--random-weights", "--config", "tiny", "-q", "--out", str(out)]
    assert cli.main(argv) == 2  # no tokenizer anywhere, and a row has text
    assert "text prompts need the CLIP tokenizer" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main([*argv, "--tokenizer", str(tmp_path / "empty")]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert fake_segment == [] and not out.exists()


def test_warnings_print_as_one_line(ct, tmp_path, data_dir, no_weights, capsys):
    import warnings

    before = warnings.showwarning
    assert (
        cli.main(
            [
                "segment",
                str(ct),
                "--text",
                "liverr",
                "--random-weights",
                "--config",
                "tiny",
                "--tokenizer",
                str(data_dir / "clip_tokenizer"),
                "--no-zoom-in",
                "--device",
                "cpu",
                "-q",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    shown = [line for line in err.splitlines() if "warning" in line.lower()]
    assert [line for line in shown if "liverr" in line] == [
        line for line in shown if line.startswith("segevol-fast segment: warning: text prompt(s) 'liverr'")
    ]
    assert len(shown) == 2 and all(line.startswith("segevol-fast segment: warning: ") for line in shown), err
    assert any("masks are meaningless" in line for line in shown)  # the other: segment()'s random-weights one
    assert "warnings.warn" not in err and "VocabularyWarning" not in err and ".py:" not in err
    assert warnings.showwarning is before  # the one-line form is the command line's only


def _save_trained_priors(model, path):
    """Context priors with every parameter moved off its initial value (so they change the output)."""
    import torch

    from segevol_fast import adapters

    adapters.add_context_priors(model, "pri", adapters.ContextPriorConfig(tasks=("liver",), ffn_dim=8))
    with torch.no_grad():
        for p in adapters.adapter_parameters(model, "pri"):
            p.normal_(0.0, 0.5)
    adapters.save_adapter(model, "pri", path)
    return path


@pytest.mark.parametrize("cohort", [False, True])
def test_context_priors_file_applies_to_the_whole_run(ct, tmp_path, no_weights, cohort):
    """`--adapter priors.safetensors` attaches the priors for every scan of the run (they are not
    chosen per call); a box alone reaches them through their no-task prior."""
    priors = _save_trained_priors(build_model(None, "tiny", None, "cpu"), tmp_path / "priors.safetensors")
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "ct.nii.gz").symlink_to(ct)
    source = folder if cohort else folder / "ct.nii.gz"
    base = [
        "segment",
        str(source),
        *("--box", "1", "2", "1", "20", "17", "8"),
        *("--random-weights", "--config", "tiny", "--no-zoom-in", "--device", "cpu", "-q", "--probabilities"),
    ]
    for name, extra in (("with", ["--adapter", str(priors)]), ("without", [])):
        assert cli.main([*base, "--out", str(tmp_path / name), *extra]) == 0
    where = "ct/" if cohort else ""
    summary = json.loads((tmp_path / "with" / f"{where}summary.json").read_text())
    if not cohort:
        assert f"adapter 'pri' loaded from {priors}" in summary["notes"]
    prob = {n: np.asarray(nib.load(tmp_path / n / f"{where}box_0_prob.nii.gz").dataobj) for n in ("with", "without")}
    assert not np.array_equal(prob["with"], prob["without"])


def test_approximation_flags_reach_segment(ct, tmp_path, fake_segment, no_weights):
    base = ["segment", str(ct), "--points", "4", "4", "3", "--random-weights", "--config", "tiny", "-q"]
    runs = [
        ([], "default"),
        (["--approximations", "none", "--overlap", "0.25"], "none"),
        (["--overlap", "0.25", "--no-skip-empty"], {"overlap": 0.25, "skip_empty": False}),
        (["--no-token-subset"], {"token_subset": False}),
    ]
    for i, (flags, expected) in enumerate(runs):
        assert cli.main([*base, "--out", str(tmp_path / f"o{i}"), *flags]) == 0
        assert fake_segment[-1]["approximations"] == expected
