"""Cohort runs: folders, globs and manifests; resume skips finished scans; a bad scan is reported
and skipped; every result equals a single segment() call."""

from __future__ import annotations

import json
import pathlib
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
    manifest.write_text(
        "input,text,modality,box\nscans/ct.nii.gz,liver;spleen,ct,\nscans/mr.nii.gz,,mri,10 10 2 60 50 15\n"
    )
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
    assert {r["name"]: r["status"] for r in again} == {
        "ct": "done before (skipped)",
        "mr": "done before (skipped)",
        "broken": "error",
    }
    assert (out / "ct" / "summary.json").stat().st_mtime_ns == before


def test_cli_runs_a_cohort(scans, tmp_path, data_dir):
    from segevol_fast.cli import main

    out = tmp_path / "cli_out"
    code = main(
        [
            "segment",
            str(scans / "*.nii.gz"),
            "--text",
            "liver",
            "--out",
            str(out),
            "--random-weights",
            "--config",
            "tiny",
            "--no-zoom-in",
            "--device",
            "cpu",
            "-q",
            "--tokenizer",
            str(data_dir / "clip_tokenizer"),
        ]
    )
    assert code == 1  # the broken scan failed; the others are done
    rows = {r["name"]: r["status"] for r in iter_rows(out / SUMMARY)}
    assert rows == {"broken": "error", "ct": "ok", "mr": "ok"}
    assert (out / "ct" / "liver.nii.gz").is_file()


def _cohort_cli(scans, out, data_dir, nproc: int):
    from tests.launch import run_python

    args = [
        "segment",
        str(scans / "*.nii.gz"),
        "--text",
        "liver",
        "spleen",
        "--out",
        str(out),
        "--random-weights",
        "--config",
        "tiny",
        "--no-zoom-in",
        "--device",
        "cpu",
        "-q",
        "--tokenizer",
        str(data_dir / "clip_tokenizer"),
    ]
    return run_python(["-m", "segevol_fast"], args, nproc)


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


# ---------------------------------------------------------------------- manifests with bad rows
BOX = "30 20 5 80 70 20"


def save_test_lora(model, path, name: str = "liver_lora"):
    """Save a LoRA adapter of `model` with nonzero A and B (so it changes the output) and detach it."""
    import torch

    from segevol_fast import adapters

    adapters.add_lora(model, name, adapters.LoraConfig(rank=2), freeze_base=False, activate=False)
    with torch.no_grad():
        for p in adapters.adapter_parameters(model, name):
            p.normal_(0.0, 0.5)
    adapters.save_adapter(model, name, path)
    adapters.remove_adapter(model, name)
    return path


def _write_ct(folder, data_dir, name="ct.nii.gz"):
    folder.mkdir(exist_ok=True)
    shutil.copy(data_dir / "ct_abdomen_sm.nii.gz", folder / name)


def test_invalid_manifest_rows_are_recorded_and_the_others_run(tiny_model, tmp_path, data_dir):
    _write_ct(tmp_path, data_dir)
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "input,name,box,points\n"
        f"ct.nii.gz,good,{BOX},\n"
        "ct.nii.gz,five,1 2 3 4 5,\n"  # a 5-number box
        "ct.nii.gz,two,,4 4\n"  # a 2-number point
        "ct.nii.gz,word,1 2 x 4 5 6,\n"  # not a number
        ",noinput,,\n"
    )
    items = cohort_items(str(manifest))
    errors = {i.name: str(i.error) for i in items}
    assert items[0].error is None
    assert f"{manifest}, row 2 (line 3), column box: box must be (6,)" in errors["five"] and "(5,)" in errors["five"]
    assert f"{manifest}, row 3 (line 4), column points: points must be (P, 3)" in errors["two"]
    assert f"{manifest}, row 4 (line 5), column box: 'x' is not a number" in errors["word"]
    assert f"{manifest}, row 5 (line 6), column input: empty" in errors["noinput"]
    assert all(isinstance(i.error, ValueError) for i in items[1:])
    out = tmp_path / "out"
    rows = segment_cohort(tiny_model, items, out, progress=False, zoom_in=False)
    assert [(r["name"], r["status"]) for r in rows] == [
        ("good", "ok"),
        ("five", "error"),
        ("two", "error"),
        ("word", "error"),
        ("noinput", "error"),
    ]
    summary = {r["name"]: r for r in iter_rows(out / SUMMARY)}
    assert (
        summary["five"]["error"].startswith("PromptError: ")
        and "row 2 (line 3), column box" in summary["five"]["error"]
    )
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["good"]


def test_manifest_json_and_file_problems(tmp_path, data_dir):
    from segevol_fast.errors import InvalidArgumentError

    _write_ct(tmp_path, data_dir)
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(
        json.dumps({"input": "ct.nii.gz", "box": [30, 20, 5, 80, 70, 20]}) + "\n\n"
        '{"input": "ct.nii.gz", "box": [1, 2\n'
        + json.dumps({"input": "ct.nii.gz", "points": [1, 2, 3], "point_labels": [1, 1]})
        + "\n"
        + json.dumps({"input": "ct.nii.gz", "text": 5})
        + "\n"
        + json.dumps(["ct.nii.gz"])
        + "\n"
    )
    items = cohort_items(str(jsonl))
    assert items[0].error is None and items[0].name == "ct"
    assert f"{jsonl}, row 2 (line 3): not valid JSON" in str(items[1].error) and items[1].name == "row_2"
    assert "row 3 (line 4), column point_labels: point_labels must give one label per point" in str(items[2].error)
    assert "row 4 (line 5), column text: text must be a name or a list of names" in str(items[3].error)
    assert isinstance(items[3].error, TypeError)
    assert "row 5 (line 6): each line must be one JSON object" in str(items[4].error)
    # the command's prompts fill empty columns, and the message says the value was the command's
    csv_ = tmp_path / "m.csv"
    csv_.write_text("\ufeffinput,text\nct.nii.gz,liver;spleen;kidney\nct.nii.gz,\n")  # a spreadsheet's BOM
    rows = cohort_items(str(csv_), box=np.array([[30, 20, 5, 80, 70, 20], [31, 21, 6, 81, 71, 21]], float))
    assert "row 1 (line 2), column box (empty in the row: the command's value): 2 boxes for 3 text" in str(
        rows[0].error
    )
    assert rows[1].error is None
    # a field with unquoted commas: more fields than the header
    csv_.write_text("input,box\nct.nii.gz,30,20,5,80,70,20\n")
    assert "5 more field(s) than the header's 2 columns" in str(cohort_items(str(csv_), text="liver")[0].error)
    for text, phrase in [("name,text\nct.nii.gz,liver\n", "no 'input' column"), ("input,text\n", "has no rows")]:
        csv_.write_text(text)
        with pytest.raises(InvalidArgumentError, match=phrase):
            cohort_items(str(csv_))


def test_a_scan_that_fails_in_any_way_is_recorded_and_ctrl_c_still_writes_the_summary(
    tiny_model, tmp_path, data_dir, monkeypatch
):
    import importlib

    scans = tmp_path / "scans"
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        _write_ct(scans, data_dir, name)
    module = importlib.import_module("segevol_fast.inference.segment")
    real, raise_for = module.segment, {}

    def flaky(model, volume, *args, **kwargs):
        exc = raise_for.get(pathlib.Path(volume.source).name)
        if exc is not None:
            raise exc
        return real(model, volume, *args, **kwargs)

    monkeypatch.setattr(module, "segment", flaky)
    items = cohort_items(str(scans), box=[30, 20, 5, 80, 70, 20])
    out = tmp_path / "out"
    raise_for["a.nii.gz"] = RuntimeError("an unexpected bug")  # not one of ours: still recorded
    rows = segment_cohort(tiny_model, items, out, progress=False, zoom_in=False)
    assert [r["status"] for r in rows] == ["error", "ok", "ok"]
    assert rows[0]["error"] == "RuntimeError: an unexpected bug"
    raise_for["a.nii.gz"] = KeyboardInterrupt()
    shutil.rmtree(out)
    with pytest.raises(KeyboardInterrupt):
        segment_cohort(tiny_model, items, out, progress=False, zoom_in=False)
    assert [r["status"] for r in iter_rows(out / SUMMARY)] == ["not run (interrupted)"] * 3


def test_a_rerun_keeps_the_numbers_of_skipped_scans(tiny_model, tmp_path, data_dir):
    scans = tmp_path / "scans"
    _write_ct(scans, data_dir)
    items = cohort_items(str(scans), text="liver", box=[30, 20, 5, 80, 70, 20])
    out = tmp_path / "out"
    (first,) = segment_cohort(tiny_model, items, out, progress=False, zoom_in=False)
    keep = ("peak_memory_bytes", "seconds", "ml[liver]", "windows")
    again = next(iter_rows(out / SUMMARY))
    (rerun,) = segment_cohort(tiny_model, items, out, progress=False, zoom_in=False)
    assert rerun["status"] == "done before (skipped)"
    assert {k: rerun[k] for k in keep} == {k: again[k] for k in keep} and again["ml[liver]"] == str(first["ml[liver]"])
    (out / SUMMARY).unlink()  # no previous summary: the scan's summary.json has the numbers
    (rerun,) = segment_cohort(tiny_model, items, out, progress=False, zoom_in=False)
    assert rerun["ml[liver]"] == first["ml[liver]"] and rerun["peak_memory_bytes"] == first["peak_memory_bytes"]


def test_a_manifest_row_with_an_adapter_file(tiny_model, tmp_path, data_dir):
    import nibabel as nib

    from segevol_fast import adapters

    _write_ct(tmp_path, data_dir)
    (tmp_path / "adapters").mkdir()
    save_test_lora(tiny_model, tmp_path / "adapters" / "lora.safetensors")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "input,name,adapter\nct.nii.gz,with,adapters/lora.safetensors\nct.nii.gz,without,\n"
        "ct.nii.gz,missing,adapters/nope.safetensors\nct.nii.gz,unknown,no_such_adapter\n"
    )
    items = cohort_items(str(manifest), box=[30, 20, 5, 80, 70, 20])
    assert f"row 3 (line 4), column adapter: no adapter file at {tmp_path / 'adapters' / 'nope.safetensors'}" in str(
        items[2].error
    )
    out = tmp_path / "out"
    rows = segment_cohort(tiny_model, items, out, progress=False, zoom_in=False, return_probabilities=True)
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "error"]
    assert rows[0]["adapter"] == "liver_lora" and rows[1]["adapter"] == "as set on the model"
    assert "row 4 (line 5), column adapter: no adapter named 'no_such_adapter'" in rows[3]["error"]
    notes = json.loads((out / "with" / "summary.json").read_text())["notes"]
    assert any("liver_lora" in n and "lora.safetensors" in n for n in notes)
    prob = {n: np.asarray(nib.load(out / n / "box_0_prob.nii.gz").dataobj) for n in ("with", "without")}
    assert not np.array_equal(prob["with"], prob["without"])
    assert adapters.adapter_names(tiny_model) == []  # the file's adapter was detached after the run
