"""bench/adaptation_study.py end to end at a few steps (the real run is ~15 min; README table):
every method attaches, trains, evaluates and lands in the report, and a saved base is reused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # ~1 min on 2 cores
def test_study_runs_every_method(tmp_path, data_dir):
    cmd = [
        sys.executable,
        str(REPO / "bench" / "adaptation_study.py"),
        "--base-steps",
        "2",
        "--adapt-steps",
        "1",
        "--out",
        str(tmp_path / "study"),
        "--results",
        "",
        "-q",
    ]
    env = {"SEGEVOL_DATA": str(data_dir), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "study" / "study.json").read_text())
    assert set(report["methods"]) == {
        "lora",
        "bottleneck",
        "mixture_tag",
        "mixture_top1",
        "priors_additive",
        "priors_hermes",
    }
    for name, r in report["methods"].items():
        assert r["trainable_parameters"] > 0, name
        for modality in ("ct", "mr"):
            assert set(r["dice"][modality]) == {"text", "box", "jittered_box"}
            assert all(0.0 <= v <= 1.0 for v in r["dice"][modality].values())
    assert (tmp_path / "study" / "base" / "config.json").exists()
    # the saved base is reused: a second run trains no base
    again = subprocess.run(
        cmd[:-3] + ["--methods", "lora", "--results", "", "-q"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert again.returncode == 0 and "base:" not in again.stdout, again.stderr[-2000:]
