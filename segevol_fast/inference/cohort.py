"""Cohort runs: many scans, one command, resumable, one summary.

    from segevol_fast.inference.cohort import cohort_items, segment_cohort
    items = cohort_items("scans/", text=["liver", "spleen"])      # a folder, a glob or a manifest
    rows = segment_cohort(model, items, "out/")                    # out/<scan>/ + out/cohort_summary.csv

Inputs: a folder (each NIfTI file and each DICOM series folder in it is one scan), a glob
("scans/*.nii.gz"), or a manifest: CSV with a header or JSONL, one scan per row with the columns
`input` (required; relative paths are read from the manifest's folder), `text` (names separated
by ";"), `box` (6 numbers), `points` (3k numbers), `point_labels`, `modality`, `adapter`, `name`
(output folder; default the input's stem). A row without prompts uses the command's.

Each scan's result goes to <out>/<name>/ through `SegmentationResult.save` (all or nothing), so an
interrupted run leaves no partial output and a rerun skips every scan whose folder is complete
(`resume`). A scan that fails (damaged file, bad prompt, out of memory) is recorded in the summary
with its error and the run goes on. The next scan is read from disk while the current one runs
(one loader thread). The summary CSV (`cohort_summary.csv`: status, error, seconds, peak memory,
windows and mL per label) is rewritten atomically after every scan. Under `torchrun` the cohort
is sharded over the ranks (see `segment_cohort`) with one merged summary.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import glob as globlib
import io
import json
import os
import pathlib
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

from ..errors import InvalidArgumentError, SegVolFastError, VolumeNotFoundError
from ..io import load_volume
from ..io.dicom import is_dicom_folder
from ..io.nifti import is_nifti_path
from .result import safe_label, write_bytes_atomic

MANIFEST_SUFFIXES = (".csv", ".jsonl")
SUMMARY = "cohort_summary.csv"


@dataclass
class CohortItem:
    """One scan of a cohort: its input and prompts (None: the command's)."""

    input: str
    name: str
    text: Optional[list[str]] = None
    box: Optional[list[float]] = None
    points: Optional[list[float]] = None
    point_labels: Optional[list[float]] = None
    modality: Optional[str] = None
    adapter: Optional[str] = None
    extra: dict = field(default_factory=dict)


def is_cohort_input(spec: str) -> bool:
    """A manifest, a glob, or a folder of scans (not itself one DICOM series)."""
    p = pathlib.Path(spec)
    if p.suffix.lower() in MANIFEST_SUFFIXES or globlib.has_magic(spec):
        return True
    return p.is_dir() and not is_dicom_folder(p) and bool(_folder_scans(p))


def _folder_scans(p: pathlib.Path) -> list[pathlib.Path]:
    return sorted(c for c in p.iterdir() if (c.is_file() and is_nifti_path(c)) or is_dicom_folder(c))


def _stem(path: str) -> str:
    p = pathlib.Path(path)
    name = p.name[:-7] if p.name.lower().endswith(".nii.gz") else (p.stem if p.suffix.lower() == ".nii" else p.name)
    return safe_label(name) or "scan"


def _numbers(value) -> Optional[list[float]]:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    return [float(v) for v in np.asarray(value, dtype=float).reshape(-1)]


def _names(value) -> Optional[list[str]]:
    if value is None or value == "":
        return None
    return [n.strip() for n in value.split(";") if n.strip()] if isinstance(value, str) else list(value)


def read_manifest(path: str | os.PathLike) -> list[CohortItem]:
    """Items of a CSV (with a header) or JSONL manifest; see the module docstring."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise VolumeNotFoundError(f"no cohort manifest at {path}")
    if path.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    items = []
    for i, row in enumerate(rows, 1):
        if not row.get("input"):
            raise InvalidArgumentError(f"{path}, row {i}: no 'input'")
        src = pathlib.Path(row["input"])
        src = src if src.is_absolute() else path.parent / src
        items.append(CohortItem(str(src), safe_label(row.get("name") or "") or _stem(str(src)), _names(row.get("text")),
                                _numbers(row.get("box")), _numbers(row.get("points")), _numbers(row.get("point_labels")),
                                row.get("modality") or None, row.get("adapter") or None))
    return _unique(items)


def cohort_items(spec: str, **prompts) -> list[CohortItem]:
    """Items of a folder, glob or manifest; `prompts` (text, box, points, point_labels,
    modality, adapter) fill what a manifest row leaves empty."""
    p = pathlib.Path(spec)
    if p.suffix.lower() in MANIFEST_SUFFIXES:
        items = read_manifest(p)
    else:
        paths = sorted(globlib.glob(spec)) if globlib.has_magic(spec) else [str(c) for c in _folder_scans(p)]
        if not paths:
            raise VolumeNotFoundError(f"no scans (NIfTI files or DICOM series folders) in {spec}")
        items = _unique([CohortItem(s, _stem(s)) for s in paths])
    for item in items:
        for key in ("text", "box", "points", "point_labels", "modality", "adapter"):
            if getattr(item, key) is None and prompts.get(key) is not None:
                value = prompts[key]
                setattr(item, key, [value] if key == "text" and isinstance(value, str) else value)
    return items


def _unique(items: list[CohortItem]) -> list[CohortItem]:
    """Output names made unique: 'ct', 'ct (2)' -> 'ct', 'ct_2'."""
    seen: dict[str, int] = {}
    for item in items:
        n = seen.get(item.name, 0)
        seen[item.name] = n + 1
        if n:
            item.name = f"{item.name}_{n + 1}"
    return items


def _done(folder: pathlib.Path) -> bool:
    return (folder / "summary.json").is_file()


def _write_summary(out: pathlib.Path, rows: Sequence[dict], name: str = SUMMARY) -> None:
    """The rows as CSV, replaced atomically (a reader never sees half a file)."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    write_bytes_atomic(out / name, text.getvalue().encode())


def segment_cohort(model, items: Sequence[CohortItem], out_dir: str | os.PathLike, *, resume: bool = True,
                   preview: bool = False, progress: bool = True, **segment_kwargs) -> list[dict]:
    """Segment every item into <out_dir>/<item.name>/; returns the summary rows, in item order
    (also written to <out_dir>/cohort_summary.csv). segment_kwargs go to `segment()`.

    Under torchrun (a process group of N > 1, `train.distributed.init_from_env`), rank r takes
    items r, r + N, ... and keeps its own `cohort_summary.rank<r>.csv` while running; at the end
    the rows are gathered and rank 0 writes the one merged summary, which every rank returns.
    """
    from tqdm import tqdm

    from ..train import distributed
    from .segment import segment

    rank, world = distributed.rank(), distributed.world_size()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine = [it for i, it in enumerate(items) if i % world == rank]
    name = SUMMARY if world == 1 else f"cohort_summary.rank{rank}.csv"
    rows: list[dict] = []
    todo = [it for it in mine if not (resume and _done(out / it.name))]
    rows += [{"name": it.name, "input": it.input, "status": "done before (skipped)"} for it in mine if it not in todo]
    bar = tqdm(total=len(todo), desc="cohort" if world == 1 else f"cohort rank {rank}", unit="scan",
               disable=not progress)
    with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cohort-loader") as pool:
        pending = pool.submit(_load, todo[0]) if todo else None
        for i, item in enumerate(todo):  # the next scan loads while this one runs
            loading, pending = pending, (pool.submit(_load, todo[i + 1]) if i + 1 < len(todo) else None)
            rows.append(_one(model, item, loading, out, preview, segment_kwargs, segment))
            _write_summary(out, rows, name)
            bar.update(1)
    bar.close()
    order = {it.name: i for i, it in enumerate(items)}
    merged = sorted((r for part in distributed.all_gather_objects(rows) for r in part), key=lambda r: order[r["name"]])
    if rank == 0:
        _write_summary(out, merged, SUMMARY)
    distributed.barrier()
    if world > 1:
        (out / name).unlink(missing_ok=True)
    return merged


def _load(item: CohortItem):
    return load_volume(item.input, modality=item.modality)


def _one(model, item: CohortItem, loading: cf.Future, out: pathlib.Path, preview: bool, kwargs: dict, segment) -> dict:
    row = {"name": item.name, "input": item.input}
    t = time.perf_counter()
    try:
        volume = loading.result()
        res = segment(model, volume, item.text, _box(item.box), _points(item.points), item.point_labels,
                      modality=item.modality, adapter=item.adapter, progress=False, **kwargs)
        res.save(out / item.name, preview=preview)
    except SegVolFastError as exc:  # reported, and the cohort goes on
        row.update(status="error", error=f"{type(exc).__name__}: {exc}", seconds=round(time.perf_counter() - t, 3))
        return row
    row.update(status="ok", error="", seconds=round(time.perf_counter() - t, 3), peak_memory_bytes=res.peak_memory_bytes,
               windows=json.dumps(res.zoom_in_windows or {}), adapter=res.adapter or "")
    row.update({f"ml[{k}]": round(v, 3) for k, v in res.volumes_ml().items()})
    return row


def _box(values: Optional[Sequence[float]]):
    return None if values is None else np.asarray(values, dtype=float).reshape(-1, 6).squeeze(0) \
        if len(values) == 6 else np.asarray(values, dtype=float).reshape(-1, 6)


def _points(values: Optional[Sequence[float]]):
    return None if values is None else np.asarray(values, dtype=float).reshape(-1, 3)


def iter_rows(path: str | os.PathLike) -> Iterable[dict]:
    """The rows of a cohort summary CSV."""
    with open(path, newline="") as fh:
        yield from csv.DictReader(fh)
