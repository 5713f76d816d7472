"""Cohort runs: folders, globs and manifests; resume skips finished scans; a bad scan is reported
and skipped; every result equals a single segment() call."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from segevol_fast.inference import segment
from segevol_fast.inference.cohort import SUMMARY, cohort_items, is_cohort_input, iter_rows, segment_cohort

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def scans(tmp_path, data_dir):
    d = tmp_path / "scans"
    d.mkdir()
    shutil.copy(data_dir / "ct_abdomen_sm.nii.gz", d / "ct.nii.gz")
    shutil.copy(data_dir / "mr_abdomen_sm.nii.gz", d / "mr.nii.gz")
    shutil.copytree(data_dir / "ct_abdomen_dicom", d / "dicom_ct")
    (d / "broken.nii.gz").write_bytes(b"not a nifti file")
    return d


def test_inputs_folder_glob_manifest(scans, tmp_path, data_dir):
    assert is_cohort_input(str(scans)) and not is_cohort_input(str(scans / "dicom_ct"))
    items = cohort_items(str(scans), text="liver")
    assert [i.name for i in items] == ["broken", "ct", "dicom_ct", "mr"] and items[0].text == ["liver"]
    assert [i.name for i in cohort_items(str(scans / "*.nii.gz"))] == ["broken", "ct", "mr"]
    manifest = tmp_path / "m.csv"
    manifest.write_text("input,text,modality,box\nscans/ct.nii.gz,liver;spleen,ct,\nscans/mr.nii.gz,,mri,10 10 2 60 50 15\n")
    rows = cohort_items(str(manifest), text="kidney")
    assert rows[0].text == ["liver", "spleen"] and rows[1].text == ["kidney"] and rows[1].box == [10, 10, 2, 60, 50, 15]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"input": str(scans / "ct.nii.gz"), "text": ["liver"], "name": "x"}) + "\n")
    assert cohort_items(str(jsonl))[0].name == "x"


def test_cohort_run_resume_and_a_bad_scan(tiny_model, scans, tmp_path):
    items = [i for i in cohort_items(str(scans), text=["liver", "spleen"]) if i.name != "dicom_ct"]
    out = tmp_path / "out"
    rows = segment_cohort(tiny_model, items, out, progress=False, zoom_in=False)
    status = {r["name"]: r["status"] for r in rows}
    assert status == {"broken": "error", "ct": "ok", "mr": "ok"}
    summary = list(iter_rows(out / SUMMARY))
    assert {r["name"] for r in summary} == {"broken", "ct", "mr"}
    assert "DamagedFileError" in next(r["error"] for r in summary if r["name"] == "broken")
    assert float(next(r for r in summary if r["name"] == "ct")["ml[liver]"]) >= 0
    single = segment(tiny_model, scans / "ct.nii.gz", text=["liver", "spleen"], zoom_in=False, progress=False)
    import nibabel as nib

    saved = np.asarray(nib.load(out / "ct" / "liver.nii.gz").dataobj).astype(bool)
    np.testing.assert_array_equal(saved, single.masks["liver"])
    # a rerun skips the finished scans and retries the failed one
    before = (out / "ct" / "summary.json").stat().st_mtime_ns
    again = segment_cohort(tiny_model, items, out, progress=False, zoom_in=False)
    assert {r["name"]: r["status"] for r in again} == {"ct": "done before (skipped)", "mr": "done before (skipped)",
                                                       "broken": "error"}
    assert (out / "ct" / "summary.json").stat().st_mtime_ns == before


def test_cli_runs_a_cohort(scans, tmp_path, data_dir):
    from segevol_fast.cli import main

    out = tmp_path / "cli_out"
    code = main(["segment", str(scans / "*.nii.gz"), "--text", "liver", "--out", str(out), "--random-weights",
                 "--config", "tiny", "--no-zoom-in", "--device", "cpu", "-q", "--tokenizer",
                 str(data_dir / "clip_tokenizer")])
    assert code == 1  # the broken scan failed; the others are done
    rows = {r["name"]: r["status"] for r in iter_rows(out / SUMMARY)}
    assert rows == {"broken": "error", "ct": "ok", "mr": "ok"}
    assert (out / "ct" / "liver.nii.gz").is_file()


def _cohort_cli(scans, out, data_dir, nproc: int):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    args = ["segment", str(scans / "*.nii.gz"), "--text", "liver", "spleen", "--out", str(out), "--random-weights",
            "--config", "tiny", "--no-zoom-in", "--device", "cpu", "-q", "--tokenizer", str(data_dir / "clip_tokenizer")]
    launcher = [sys.executable, "-m", "segevol_fast"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                    "-m", "segevol_fast"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(launcher + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two torchrun processes start, each building the model (~20 s)
def test_torchrun_sharded_cohort_equals_one_process(scans, tmp_path, data_dir):
    import nibabel as nib

    one = _cohort_cli(scans, tmp_path / "one", data_dir, 1)
    two = _cohort_cli(scans, tmp_path / "two", data_dir, 2)
    assert one.returncode == two.returncode == 1, two.stderr[-3000:]  # the broken scan, in both
    keep = ("name", "status", "ml[liver]", "ml[spleen]", "windows")
    rows1 = [{k: r.get(k) for k in keep} for r in iter_rows(tmp_path / "one" / SUMMARY)]
    rows2 = [{k: r.get(k) for k in keep} for r in iter_rows(tmp_path / "two" / SUMMARY)]
    assert rows1 == rows2 and [r["name"] for r in rows1] == ["broken", "ct", "mr"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    for scan in ("ct", "mr"):
        for label in ("liver", "spleen"):
            a = np.asarray(nib.load(tmp_path / "one" / scan / f"{label}.nii.gz").dataobj)
            b = np.asarray(nib.load(tmp_path / "two" / scan / f"{label}.nii.gz").dataobj)
            np.testing.assert_array_equal(a, b)
