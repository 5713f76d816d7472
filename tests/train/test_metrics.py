"""Dice against a set-based hand computation, its empty-mask rule and input checks; MetricLog rows,
resume without a second header, flushing and damaged files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from segevol_fast.errors import ArgumentTypeError, DamagedFileError, InvalidArgumentError, ResultError, ShapeError
from segevol_fast.train.metrics import MetricLog, dice, dice_per_label


def set_dice(a: np.ndarray, b: np.ndarray) -> float:
    """2|A∩B| / (|A| + |B|) over sets of voxel index tuples."""
    sa = {tuple(i) for i in np.argwhere(a)}
    sb = {tuple(i) for i in np.argwhere(b)}
    return 2 * len(sa & sb) / (len(sa) + len(sb))


def random_mask(shape=(5, 6, 7), p=0.3) -> np.ndarray:
    return torch.rand(shape).numpy() < p


# ------------------------------------------------------------------------------ Dice
def test_dice_matches_set_computation():
    for _ in range(5):
        a, b = random_mask(), random_mask(p=float(torch.rand(())))
        b[0, 0, 0] = True
        assert dice(a, b) == pytest.approx(set_dice(a, b), abs=1e-12)
        assert dice(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(set_dice(a, b), abs=1e-12)


def test_dice_edge_cases():
    empty = np.zeros((3, 4), bool)
    full = np.ones((3, 4), bool)
    assert dice(empty, empty) == 1.0  # both empty: a correct "nothing here"
    assert dice(empty, full) == 0.0 and dice(full, empty) == 0.0
    assert dice(full, full) == 1.0
    assert isinstance(dice(full, full), float)
    labels = np.array([[0, 3], [2, 0]], dtype=np.uint8)  # integers: nonzero is foreground
    assert dice(labels, labels > 0) == 1.0


def test_dice_input_checks():
    with pytest.raises(ShapeError):
        dice(np.zeros((2, 3), bool), np.zeros((3, 2), bool))
    with pytest.raises(ArgumentTypeError):
        dice(np.zeros((2, 3)), np.zeros((2, 3), bool))  # float probabilities need a threshold


def test_dice_per_label():
    pred = {"liver": random_mask(), "spleen": random_mask()}
    target = {"spleen": random_mask(), "liver": random_mask()}
    target["liver"][0, 0, 0] = target["spleen"][0, 0, 0] = True
    out = dice_per_label(pred, target)
    assert list(out) == ["spleen", "liver"]
    for name in target:
        assert out[name] == pytest.approx(set_dice(pred[name], target[name]))
    with pytest.raises(ResultError):
        dice_per_label({"liver": pred["liver"]}, target)
    with pytest.raises(ResultError):
        dice_per_label({**pred, "kidney": pred["liver"]}, target)


# ------------------------------------------------------------------------------ MetricLog
def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_csv_and_jsonl_rows_are_flushed_each_step(tmp_path):
    csv_path, jsonl_path = tmp_path / "m.csv", tmp_path / "m.jsonl"
    log = MetricLog(csv_path, jsonl_path)
    log.log(step=1, loss=torch.tensor(0.5), lr=np.float32(1e-4))
    # flushed: readable before close
    assert read_csv(csv_path) == [["step", "loss", "lr"], ["1", "0.5", repr(float(np.float32(1e-4)))]]
    assert json.loads(jsonl_path.read_text()) == {"step": 1, "loss": 0.5, "lr": float(np.float32(1e-4))}
    log.log({"step": 2, "loss": float("nan")})
    log.close()
    rows = read_csv(csv_path)
    assert rows[2] == ["2", "nan", ""]  # a missing column is an empty cell
    lines = [json.loads(x) for x in jsonl_path.read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 0.5, "lr": float(np.float32(1e-4))}, {"step": 2, "loss": "nan"}]


def test_resume_appends_without_a_second_header(tmp_path):
    csv_path, jsonl_path = tmp_path / "m.csv", tmp_path / "m.jsonl"
    with MetricLog(csv_path, jsonl_path) as log:
        log.log(step=1, loss=0.9, dice=0.1)
        log.log(step=2, loss=0.8, dice=0.2)
    with MetricLog(csv_path, jsonl_path) as log:  # a resumed run, keys in another order
        assert log.columns == ["step", "loss", "dice"]
        log.log(dice=0.3, step=3, loss=0.7)
    rows = read_csv(csv_path)
    assert rows == [["step", "loss", "dice"], ["1", "0.9", "0.1"], ["2", "0.8", "0.2"], ["3", "0.7", "0.3"]]
    assert [json.loads(x)["step"] for x in jsonl_path.read_text().splitlines()] == [1, 2, 3]


def test_a_new_column_widens_the_csv(tmp_path):
    """A resumed run that logs a metric the file lacks (other validation prompts, a newer release's
    columns) widens the header; the rows so far get an empty cell, and nothing is lost."""
    csv_path = tmp_path / "eval_log.csv"
    with MetricLog(csv_path) as log:
        log.log(step=1, dice_text=0.1)
    with MetricLog(csv_path) as log:  # resumed
        log.log(step=2, dice_text=0.2, dice=0.3)
        log.log(step=3, dice=0.4)
    assert read_csv(csv_path) == [
        ["step", "dice_text", "dice"],
        ["1", "0.1", ""],
        ["2", "0.2", "0.3"],
        ["3", "", "0.4"],
    ]


def test_resume_after_a_torn_last_line_starts_a_fresh_line(tmp_path):
    csv_path, jsonl_path = tmp_path / "m.csv", tmp_path / "m.jsonl"
    csv_path.write_text("step,loss\n1,0.9\n2,0.")  # killed mid-row
    jsonl_path.write_text('{"step": 1}\n{"st')
    with MetricLog(csv_path, jsonl_path) as log:
        log.log(step=3, loss=0.7)
    assert read_csv(csv_path)[-1] == ["3", "0.7"]
    assert json.loads(jsonl_path.read_text().splitlines()[-1]) == {"step": 3, "loss": 0.7}


def test_metric_log_errors(tmp_path):
    with pytest.raises(InvalidArgumentError):
        MetricLog()
    with MetricLog(csv_path=tmp_path / "a.csv") as log:
        log.log(step=1)
        with pytest.raises(InvalidArgumentError):
            log.log()
        with pytest.raises(ShapeError):
            log.log(step=torch.zeros(2))
    bad = tmp_path / "bad.csv"
    bad.write_text("\n1,2\n")
    with pytest.raises(DamagedFileError):
        MetricLog(bad)
