"""Evaluation metrics and a training-metrics writer.

* `dice`: 2|A∩B| / (|A| + |B|) on binary masks; two empty masks score 1.0 (a correct "nothing
  here"), one empty and one not score 0.0.
* `dice_per_label`: the same per structure name, for dicts of masks with the same names.
* `MetricLog`: one row per training step appended to CSV and/or JSONL. Files are opened in append
  mode and flushed after every row, so a crashed or resumed run continues the same files; the CSV
  header is written only when the file is new (empty).

Box jitter for jittered-box evaluation lives in `segevol_fast.train.prompts.jitter_box` (one
implementation for training and evaluation).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

from ..errors import (
    ArgumentTypeError,
    DamagedFileError,
    InvalidArgumentError,
    OutputError,
    ResultError,
    ShapeError,
)
from ..io.output import write_file_atomic

PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------ Dice
def _as_bool_array(mask, name: str) -> np.ndarray:
    """bool or integer tensor / array -> bool numpy array (integers: nonzero is foreground).

    Floats are refused: probabilities and logits need a threshold the caller must choose."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        return arr != 0
    raise ArgumentTypeError(f"{name} must be a bool or integer mask, got dtype {arr.dtype}: threshold it first")


def dice(pred, target) -> float:
    """Dice of two binary masks of the same shape (any rank; bool or integer, nonzero = in).

    Returns:
        2|A∩B| / (|A| + |B|) as a Python float in [0, 1]; 1.0 when both masks are empty.
    """
    a, b = _as_bool_array(pred, "pred"), _as_bool_array(target, "target")
    if a.shape != b.shape:
        raise ShapeError(f"pred {a.shape} and target {b.shape} must have the same shape")
    size = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if size == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / size


def dice_per_label(pred: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, float]:
    """`dice` for each name of two dicts name -> mask; both must hold the same names.

    Returns:
        {name: dice} in the order of `target`.
    """
    missing, extra = set(target) - set(pred), set(pred) - set(target)
    if missing or extra:
        raise ResultError(f"labels differ: missing from pred {sorted(missing)}, not in target {sorted(extra)}")
    return {name: dice(pred[name], target[name]) for name in target}


# ------------------------------------------------------------------------------ metric log
def _plain(value: Any) -> Any:
    """0-d tensors / numpy scalars -> Python numbers; JSON-unsafe floats (nan, inf) -> strings."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        if getattr(value, "ndim", 0) != 0:
            raise ShapeError(f"metric values must be scalars, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan" / "inf": JSON has no literal for them
    return value


def _end_with_newline(path: str) -> None:
    """A run killed mid-row leaves a last line without "\\n": end it so new rows start clean."""
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
        if last != b"\n":
            with open(path, "ab") as f:
                f.write(b"\n")


def _read_csv_header(path: str) -> Optional[list[str]]:
    """The header of an existing non-empty CSV, or None for a missing / empty file."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), None)
    if not header or any(not h for h in header):
        raise DamagedFileError(f"{path}: the first line is not a CSV header; move the file away or pick another name")
    return header


class MetricLog:
    """Append training metrics, one row per step, to CSV and/or JSONL.

    Args:
        csv_path: CSV file; its columns are the first row's keys (or the existing header on
            resume). Later rows may omit columns (empty cells); a row with a new column widens
            the file (a run resumed with other metrics, or by a newer release): the header and the
            rows so far are rewritten at once with an empty cell in the new column.
        jsonl_path: JSON Lines file; any keys per row.

    Use as a context manager, or call `close()`.
    """

    def __init__(self, csv_path: Optional[PathLike] = None, jsonl_path: Optional[PathLike] = None):
        if csv_path is None and jsonl_path is None:
            raise InvalidArgumentError("MetricLog needs csv_path and/or jsonl_path")
        self._csv = self._jsonl = None
        self.columns: Optional[list[str]] = None
        try:
            if csv_path is not None:
                csv_path = self._csv_path = os.fspath(csv_path)
                self.columns = _read_csv_header(csv_path)
                _end_with_newline(csv_path)
                self._csv = open(csv_path, "a", newline="", encoding="utf-8")
            if jsonl_path is not None:
                jsonl_path = os.fspath(jsonl_path)
                _end_with_newline(jsonl_path)
                self._jsonl = open(jsonl_path, "a", encoding="utf-8")
        except OSError as exc:
            self.close()
            raise OutputError(f"cannot open the metric log for appending: {exc}") from exc

    def log(self, row: Optional[Mapping[str, Any]] = None, **fields: Any) -> None:
        """Append one row (a mapping and/or keyword fields, e.g. step=3, loss=0.41) and flush."""
        record = {**(row or {}), **fields}
        if not record:
            raise InvalidArgumentError("a metric row needs at least one field")
        record = {str(k): _plain(v) for k, v in record.items()}
        if self._csv is not None:
            self._write_csv(record)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()

    def _write_csv(self, record: dict) -> None:
        if self.columns is None:  # a new file: this row fixes the columns
            self.columns = list(record)
            self._write_csv_line(self.columns)
        new = [k for k in record if k not in self.columns]
        if new:
            self._widen(self.columns + new)
        self._write_csv_line(["" if record.get(c) is None else record[c] for c in self.columns])

    def _widen(self, columns: list[str]) -> None:
        """Rewrite the CSV under a header with more columns, old rows padded with empty cells; the
        file is replaced in one step, so a crash leaves the old file or the new one."""
        self._csv.close()
        with open(self._csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))[1:]

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                out = csv.writer(f, lineterminator="\n")
                out.writerow(columns)
                out.writerows(row + [""] * (len(columns) - len(row)) for row in rows)

        write_file_atomic(self._csv_path, write)
        self._csv = open(self._csv_path, "a", newline="", encoding="utf-8")
        self.columns = columns

    def _write_csv_line(self, values: list) -> None:
        buf = io.StringIO()  # one write per line: a crash never leaves half of a header and a row
        csv.writer(buf, lineterminator="\n").writerow(values)
        self._csv.write(buf.getvalue())
        self._csv.flush()

    def close(self) -> None:
        for f in (self._csv, self._jsonl):
            if f is not None:
                f.close()
        self._csv = self._jsonl = None

    def __enter__(self) -> "MetricLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
