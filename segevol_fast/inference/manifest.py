"""Cohort manifests: a CSV (with a header) or JSONL file, one scan per row, read into `CohortItem`s.

Columns: `input` (required; relative paths are read from the manifest's folder), `text` (names
separated by ";", in JSONL also a list), `box` (6 numbers, or 6N for N boxes), `points` (3k
numbers), `point_labels` (k of 1 / 0), `modality`, `adapter` (the name of one of the model's
adapters, or an adapter file saved with `adapters.save_adapter`, relative to the manifest's folder)
and `name` (the output folder; default the input's stem). Numbers are separated by spaces or commas
(in a CSV, a field with commas must be quoted); JSONL may give them as lists. A UTF-8 byte-order
mark (spreadsheet exports) is ignored.

Every row is checked once, with `segment()`'s own argument checks (`check_prompt_arguments`, which
names the prompt argument at fault, and `check_modality`), after the command's prompts have filled
its empty columns (`check_item`), and the adapter file it names must exist. A row that fails keeps
its error in `CohortItem.error`: a typed error whose message names the manifest, the row (1-based,
counting data rows, with its line in the file) and the column. A problem with the whole file
(missing, not UTF-8 text, no `input` column, no rows) raises at once.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..errors import (
    AdapterError,
    ArgumentTypeError,
    InvalidArgumentError,
    PromptError,
    SegVolFastError,
    VolumeNotFoundError,
)
from .result_files import safe_label

PROMPT_COLUMNS = ("text", "box", "points", "point_labels")
NUMBER_COLUMNS = {
    "box": "6 numbers i0 j0 k0 i1 j1 k1 per box",
    "points": "3 numbers i j k per point",
    "point_labels": "1 (positive) or 0 (negative) per point",
}
ADAPTER_SUFFIX = ".safetensors"


@dataclass
class CohortItem:
    """One scan of a cohort: its input and prompts (None: the command's).

    where: the manifest row it came from ("m.csv, row 3 (line 4)"), None for a folder or glob.
    error: why it cannot run (a typed error naming the row and column), found before any scan is
    read; `segment_cohort` records it as failed and runs the other items.
    from_command: the fields the command's prompts filled (the row left them empty)."""

    input: str
    name: str
    text: Optional[list[str]] = None
    box: Optional[list[float]] = None
    points: Optional[list[float]] = None
    point_labels: Optional[list[float]] = None
    modality: Optional[str] = None
    adapter: Optional[str] = None
    extra: dict = field(default_factory=dict)
    where: Optional[str] = None
    error: Optional[SegVolFastError] = None
    from_command: tuple[str, ...] = ()


def stem(path: str) -> str:
    """Default output name of a scan: the file name without .nii(.gz), file-name safe."""
    p = pathlib.Path(path)
    name = p.name[:-7] if p.name.lower().endswith(".nii.gz") else (p.stem if p.suffix.lower() == ".nii" else p.name)
    return safe_label(name) if name else "scan"


def read_manifest(path: str | os.PathLike) -> list[CohortItem]:
    """Items of a CSV (with a header) or JSONL manifest, one per row, in order; a row that cannot
    run carries its error (see the module docstring). Output names are made unique."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise VolumeNotFoundError(f"no cohort manifest at {path}")
    rows = _jsonl_rows(path) if path.suffix.lower() == ".jsonl" else _csv_rows(path)
    if not rows:
        raise InvalidArgumentError(
            f"cohort manifest {path} has no rows: give one scan per row "
            "(CSV: a header line such as 'input,text' and then one line per scan)"
        )
    return unique_names([_item(path, n, where, row) for n, (where, row) in enumerate(rows, 1)])


def _text_lines(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(
            f"cohort manifest {path} is not UTF-8 text ({exc.reason} at byte {exc.start}): "
            "save it as a UTF-8 CSV or JSONL file"
        ) from None


def _csv_rows(path: pathlib.Path) -> list[tuple[str, dict]]:
    text = _text_lines(path)
    reader = csv.DictReader(text.splitlines(keepends=True))
    try:
        header = reader.fieldnames or []
        if "input" not in header:
            raise InvalidArgumentError(
                f"cohort manifest {path} has no 'input' column (its first line, the header, names {header}); "
                "the header names the columns: input (required), text, box, points, point_labels, modality, "
                "adapter, name"
            )
        return [(f"{path}, row {n} (line {reader.line_num})", row) for n, row in enumerate(reader, 1)]
    except csv.Error as exc:
        raise InvalidArgumentError(
            f"cohort manifest {path}, line {reader.line_num}: not readable as CSV ({exc})"
        ) from None


def _jsonl_rows(path: pathlib.Path) -> list[tuple[str, object]]:
    rows = []
    for line_no, line in enumerate(_text_lines(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, row {len(rows) + 1} (line {line_no})"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            row = InvalidArgumentError(
                f"{where}: not valid JSON ({exc.msg} at character {exc.colno}); each line "
                'is one object such as {"input": "ct.nii.gz", "text": ["liver"]}'
            )
        if not isinstance(row, (dict, Exception)):
            row = InvalidArgumentError(
                f'{where}: each line must be one JSON object such as {{"input": "ct.nii.gz"}}, '
                f"got a {type(row).__name__}"
            )
        rows.append((where, row))
    return rows


def _item(manifest: pathlib.Path, n: int, where: str, row) -> CohortItem:
    """The row as an item; a value that cannot be read leaves the item with that error."""
    item = CohortItem(input="", name=f"row_{n}", where=where)
    try:
        if isinstance(row, Exception):
            raise row
        if row.get(None):  # csv.DictReader's key for fields beyond the header's
            raise InvalidArgumentError(
                f"{where}: {len(row[None])} more field(s) than the header's {len(row) - 1} columns, starting with "
                f'{row[None][0]!r}; quote a field that holds commas ("1,2,3,4,5,6") or separate numbers by spaces'
            )
        name = row.get("name")
        if name not in (None, ""):
            item.name = safe_label(str(name))
        src = _string(row, "input", where)
        if not src:
            raise InvalidArgumentError(f"{where}, column input: empty; every row needs the path of its scan")
        src_path = pathlib.Path(src).expanduser()
        item.input = str(src_path if src_path.is_absolute() else manifest.parent / src_path)
        if name in (None, ""):
            item.name = stem(item.input)
        item.text = _names(row.get("text"))
        item.box, item.points, item.point_labels = (_numbers(row.get(c), c, where) for c in NUMBER_COLUMNS)
        item.modality = _string(row, "modality", where) or None
        item.adapter = _adapter(_string(row, "adapter", where) or None, manifest.parent, where)
    except SegVolFastError as exc:
        item.error = exc
    return item


def _string(row: dict, column: str, where: str) -> Optional[str]:
    value = row.get(column)
    if value is not None and not isinstance(value, str):
        raise ArgumentTypeError(
            f"{where}, column {column}: a string is needed, got {type(value).__name__} {value!r:.60}"
        )
    return value


def _names(value):
    """ "liver; spleen" -> ["liver", "spleen"]; anything else as given, for the prompt checks."""
    if not isinstance(value, str):
        return value
    return [n.strip() for n in value.split(";") if n.strip()] or None


def _numbers(value, column: str, where: str):
    """ "1 2 3" or "1,2,3" -> [1.0, 2.0, 3.0]; a list (JSONL) as given, for the prompt checks."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        return value
    numbers = []
    for token in value.replace(",", " ").split():
        try:
            numbers.append(float(token))
        except ValueError:
            raise PromptError(
                f"{where}, column {column}: {token!r} is not a number (in {value!r:.80}); give "
                f"{NUMBER_COLUMNS[column]}, separated by spaces or commas"
            ) from None
    return numbers


def _adapter(value: Optional[str], folder: pathlib.Path, where: str) -> Optional[str]:
    """An adapter name as it is; a file path (a path separator or .safetensors, or a file that exists)
    made absolute from the manifest's folder, and refused when there is no such file."""
    if value is None or value in ("base", "auto"):
        return value
    path = folder / pathlib.Path(value).expanduser()
    if not (os.sep in value or "/" in value or value.lower().endswith(ADAPTER_SUFFIX) or path.exists()):
        return value  # a name, checked against the model's adapters when the cohort starts
    if not path.is_file():
        raise AdapterError(
            f"{where}, column adapter: no adapter file at {path} (a relative path is read from the manifest's folder)"
        )
    return str(path)


def shaped(values, width: int):
    """Flat numbers -> rows of `width` (a manifest lists boxes or points one after another);
    anything else unchanged, for `check_prompt_arguments` to accept or refuse in its own words."""
    if values is None:
        return None
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError):  # ragged lists, tensors on a GPU
        return values
    if arr.dtype.kind in "iuf" and arr.ndim == 1 and arr.size and arr.size % width == 0:
        return arr.astype(np.float64).reshape(-1, width)
    return values


def item_prompts(item: CohortItem) -> dict:
    """The item's prompts as `segment()` takes them."""
    return dict(text=item.text, box=shaped(item.box, 6), points=shaped(item.points, 3), point_labels=item.point_labels)


def check_item(item: CohortItem) -> None:
    """Raise what `segment()` would raise for the item's prompts and modality, before its scan is
    read, naming the row and the column at fault."""
    from .arguments import check_modality
    from .prompts import check_prompt_arguments

    prompts, where = item_prompts(item), item.where or item.input
    if all(prompts[c] is None for c in ("text", "box", "points")):
        raise PromptError(
            f"{where}: no prompt: "
            + ("the row's text, box and points columns are empty and " if item.where else "")
            + "the command gives none (text=, box=, points=; --text / --box / --points)"
        )
    try:
        check_prompt_arguments(**prompts)
    except (PromptError, ArgumentTypeError) as exc:  # exc.argument: the prompt argument at fault, i.e. its column
        raise type(exc)(f"{column_of(item, exc.argument)}: {exc}") from None
    try:
        check_modality(item.modality)
    except (ArgumentTypeError, InvalidArgumentError) as exc:
        raise type(exc)(f"{column_of(item, 'modality')}: {exc}") from None


def column_of(item: CohortItem, column: str) -> str:
    """Where a value of the item comes from, for messages: "m.csv, row 3 (line 4), column box"."""
    source = " (empty in the row: the command's value)" if column in item.from_command else ""
    return f"{item.where or item.input}, column {column}{source}"


def unique_names(items: list[CohortItem]) -> list[CohortItem]:
    """Output names made unique: 'ct', 'ct' -> 'ct', 'ct_2'."""
    seen: dict[str, int] = {}
    for item in items:
        n = seen.get(item.name, 0)
        seen[item.name] = n + 1
        if n:
            item.name = f"{item.name}_{n + 1}"
    return items
