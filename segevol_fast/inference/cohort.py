"""Cohort runs: many scans, one command, resumable, one summary.

    from segevol_fast.inference.cohort import cohort_items, segment_cohort
    items = cohort_items("scans/", text=["liver", "spleen"])      # a folder, a glob or a manifest
    rows = segment_cohort(model, items, "out/")                    # out/<scan>/ + out/cohort_summary.csv

Inputs: a folder (each NIfTI file and each DICOM series folder in it is one scan), a glob
("scans/*.nii.gz"), or a manifest: CSV with a header or JSONL, one scan per row with the columns
`input` (required; relative paths are read from the manifest's folder), `text` (names separated
by ";"), `box` (6 numbers), `points` (3k numbers), `point_labels`, `modality`, `adapter` (a name,
or an adapter file relative to the manifest's folder), `name` (output folder; default the input's
stem); see `inference.manifest`. A row without prompts uses the command's.

Checked before any scan is read: the command's own prompts (an error there concerns every scan and
is raised at once), then every row with `segment()`'s own checks (prompts, modality, the adapter
file; with the model: the adapter name or file, text prompts without a tokenizer). An invalid row
is recorded as failed in the summary, with an error naming the manifest, the row and the column,
and the other scans run: a cohort left to run overnight should not stop, or never start, over one
mistyped row. Fix the row and rerun: resume skips every scan already done. (`segevol-fast
segment` lists the invalid rows on stderr before the first scan, for whoever watches the start.)

Each scan's result goes to <out>/<name>/ through `SegmentationResult.save` (all or nothing), so an
interrupted run leaves no partial output and a rerun skips every scan whose folder is complete
(`resume`); a skipped scan's summary row keeps the numbers of the run that made it (from the
previous summary, else the scan's summary.json). A scan that fails at run time for any reason (a
damaged file, a bad prompt, out of memory, a bug: any Exception) is recorded in the summary with
its error and the run goes on; Ctrl-C (KeyboardInterrupt) or SystemExit stops it, after writing the
summary with the scans not run marked as such. The next scan is read from disk while the current
one runs (one loader thread). The summary CSV (`cohort_summary.csv`: status, error, seconds, peak
memory, windows and mL per label) is rewritten atomically after every scan. Under `torchrun` the
cohort is sharded over the ranks (see `segment_cohort`) with one merged summary.
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
from typing import Iterable, Optional, Sequence

from ..errors import ArgumentTypeError, SegVolFastError, VolumeNotFoundError
from ..io import load_volume
from ..io.dicom import is_dicom_folder
from ..io.paths import is_nifti_path
from .manifest import PROMPT_COLUMNS, CohortItem, check_item, column_of, item_prompts, read_manifest, stem, unique_names
from .result_files import write_bytes_atomic

MANIFEST_SUFFIXES = (".csv", ".jsonl")
SUMMARY = "cohort_summary.csv"
SKIPPED = "done before (skipped)"
NOT_RUN = "not run (interrupted)"
COMMAND_KEYS = (*PROMPT_COLUMNS, "modality", "adapter")


def is_cohort_input(spec: str) -> bool:
    """A manifest, a glob, or a folder of scans (not itself one DICOM series)."""
    p = pathlib.Path(spec)
    if p.suffix.lower() in MANIFEST_SUFFIXES or globlib.has_magic(spec):
        return True
    return p.is_dir() and not is_dicom_folder(p) and bool(_folder_scans(p))


def _folder_scans(p: pathlib.Path) -> list[pathlib.Path]:
    return sorted(c for c in p.iterdir() if (c.is_file() and is_nifti_path(c)) or is_dicom_folder(c))


def cohort_items(spec: str, **prompts) -> list[CohortItem]:
    """Items of a folder, glob or manifest; `prompts` (text, box, points, point_labels,
    modality, adapter) fill what a manifest row leaves empty. The command's prompts are checked
    first (raising, as segment() would); each item is then checked with them (`check_item`), and
    one that fails carries its error (`CohortItem.error`)."""
    unknown = set(prompts) - set(COMMAND_KEYS)
    if unknown:
        raise ArgumentTypeError(f"cohort_items() takes the prompts {COMMAND_KEYS}, not {sorted(unknown)}")
    command = {k: v for k, v in prompts.items() if v is not None}
    _check_command(command)
    p = pathlib.Path(spec)
    if p.suffix.lower() in MANIFEST_SUFFIXES:
        items = read_manifest(p)
    else:
        paths = sorted(globlib.glob(spec)) if globlib.has_magic(spec) else [str(c) for c in _folder_scans(p)]
        if not paths:
            raise VolumeNotFoundError(f"no scans (NIfTI files or DICOM series folders) in {spec}")
        items = unique_names([CohortItem(s, stem(s)) for s in paths])
    for item in items:
        own_points = item.points is not None  # the command's point_labels belong to the command's points
        filled = tuple(k for k in command if getattr(item, k) is None and not (k == "point_labels" and own_points))
        for key in filled:
            value = command[key]
            setattr(item, key, [value] if key == "text" and isinstance(value, str) else value)
        item.from_command = filled
        if item.error is None:
            try:
                check_item(item)
            except SegVolFastError as exc:
                item.error = exc
    return items


def _check_command(command: dict) -> None:
    """The command's own prompts and modality, with segment()'s checks: wrong for every scan."""
    from .arguments import check_modality
    from .prompts import check_prompt_arguments

    given = {k: command[k] for k in PROMPT_COLUMNS if k in command}
    if given:
        check_prompt_arguments(**given)
    check_modality(command.get("modality"))


def _done(folder: pathlib.Path) -> bool:
    return (folder / "summary.json").is_file()


def _write_summary(out: pathlib.Path, rows: Sequence[dict], name: str = SUMMARY) -> None:
    """The rows as CSV, replaced atomically (a reader never sees half a file)."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    write_bytes_atomic(out / name, text.getvalue().encode())


def segment_cohort(
    model,
    items: Sequence[CohortItem],
    out_dir: str | os.PathLike,
    *,
    resume: bool = True,
    preview: bool = False,
    progress: bool = True,
    **segment_kwargs,
) -> list[dict]:
    """Segment every item into <out_dir>/<item.name>/; returns the summary rows, in item order
    (also written to <out_dir>/cohort_summary.csv). segment_kwargs go to `segment()`.

    Before any scan is read: an item that carries an error, names an unknown adapter or a bad
    adapter file, or has text prompts for a model without a tokenizer is recorded as failed (when
    the bad value is the command's rather than the row's, it is raised instead: it would fail every
    scan), and segment_kwargs are checked as segment() checks them (raised). Adapter files are
    attached for the run and removed afterwards.

    Under torchrun (a process group of N > 1, `distributed.init_from_env`), rank r takes
    items r, r + N, ... and keeps its own `cohort_summary.rank<r>.csv` while running; at the end
    the rows are gathered and rank 0 writes the one merged summary, which every rank returns.
    """
    from .. import adapters, distributed

    rank, world = distributed.rank(), distributed.world_size()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine = [it for i, it in enumerate(items) if i % world == rank]
    order = {it.name: i for i, it in enumerate(items)}
    name = SUMMARY if world == 1 else f"cohort_summary.rank{rank}.csv"
    attached: dict[str, str] = {}  # adapter files attached for this run: path -> name
    try:
        checked = _check_items(model, mine, attached, segment_kwargs)
        previous = _previous_rows(out) if resume else {}
        rows = _run(
            model,
            checked,
            out,
            previous,
            resume=resume,
            preview=preview,
            progress=progress,
            kwargs=segment_kwargs,
            summary=lambda rows: _write_summary(out, _in_order(rows, order), name),
            desc="cohort" if world == 1 else f"cohort rank {rank}",
        )
    finally:
        for adapter in attached.values():
            adapters.remove_adapter(model, adapter)
    merged = _in_order((r for part in distributed.all_gather_objects(rows) for r in part), order)
    if rank == 0:
        _write_summary(out, merged, SUMMARY)
    distributed.barrier()
    if world > 1:
        (out / name).unlink(missing_ok=True)
    return merged


def _in_order(rows: Iterable[dict], order: dict[str, int]) -> list[dict]:
    return sorted(rows, key=lambda r: order[r["name"]])


def _check_items(model, items: Sequence[CohortItem], attached: dict, kwargs: dict) -> list[tuple]:
    """(item, adapter name for segment(), error or None) per item, from the checks that need the model."""
    from .adapter_scope import adapter_for
    from .arguments import SegmentOptions, check_segment_arguments, check_text_support

    checked = []
    for item in items:
        adapter, error = None, item.error
        if error is None:
            try:
                adapter = _on_column(item, "adapter", adapter_for, model, item.adapter, attached)
                _on_column(item, "text", check_text_support, model, item.text)
            except SegVolFastError as exc:
                error = exc
        checked.append((item, adapter, error))
    first = next(((item, adapter) for item, adapter, error in checked if error is None), None)
    if first is not None:  # its own values passed above: what fails here is the call's (mode, device...)
        options = SegmentOptions(modality=first[0].modality, adapter=first[1], progress=False, **kwargs)
        check_segment_arguments(model, first[0].input, **item_prompts(first[0]), options=options)
    return checked


def _on_column(item: CohortItem, column: str, check, *args):
    """check(*args), its error naming the item's row and column; raised as it is when the value is
    the command's (every scan would fail the same way)."""
    try:
        return check(*args)
    except SegVolFastError as exc:
        if column in item.from_command or item.where is None:
            raise
        raise type(exc)(f"{column_of(item, column)}: {exc}") from None


def _run(
    model,
    checked: list[tuple],
    out: pathlib.Path,
    previous: dict,
    *,
    resume: bool,
    preview: bool,
    progress: bool,
    kwargs: dict,
    summary,
    desc: str,
) -> list[dict]:
    """Rows of this rank's items: refused, skipped (done before) or run; `summary(rows)` after each."""
    from tqdm import tqdm

    from .segment import segment

    rows = [_failed(item, error) for item, _, error in checked if error is not None]
    runnable = [(item, adapter) for item, adapter, error in checked if error is None]
    done = {item.name for item, _ in runnable if resume and _done(out / item.name)}  # names are unique
    rows += [_skipped(item, out, previous) for item, _ in runnable if item.name in done]
    todo = [(item, adapter) for item, adapter in runnable if item.name not in done]
    bar = tqdm(total=len(todo), desc=desc, unit="scan", disable=not progress)
    try:
        summary(rows)
        with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cohort-loader") as pool:
            pending = pool.submit(_load, todo[0][0]) if todo else None
            for i, (item, adapter) in enumerate(todo):  # the next scan loads while this one runs
                loading, pending = pending, (pool.submit(_load, todo[i + 1][0]) if i + 1 < len(todo) else None)
                rows.append(_one(model, item, adapter, loading, out, preview, kwargs, segment))
                summary(rows)
                bar.update(1)
    except BaseException:  # Ctrl-C, SystemExit: the summary still lists every scan
        ran = {r["name"] for r in rows}
        rows += [{"name": it.name, "input": it.input, "status": NOT_RUN} for it, _ in todo if it.name not in ran]
        summary(rows)
        raise
    finally:
        bar.close()
    return rows


def _failed(item: CohortItem, error: BaseException, seconds: Optional[float] = None) -> dict:
    row = {"name": item.name, "input": item.input, "status": "error", "error": f"{type(error).__name__}: {error}"}
    if seconds is not None:
        row["seconds"] = round(seconds, 3)
    return row


def _previous_rows(out: pathlib.Path) -> dict[str, dict]:
    """The last run's summary rows by scan name; none when there is no readable summary."""
    try:
        return {r["name"]: r for r in iter_rows(out / SUMMARY) if r.get("name")}
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}


def _skipped(item: CohortItem, out: pathlib.Path, previous: dict) -> dict:
    """A finished scan's row with the numbers of the run that made it: its row in the previous
    summary, else what its summary.json records (all but the seconds)."""
    row = {"name": item.name, "input": item.input, "status": SKIPPED, "error": ""}
    before = previous.get(item.name)
    if before is not None and before.get("status") in ("ok", SKIPPED):
        return {**before, **row}
    try:
        saved = json.loads((out / item.name / "summary.json").read_text())
    except (OSError, ValueError):
        return row
    row.update(
        peak_memory_bytes=saved.get("peak_memory_bytes"),
        windows=json.dumps(saved.get("zoom_in_windows") or {}),
        adapter=saved.get("adapter") or "",
    )
    row.update({f"ml[{k}]": v for k, v in (saved.get("volumes_ml") or {}).items()})
    return row


def _load(item: CohortItem):
    return load_volume(item.input, modality=item.modality)


def _one(
    model,
    item: CohortItem,
    adapter: Optional[str],
    loading: cf.Future,
    out: pathlib.Path,
    preview: bool,
    kwargs: dict,
    segment,
) -> dict:
    from .adapter_scope import file_note

    t = time.perf_counter()
    try:
        volume = loading.result()
        res = segment(
            model, volume, **item_prompts(item), modality=item.modality, adapter=adapter, progress=False, **kwargs
        )
        if adapter is not None and adapter != item.adapter:  # attached from a file: say which
            res.notes.append(file_note(adapter, item.adapter))
        res.save(out / item.name, preview=preview)
    except Exception as exc:  # whatever it is, one scan's failure is reported and the cohort goes on
        return _failed(item, exc, time.perf_counter() - t)
    row = {
        "name": item.name,
        "input": item.input,
        "status": "ok",
        "error": "",
        "seconds": round(time.perf_counter() - t, 3),
        "peak_memory_bytes": res.peak_memory_bytes,
        "windows": json.dumps(res.zoom_in_windows or {}),
        "adapter": res.adapter or "",
    }
    row.update({f"ml[{k}]": round(v, 3) for k, v in res.volumes_ml().items()})
    return row


def iter_rows(path: str | os.PathLike) -> Iterable[dict]:
    """The rows of a cohort summary CSV."""
    with open(path, newline="") as fh:
        yield from csv.DictReader(fh)
