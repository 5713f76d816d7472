"""Finished cases of a robustness evaluation, kept so that a rerun picks up where a run stopped.

Each finished case is one file, <out>/cases/<case id>.json, written whole or not at all, holding
its rows, its skipped organs and the settings it ran under with their fingerprint (a SHA-256 of
the settings as canonical JSON: rotations, jitters, prompt types, clicks, TTA, seed, zoom-in,
precision, the model's weights and adapters) and the case's place in the case list (its index
seeds the clicks and jitters). A rerun reuses a file only when all of that matches. A file made
under other settings is refused before any case runs, naming what differs: mixing two settings
in one table would go unnoticed, and silently discarding hours of work is no better. `restart`
removes the old files instead.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
from collections.abc import Sequence
from typing import Optional

from ..errors import DamagedFileError, InvalidArgumentError
from ..inference.result_files import write_bytes_atomic

FORMAT = 1


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _file_name(case_id: str) -> str:
    # case ids come from file names; a separator or a leading dot would still escape the folder
    return re.sub(r"[^\w.+-]", "_", case_id).lstrip(".") + ".json"


class CaseStore:
    """<out>/cases/: `load` a finished case, `save` one. `check` refuses files of other settings."""

    def __init__(self, out_dir, settings: dict, *, restart: bool = False):
        self.folder = pathlib.Path(out_dir) / "cases"
        self.settings = json.loads(json.dumps(settings))  # as it reads back: tuples become lists
        self.fingerprint = fingerprint(self.settings)
        if restart and self.folder.is_dir():
            for old in self.folder.glob("*.json"):
                old.unlink()

    def path(self, case) -> pathlib.Path:
        return self.folder / _file_name(case.case_id)

    def check(self, cases: Sequence) -> None:
        """Refuse (InvalidArgumentError) when a file of these cases was made under other settings or
        for another place in the case list; DamagedFileError for a file that is not ours."""
        problems = []
        for index, case in enumerate(cases):
            record = self._read(case)
            if record is None:
                continue
            if record.get("fingerprint") != self.fingerprint:
                differ = sorted(
                    k
                    for k in set(self.settings) | set(record.get("settings", {}))
                    if self.settings.get(k) != record.get("settings", {}).get(k)
                )
                problems.append(f"{self.path(case).name} (settings differ in: {', '.join(differ) or 'format'})")
            elif record.get("index") != index or record.get("image") != str(case.image):
                problems.append(
                    f"{self.path(case).name} (made for case #{record.get('index')} {record.get('image')}, "
                    f"now case #{index} {case.image}: the case list changed, and a case's place seeds its prompts)"
                )
        if problems:
            raise InvalidArgumentError(
                f"{self.folder} holds results of another evaluation: {'; '.join(problems)}. Rerun with the same "
                "settings and cases, choose another output folder, or start over with restart=True "
                "(segevol-fast eval-robustness --restart), which deletes them"
            )

    def load(self, case, index: int) -> Optional[dict]:
        """The finished case's record ({"rows", "skipped", ...}), or None when it has not run."""
        record = self._read(case)
        if record is None or record.get("fingerprint") != self.fingerprint or record.get("index") != index:
            return None
        return record

    def save(self, case, index: int, rows: list[dict], skipped: list[dict]) -> None:
        record = {
            "format": FORMAT,
            "case": case.case_id,
            "index": index,
            "image": str(case.image),
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "rows": rows,
            "skipped": skipped,
        }
        write_bytes_atomic(self.path(case), (json.dumps(record, indent=1) + "\n").encode())

    def _read(self, case) -> Optional[dict]:
        path = self.path(case)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DamagedFileError(f"{path} cannot be read as a finished case ({exc}); delete it or restart") from exc
        if (
            not isinstance(record, dict)
            or record.get("case") != case.case_id
            or not isinstance(record.get("rows"), list)
        ):
            raise DamagedFileError(f"{path} is not a finished case of {case.case_id}; delete it or restart")
        return record
