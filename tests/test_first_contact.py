"""First contact: from_pretrained by Hugging Face name, one progress display with timings that include
loading, MRI and vocabulary warnings, and a demo that runs without the test stack."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from segevol_fast import SegVol, SegVolConfig, cli
from segevol_fast.errors import ModalityWarning, VocabularyWarning, WeightsNotFoundError
from segevol_fast.inference.progress import Progress, closing_displays
from segevol_fast.inference.segment import segment
from segevol_fast.io import load_volume
from segevol_fast.modality_hint import mr_name_token


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No weights anywhere: env cleared, HOME and the HF cache pointed at empty folders, cwd empty."""
    for var in ("SEGEVOL_WEIGHTS", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


def _saved_tiny(folder, seed):
    torch.manual_seed(seed)
    SegVol(SegVolConfig.tiny()).save_pretrained(folder)
    return folder


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---------------------------------------------------------------------- from_pretrained by name
@pytest.mark.parametrize("name", ["BAAI/SegVol", "SegVol", "baai/segvol"])
def test_from_pretrained_name_without_weights_says_how_to_get_them(clean_env, name):
    with pytest.raises(WeightsNotFoundError) as err:
        SegVol.from_pretrained(name)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert f"from_pretrained({name!r})" in msg and "$SEGEVOL_WEIGHTS is not set" in msg
    assert "models--BAAI--SegVol" in msg and "download=True" in msg
    assert "hf download BAAI/SegVol" in msg and "SegVol_v1.pth" in msg  # weights.HOW_TO


def test_from_pretrained_name_uses_segevol_weights(clean_env, monkeypatch):
    saved = _saved_tiny(clean_env / "w", seed=1)
    monkeypatch.setenv("SEGEVOL_WEIGHTS", str(saved))
    model = SegVol.from_pretrained("BAAI/SegVol")
    assert model.config.hidden_size == SegVolConfig.tiny().hidden_size
    assert model.weights_source is not None and "model.safetensors" in model.weights_source
    assert _same_weights(model, SegVol.from_pretrained(saved))


def test_from_pretrained_name_uses_the_hf_cache(clean_env, monkeypatch):
    hub = clean_env / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    repo = hub / "models--BAAI--SegVol"
    _saved_tiny(repo / "snapshots" / "rev1", seed=2)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("rev1")
    model = SegVol.from_pretrained("SegVol")
    assert str(repo / "snapshots" / "rev1") in model.weights_source


def test_a_local_folder_named_segvol_wins(clean_env, monkeypatch):
    monkeypatch.setenv("SEGEVOL_WEIGHTS", str(_saved_tiny(clean_env / "env", seed=3)))
    local = _saved_tiny(clean_env / "cwd" / "SegVol", seed=4)
    model = SegVol.from_pretrained("SegVol")
    assert _same_weights(model, SegVol.from_pretrained(local))
    assert not _same_weights(model, SegVol.from_pretrained(clean_env / "env"))


def test_cli_weights_by_name_without_weights_is_a_setup_error(clean_env, capsys, data_dir):
    rc = cli.main(
        [
            "segment",
            str(data_dir / "ct_abdomen_sm.nii.gz"),
            "--text",
            "liver",
            "--weights",
            "BAAI/SegVol",
            "--out",
            str(clean_env / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE
    assert "'BAAI/SegVol' (no such local path: taken as the Hugging Face name" in err and "hf download" in err
    assert not (clean_env / "out").exists()


# ---------------------------------------------------------------------- one progress display
def test_progress_stages_and_timings():
    out = io.StringIO()
    with Progress(file=out) as p:
        p.stage("load scan")
        p.stage("zoom-in windows", total=3, unit="win", key="zoom-in")
        for _ in range(3):
            p.update()
        assert p._bar.n == 3
        p.stage("zoom-in windows", total=2, key="zoom-in")  # a second prompt: same key, summed
        assert p._bar.n == 0 and p._bar.total == 2
    text = out.getvalue()
    assert "segevol load scan [" in text and "segevol zoom-in windows:   0%|" in text and "0/3 win" in text
    assert text.rstrip().endswith("segevol done in 0.0 s")
    assert list(p.timings) == ["load scan", "zoom-in"]
    assert 0 < sum(p.timings.values()) <= p.seconds
    p.close()  # twice is fine


def test_a_failed_run_closes_its_line_as_stopped():
    out = io.StringIO()
    with pytest.raises(RuntimeError), closing_displays():
        p = Progress(file=out)
        p.stage("zoom-out")
        raise RuntimeError("boom")
    assert p.closed and "stopped in" in out.getvalue() and out.getvalue().endswith("\n")


def test_warnings_print_above_the_display_not_into_it():
    # a fresh interpreter: pytest records warnings itself, and the display then leaves them alone
    script = textwrap.dedent("""
        import warnings
        from segevol_fast.inference.progress import Progress
        p = Progress()
        p.stage("preprocess")
        warnings.warn("hello from inside", UserWarning)
        p.close()
        assert warnings.showwarning is warnings._showwarning_orig  # restored
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [seg for line in proc.stderr.split("\n") for seg in line.split("\r")]
    (warning,) = [line for line in lines if "hello from inside" in line]
    assert warning.startswith("<string>:") and "segevol" not in warning
    assert "segevol done in" in proc.stderr


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_segment_reports_every_stage_into_one_display(tiny_model, data_dir, mode, one_thread):
    out = io.StringIO()
    display = Progress(file=out)
    display.stage("load model")  # what the CLI does before calling segment
    segment(tiny_model, data_dir / "mr_abdomen_sm.nii.gz", text="liver", modality="mri", mode=mode, progress=display)
    assert not display.closed  # its creator closes it
    display.close()
    assert list(display.timings) == ["load model", "load scan", "preprocess", "zoom-out", "zoom-in", "paste back"]
    text = out.getvalue()
    assert "zoom-in windows" in text and "win" in text and "done in" in text
    assert text.count("\n") <= 2, "one display: a single line that is redrawn, plus its final newline"


def test_segment_progress_false_draws_nothing(tiny_model, data_dir, capsys, one_thread):
    segment(tiny_model, data_dir / "ct_abdomen_sm.nii.gz", text="liver", zoom_in=False, progress=False)
    captured = capsys.readouterr()
    assert "segevol" not in captured.err and "%|" not in captured.err


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_segment_progress_true_draws_one_line_and_closes_it(tiny_model, data_dir, capsys, mode, one_thread):
    segment(tiny_model, data_dir / "mr_abdomen_sm.nii.gz", text="liver", modality="mri", mode=mode, progress=True)
    err = capsys.readouterr().err
    assert "segevol zoom-in windows" in err or "'liver': zoom-in windows" in err
    assert err.count("done in") >= 1 and err.rstrip("\n").split("\r")[-1].startswith("segevol done in")


def test_cli_timings_include_loading_and_saving(tmp_path, data_dir, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("SEGEVOL_DATA", str(data_dir))
    out = tmp_path / "out"
    rc = cli.main(
        [
            "segment",
            str(data_dir / "ct_abdomen_sm.nii.gz"),
            "--text",
            "liver",
            "--random-weights",
            "--config",
            "tiny",
            "--no-zoom-in",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    time_line = next(line for line in captured.out.splitlines() if line.startswith("time:"))
    total = float(re.match(r"time: ([0-9.]+) s \(", time_line).group(1))
    stages = {k.strip(): float(v) for k, v in re.findall(r"([a-z -]+?) ([0-9.]+) s[,)]", time_line.split("(", 1)[1])}
    assert list(stages) == ["load scan", "load model", "preprocess", "zoom-out", "paste back", "save"], time_line
    assert total >= stages["load scan"] + stages["load model"] > 0  # the total includes loading
    assert abs(sum(stages.values()) - total) <= 0.02 + 0.01 * len(stages)  # rounding of each printed term
    assert "segevol done in" in captured.err  # the display was drawn (no -q) and closed


# ---------------------------------------------------------------------- MRI and vocabulary warnings
@pytest.mark.parametrize(
    "name, token",
    [
        ("mr_abdomen_sm.nii.gz", "mr"),
        ("sub-01_T1w.nii.gz", "t1w"),
        ("case3_FLAIR.nii", "flair"),
        ("brain_t2.nii.gz", "t2"),
        ("ct_abdomen_sm.nii.gz", None),
        ("tumor_mrn.nii.gz", None),
        ("smri.nii.gz", None),
        (None, None),
    ],
)
def test_mr_name_tokens(name, token):
    assert mr_name_token(name and f"/data/{name}") == token


def test_mri_by_file_name_without_modality_warns(tiny_model, data_dir, one_thread):
    path = data_dir / "mr_abdomen_sm.nii.gz"
    with pytest.warns(ModalityWarning, match=r"looks like an MRI \(file name token 'mr'\).*--modality mri"):
        res = segment(tiny_model, path, text="liver", zoom_in=False, progress=False)
    assert res.modality == "ct"  # a warning, not a change: the documented default still applies
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModalityWarning)
        segment(tiny_model, path, text="liver", modality="mri", zoom_in=False, progress=False)
        segment(tiny_model, path, text="liver", modality="ct", zoom_in=False, progress=False)
        segment(tiny_model, path, box=[30, 20, 2, 80, 70, 15], zoom_in=False, progress=False)  # no text template


def test_dicom_header_modality_is_used_without_warning(tiny_model, data_dir, one_thread):
    vol = load_volume(data_dir / "ct_abdomen_dicom")
    mr = type(vol)(vol.array[::4, ::4], vol.affine, modality="mri", source="/x/mr_series")  # header said MR
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModalityWarning)
        res = segment(tiny_model, mr, text="liver", zoom_in=False, progress=False)
    assert res.modality == "mri"


def test_unknown_text_prompt_warns_but_runs(tiny_model, data_dir, one_thread):
    with pytest.warns(VocabularyWarning, match="'kidney_left' \\(closest known: 'kidney left'"):
        res = segment(
            tiny_model, data_dir / "ct_abdomen_sm.nii.gz", text=["liver", "kidney_left"], zoom_in=False, progress=False
        )
    assert list(res.masks) == ["liver", "kidney_left"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", VocabularyWarning)
        segment(
            tiny_model, data_dir / "ct_abdomen_sm.nii.gz", text=["Liver", "left kidney"], zoom_in=False, progress=False
        )


# ---------------------------------------------------------------------- runtime without the test stack
_BLOCKED = ("monai", "transformers", "einops", "pytest", "hypothesis")


@pytest.mark.slow
def test_demo_and_segment_run_without_the_test_stack(tmp_path, data_dir):
    script = textwrap.dedent(f"""
        import sys
        BLOCKED = {_BLOCKED!r}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked for this test: {{name}}")
                return None

        for name in list(sys.modules):  # nothing of the test stack may be preloaded either
            if name.split(".")[0] in BLOCKED:
                del sys.modules[name]
        sys.meta_path.insert(0, Block())
        import torch
        torch.set_num_threads(1)
        from segevol_fast import cli
        out = {str(tmp_path)!r}
        assert cli.main(["demo", "--no-zoom-in", "--device", "cpu", "-q", "--out", out + "/demo"]) == 0
        assert cli.main(["segment", {str(data_dir / "ct_abdomen_sm.nii.gz")!r}, "--text", "liver", "--random-weights",
                         "--config", "tiny", "--no-zoom-in", "--device", "cpu", "-q", "--out", out + "/seg"]) == 0
        loaded = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("RUNTIME-ONLY OK")
    """)
    env = {**os.environ, "SEGEVOL_DATA": str(data_dir), "OMP_NUM_THREADS": "1"}
    env.pop("SEGEVOL_WEIGHTS", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RUNTIME-ONLY OK" in proc.stdout
    assert (tmp_path / "demo" / "summary.json").is_file() and (tmp_path / "seg" / "summary.json").is_file()
    assert (tmp_path / "demo" / "preview.png").stat().st_size > 0
