"""Bad inputs through the command line: exit 1 or 2, one `segevol-fast segment: error: ...` line on
stderr, no traceback, and no output folder.

Most cases fail before the model is built; those that need a model use the tiny architecture with
random weights (`--random-weights --config tiny`). The API half is tests/test_bad_inputs.py.
"""

from __future__ import annotations

import gzip
import shutil

import pytest

from segevol_fast import __version__, cli
from segevol_fast.cli.segment import prompt_arguments

CT = "ct_abdomen_sm.nii.gz"
FAST = ["--random-weights", "--config", "tiny", "-q", "--no-zoom-in", "--device", "cpu"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def cli_environment(monkeypatch, data_dir):
    monkeypatch.setenv("SEGEVOL_DATA", str(data_dir))  # the tokenizer for --text
    monkeypatch.delenv("SEGEVOL_WEIGHTS", raising=False)


@pytest.fixture
def files(data_dir, tmp_path) -> dict[str, str]:
    """Named inputs: the real CT and broken variants of it, in tmp_path."""
    src = data_dir / CT
    data = src.read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(data[: len(data) // 4])
    (tmp_path / "garbage.nii.gz").write_bytes(b"\x00not a nifti at all" * 100)
    raw = gzip.decompress(data)
    (tmp_path / "truncated.nii").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty_dir").mkdir()
    names = {
        "truncated": "truncated.nii.gz",
        "garbage": "garbage.nii.gz",
        "truncated_nii": "truncated.nii",
        "txt": "notes.txt",
        "empty_dir": "empty_dir",
        "missing": "missing.nii.gz",
    }
    return {"ct": str(src), **{key: str(tmp_path / name) for key, name in names.items()}}


CASES = [
    # (id, input key, extra argv, exit code, key phrase); FAST is appended unless the argv names weights/device
    ("no-prompt", "ct", [], 2, "give at least one prompt"),
    ("labels-without-points", "ct", ["--text", "liver", "--point-labels", "1"], 2, "without --points"),
    ("label-half", "ct", ["--points", "4", "4", "3", "--point-labels", "0.5"], 1, "got 0.5"),
    ("label-two", "ct", ["--points", "4", "4", "3", "--point-labels", "2"], 1, "1 (positive) or 0 (negative)"),
    (
        "label-minus-one",
        "ct",
        ["--points", "4", "4", "3", "--points", "5", "5", "3", "--point-labels", "1", "-1"],
        1,
        "padding",
    ),
    ("label-count", "ct", ["--points", "4", "4", "3", "--point-labels", "1", "1"], 1, "one label per point"),
    (
        "all-negative",
        "ct",
        ["--points", "4", "4", "3", "--point-labels", "0"],
        1,
        "at least one point must be positive",
    ),
    ("box-nan", "ct", ["--box", "0", "0", "0", "nan", "4", "4"], 1, "non-finite value (nan)"),
    ("point-inf", "ct", ["--points", "4", "inf", "3"], 1, "non-finite value (inf)"),
    (
        "boxes-vs-texts",
        "ct",
        ["--text", "a", "b", "c", "--box", *"0 0 0 5 5 5".split(), "--box", *"1 1 1 6 6 6".split()],
        1,
        "2 boxes for 3 text",
    ),
    ("box-outside", "ct", ["--box", "0", "0", "0", "500", "4", "4"], 1, "outside the volume of shape (122, 101, 30)"),
    (
        "world-box-outside",
        "ct",
        ["--box", "-100", "100", "120", "5000", "120", "130", "--coords", "world"],
        1,
        "(5000, 120, 130) mm lies outside the volume: its world extent",
    ),
    ("missing-input", "missing", ["--text", "liver"], 1, "no such file or folder"),
    ("truncated-nii-gz", "truncated", ["--text", "liver"], 1, "is damaged or truncated"),
    ("garbage-nii-gz", "garbage", ["--text", "liver"], 1, "is damaged or not a NIfTI file"),
    ("truncated-nii", "truncated_nii", ["--text", "liver"], 1, "is damaged or truncated"),
    ("unknown-file-kind", "txt", ["--text", "liver"], 1, "unknown kind of file"),
    ("empty-folder", "empty_dir", ["--text", "liver"], 1, "holds no DICOM image files"),
    ("series-on-nifti", "ct", ["--text", "liver", "--series", "1.2.3"], 1, "is a NIfTI file"),
    (
        "weights-are-a-nifti",
        "ct",
        ["--text", "liver", "--weights", "{ct}", "--device", "cpu", "-q"],
        1,
        "is a NIfTI image (gzip-compressed .nii.gz), not a checkpoint",
    ),
    ("weights-missing", "ct", ["--text", "liver", "--weights", "{tmp}/nope", "--device", "cpu", "-q"], 2, "nope"),
    (
        "device-gpu7",
        "ct",
        ["--text", "liver", "--device", "gpu7", "--random-weights", "--config", "tiny"],
        2,
        "unknown device 'gpu7'",
    ),
    ("budget-too-small", "ct", ["--box", "1", "1", "1", "8", "8", "5", "--max-memory", "1MB"], 1, "cannot be met"),
]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("key,extra,code,phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_cli_input(files, tmp_path, capsys, key, extra, code, phrase):
    out = tmp_path / "out"
    extra = [a.replace("{ct}", files["ct"]).replace("{tmp}", str(tmp_path)) for a in extra]
    argv = ["segment", files[key], *extra, "--out", str(out)]
    if "--weights" not in extra and "--device" not in extra:
        argv += FAST
    rc, _, err = _run(argv, capsys)
    assert rc == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("segevol-fast segment:")]
    assert len(lines) == 1 and lines[0].startswith("segevol-fast segment: error: "), err
    assert phrase in err, err
    assert not out.exists()


def test_two_series_folder_and_series_flag(two_series, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    rc, _, err = _run(
        ["segment", str(two_series), "--box", "1", "1", "1", "8", "8", "5", "--out", str(out), *FAST], capsys
    )
    assert rc == 1 and "holds 2 series" in err and "--series UID" in err and "1.2.826.0.1.3680043.8.498.2" in err
    assert not out.exists()
    rc, _, err = _run(
        [
            "segment",
            str(two_series),
            "--series",
            "9.9",
            "--box",
            "1",
            "1",
            "1",
            "8",
            "8",
            "5",
            "--out",
            str(out),
            *FAST,
        ],
        capsys,
    )
    assert rc == 1 and "series 9.9 is not in" in err and not out.exists()
    import segevol_fast.io as io_mod  # _cmd_segment imports load_volume from here when it runs

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop once the series has been passed on: no model, no output

    monkeypatch.setattr(io_mod, "load_volume", spy)
    rc, _, _ = _run(
        [
            "segment",
            str(two_series),
            "--series",
            "1.2.826.0.1.3680043.8.498.2",
            "--box",
            "1",
            "1",
            "1",
            "8",
            "8",
            "5",
            "--out",
            str(out),
            *FAST,
        ],
        capsys,
    )
    assert rc == 130 and seen["series"] == "1.2.826.0.1.3680043.8.498.2"


def test_repeated_text_flag_keeps_every_name():
    args = cli.build_parser().parse_args(["segment", "x.nii.gz", "--text", "liver", "--text", "spleen", "left kidney"])
    assert args.text == ["liver", "spleen", "left kidney"]


def test_official_float_point_labels_accepted():
    args = cli.build_parser().parse_args(
        ["segment", "x.nii.gz", "--points", "1", "2", "3", "--points", "4", "5", "6", "--point-labels", "1.0", "0"]
    )
    prompts = prompt_arguments(args)
    assert prompts["point_labels"].tolist() == [1.0, 0.0]


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"segevol-fast {__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        ["segment", "x.nii.gz", "--box", "1", "2", "3"],  # five numbers short
        ["segment", "x.nii.gz", "--mode", "slow"],
        ["segment", "x.nii.gz", "--max-memory", "2 bananas"],
        ["segment", "x.nii.gz", "--point-labels", "one"],
    ],
    ids=["box-too-short", "mode", "max-memory", "label-word"],
)
def test_argparse_errors_stay_argparse(argv, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "segevol-fast segment: error:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unreadable_input_is_a_typed_error(files, tmp_path, capsys, monkeypatch):
    """root reads every file, so the PermissionError is injected where the input is opened."""
    import builtins

    from segevol_fast.errors import UnreadableFileError

    real_open = builtins.open

    def deny(path, *args, **kwargs):
        if str(path) == files["txt"]:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    out = tmp_path / "out"
    rc, _, err = _run(["segment", files["txt"], "--text", "liver", "--out", str(out), *FAST], capsys)
    assert rc == 1 and "cannot open" in err and "Permission denied" in err and not out.exists()
    from segevol_fast import load_volume

    with pytest.raises(UnreadableFileError) as info:
        load_volume(files["txt"])
    assert isinstance(info.value, PermissionError)


def test_damaged_weights_copy(tmp_path, capsys, files):
    """A checkpoint cut short: named as damaged, exit 1."""
    from segevol_fast import SegVol, SegVolConfig

    SegVol(SegVolConfig.tiny()).save_pretrained(tmp_path / "w")
    st = tmp_path / "w" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:2000])
    shutil.copyfile(files["ct"], tmp_path / "in.nii.gz")
    out = tmp_path / "out"
    rc, _, err = _run(
        [
            "segment",
            str(tmp_path / "in.nii.gz"),
            "--box",
            "1",
            "1",
            "1",
            "8",
            "8",
            "5",
            "--weights",
            str(tmp_path / "w"),
            "--device",
            "cpu",
            "-q",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert rc == 1 and "damaged" in err and "model.safetensors" in err and not out.exists()


@pytest.mark.parametrize("value", ["-1GB", "-0.5GiB", "-1"])
def test_negative_memory_limit_reaches_our_check(value, capsys, tmp_path):
    """argparse alone takes "-1GB" for an option ("expected one argument")."""
    with pytest.raises(SystemExit) as info:
        cli.main(["segment", "x.nii.gz", "--max-memory", value, "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"segevol-fast segment: error: argument --max-memory: memory size must be a positive, finite number of "
        f"bytes, got '{value}'" in err
    ), err
    assert "expected one argument" not in err and not (tmp_path / "out").exists()
    args = cli.build_parser().parse_args(["segment", "x.nii.gz", "--box", "-1e3", "0", "0", "5", "5", "5"])
    assert args.box == [[-1000.0, 0, 0, 5, 5, 5]]  # a value, for the prompt checks to judge
