"""`segevol-fast eval-robustness`: the command's table is the API's on the same cases (tiny random
model, two tiny phantom cases), it resumes and refuses changed settings, and bad flags are usage
errors."""

from __future__ import annotations

import json

import pytest

from segevol_fast import SegVol, cli
from segevol_fast.eval import PUBLISHED, robustness
from tests.eval.test_robustness import ORGANS, tiny_model, write_blob_cases

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:model weights are random")]


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """The phantom cases and the command line's data flags for them."""
    folder = tmp_path_factory.mktemp("blobs")
    cases = write_blob_cases(folder)
    (folder / "labels.json").write_text(json.dumps({"ct": {str(k): v for k, v in ORGANS.items()}}))
    flags = []
    for c in cases:
        flags += ["--image", str(c.image), "--label", str(c.label)]
    flags += ["--label-map", str(folder / "labels.json"), "--label-map-key", "ct", "--modality", "ct"]
    return cases, flags


@pytest.fixture
def sessions(monkeypatch) -> list:
    """Every session the command opens (SegVol.session wrapped), in order."""
    opened = []
    real = SegVol.session

    def session(self, volume, **kwargs):
        opened.append(volume)
        return real(self, volume, **kwargs)

    monkeypatch.setattr(SegVol, "session", session)
    return opened


def _argv(blobs, data_dir, out, *extra) -> list[str]:
    model = f"--random-weights --config tiny --tokenizer {data_dir}/clip_tokenizer"
    quick = "--rotations published --box-jitter 3 --point-jitter 2 --no-zoom-in --device cpu --threads 1 -q"
    return ["eval-robustness", *blobs[1], *model.split(), *quick.split(), "--out", str(out), *extra]


def test_the_command_table_is_the_api_table(blobs, data_dir, tmp_path, capsys):
    assert cli.main(_argv(blobs, data_dir, tmp_path / "cli")) == 0
    captured = capsys.readouterr()
    assert "RANDOM WEIGHTS" in captured.err
    assert "published" in captured.out and "drop" in captured.out  # the summary table is printed
    for name in ("robustness.csv", "robustness.json", "robustness.png"):
        assert (tmp_path / "cli" / name).is_file()

    model = tiny_model(data_dir / "clip_tokenizer")
    api = robustness(
        model, blobs[0], rotations=[PUBLISHED], box_jitter=(3,), point_jitter=(2,), zoom_in=False, progress=False
    )
    api.to_csv(tmp_path / "api.csv")
    assert (tmp_path / "api.csv").read_text() == (tmp_path / "cli" / "robustness.csv").read_text()
    saved = json.loads((tmp_path / "cli" / "robustness.json").read_text())
    assert saved["rows"] == api.rows and saved["summary"] == api.summary
    # the same settings and weights: the API run in the command's folder finds every case done
    again = robustness(
        model,
        blobs[0],
        rotations=[PUBLISHED],
        box_jitter=(3,),
        point_jitter=(2,),
        zoom_in=False,
        progress=False,
        out_dir=tmp_path / "cli",
    )
    assert again.rows == api.rows


def test_a_rerun_resumes_and_a_changed_setting_needs_restart(blobs, data_dir, tmp_path, sessions, capsys):
    out = tmp_path / "out"
    assert cli.main(_argv(blobs, data_dir, out, "--prompts", "box", "text+points")) == 0
    assert len(sessions) == 2 * len(blobs[0])  # as stored and published, per case
    table = (out / "robustness.csv").read_text()
    sessions.clear()
    assert cli.main(_argv(blobs, data_dir, out, "--prompts", "box", "text+points")) == 0
    assert not sessions and (out / "robustness.csv").read_text() == table

    capsys.readouterr()
    assert cli.main(_argv(blobs, data_dir, out, "--prompts", "box")) == 1
    err = capsys.readouterr().err
    assert "prompts" in err and "--restart" in err and not sessions
    assert cli.main(_argv(blobs, data_dir, out, "--prompts", "box", "--restart")) == 0
    assert len(sessions) == 2 * len(blobs[0])
    assert {line.split(",")[7] for line in (out / "robustness.csv").read_text().splitlines()[1:]} == {"box"}


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--prompts", "lasso"], "'lasso' is not a prompt type"),
        (["--rotations", "none", "sweep"], "--rotations none excludes the others"),
        (["--rotations", "sweep", "--sweep-axes", "q"], "--sweep-axes"),
    ],
)
def test_bad_flags_are_usage_errors(blobs, data_dir, tmp_path, sessions, capsys, extra, words):
    assert cli.main(_argv(blobs, data_dir, tmp_path, *extra)) == 2
    assert words in capsys.readouterr().err and not sessions


@pytest.mark.parametrize("extra", [["--box-jitter", "-1"], ["--tta", "0"], ["--rotations", "upside-down"]])
def test_bad_values_are_refused_by_the_parser(blobs, data_dir, tmp_path, extra):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(_argv(blobs, data_dir, tmp_path, *extra))
    assert exit_info.value.code == 2


def test_no_cases_is_a_usage_error(data_dir, tmp_path, capsys):
    argv = ["eval-robustness", "--random-weights", "--config", "tiny", "--out", str(tmp_path), "-q"]
    assert cli.main(argv) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
