"""Writing results safely: a writability pre-check, a per-output lock and all-or-nothing replacement.

A result is several files (masks, probabilities, summary.json, preview.png). Writing them one by one
into place would let an interruption, a second concurrent run or a rerun with fewer labels leave a
folder that mixes two results. So every save is a *transaction*:

* **Folder outputs** (`replace_folder`): the whole new result is written into a fresh hidden sibling
  folder `.<name>.segevol-tmp.<pid>.<hex>` (same parent, so renames are atomic), then swapped in.
  On Linux the swap is one `renameat2(RENAME_EXCHANGE)` call: the path always names a complete
  folder, even to a reader listing it during the swap. Elsewhere (or on file systems without it)
  the old folder is renamed aside to `.<name>.segevol-old.<pid>.<hex>` and the new one renamed into
  place, leaving the path missing for the instant between the two renames. The old folder is then
  deleted. A folder is therefore always exactly one complete result; files of an older run (e.g.
  masks of labels no longer asked for) disappear with it.
* **Label-map outputs** (`replace_files`, for `x.nii.gz` + `x.json` + ...): the files are written
  into the same kind of hidden staging folder; a `.commit` journal listing them is written last
  (the commit point); then each is renamed over its final name and the previous run's files that
  the new result does not have are removed.
* **Interruptions**: an exception, Ctrl-C (SIGINT) or SIGTERM while writing removes the staging
  folder and leaves the old result untouched. While a transaction runs in the main thread and
  SIGTERM has its default action (kill), SIGTERM raises `Terminated` (a `KeyboardInterrupt`)
  instead, and the default is restored afterwards; a handler of the application's own is left
  alone. During the few renames of the swap, SIGINT/SIGTERM are recorded and raised right after
  it, so a signal lands either before the swap (old result kept) or after it (new result complete).
* **Crashes** (SIGKILL, power cut between two renames): the next save of the same output, under the
  lock, finds the leftovers by their names and recovers: an aside folder is moved back when the
  target is missing (else deleted), an uncommitted staging folder is deleted, a committed one is
  rolled forward. (Durability against power loss is not attempted: nothing is fsync'ed.)
* **Concurrency**: writers of one output serialise on an advisory `fcntl.flock` of
  `<parent>/.<name>.lock`, waiting up to `lock_timeout` seconds, then fail with
  `OutputLockedError` naming the output. The lock file is removed by its holder on release. Without
  `fcntl` (Windows) there is no lock; the transaction still guarantees a complete result per save.
* **Ownership**: an existing non-empty folder is replaced only when it holds a summary.json
  written by segevol_fast (its `"writer": "segevol_fast"` field, or the key set of the summaries
  of earlier releases, which lacked it); anything else is refused with
  `OutputError`, so a mistyped `--out ~/Documents` never deletes a user's files. The same holds for
  an existing label-map sidecar (`x.json`).

`check_output_path(path)` runs the cheap checks (not a file where a folder is needed, the parent can
be created and written, the folder is ours or empty) so that a bad output fails in the first second,
before minutes of inference; the CLI calls it before loading the scan.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import pathlib
import re
import shutil
import signal
import threading
import time
import uuid
from typing import Callable, Iterator, Optional, Union

from ..errors import OutputError, OutputLockedError
from .paths import is_nifti_path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, see the module docstring
    fcntl = None

PathLike = Union[str, os.PathLike]

WRITER = "segevol_fast"  # the "writer" field of every summary.json / sidecar this package writes
SUMMARY = "summary.json"
COMMIT = ".commit"
LOCK_TIMEOUT_S = 300.0  # a full-size result with probabilities takes tens of seconds to compress
_POLL_S = 0.05
_TAG = re.compile(r"\.segevol-(tmp|old)\.(\d+)\.([0-9a-f]{8})$")


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a result was being written (raised so the write can be rolled back)."""


# ---------------------------------------------------------------------- checks
def _normalise(path: PathLike) -> pathlib.Path:
    # abspath folds '.' and '..'; an output that is a symlink is written where it points (the swap
    # would otherwise move the link itself aside)
    p = pathlib.Path(os.path.abspath(os.fspath(path)))
    if p.is_symlink():
        p = p.resolve()
    if p.parent == p:
        raise OutputError(f"cannot write a result to the file-system root {p}; give a folder or file name")
    return p


def is_ours(folder: PathLike) -> bool:
    """True when `folder` holds a summary.json written by segevol_fast."""
    return _json_is_ours(pathlib.Path(folder) / SUMMARY)


# summary.json / sidecars of releases before the "writer" field all had these keys
_LEGACY_KEYS = {"labels", "volumes_ml", "voxels", "timings_s", "spacing_mm", "affine"}


def _json_is_ours(path: pathlib.Path) -> bool:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and (d.get("writer") == WRITER or _LEGACY_KEYS <= set(d))


def _probe_writable(folder: pathlib.Path) -> None:
    """Create and remove a file in `folder`: the only test that also holds for root, read-only
    mounts and /proc (permission bits alone say nothing when running as root)."""
    probe = folder / f".segevol-probe.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write into {folder}: {exc.strerror or exc}; choose another output path") from exc


def _check_replaceable_folder(p: pathlib.Path) -> None:
    if p.is_dir() and not is_ours(p) and any(p.iterdir()):
        raise OutputError(
            f"{p} is a folder that segevol_fast did not write (no summary.json from segevol_fast) "
            "and it is not empty; refusing to replace it: give a new or empty folder"
        )


OUTPUT_FORMS = (
    "a folder (one <label>.nii.gz per mask, label_map.nii.gz, summary.json; preview.png with "
    "preview=True; segmentation.dcm for DICOM input), or a .nii / .nii.gz path for one label map "
    "(with its .json sidecar)"
)
# kinds of file a result is never written as: an output named like one is a slip, not a folder name
# (a folder name with another dot, "run.v2", stays a folder)
FILE_SUFFIXES = {
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".svg",
    ".pdf",
    ".html",  # images, pages
    ".json",
    ".csv",
    ".tsv",
    ".txt",
    ".xml",
    ".yaml",
    ".yml",  # text
    ".npy",
    ".npz",
    ".pkl",
    ".pickle",
    ".pt",
    ".pth",
    ".ckpt",
    ".safetensors",
    ".h5",
    ".hdf5",
    ".mat",  # arrays
    ".zip",
    ".gz",
    ".tgz",
    ".tar",
    ".bz2",
    ".xz",
    ".7z",  # archives (.nii.gz is a label map)
    ".dcm",
    ".dicom",
    ".ima",
    ".nrrd",
    ".nhdr",
    ".mha",
    ".mhd",
    ".mgz",
    ".mgh",
    ".img",
    ".hdr",  # other scan formats
}


def _check_folder_name(p: pathlib.Path) -> None:
    if p.is_dir() or p.suffix.lower() not in FILE_SUFFIXES:  # an existing folder stays one, whatever its name
        return
    hint = {
        ".png": "; for a preview image pass preview=True (preview.png in the folder) or call res.preview(path)",
        ".dcm": "; the DICOM-SEG is written as segmentation.dcm inside a result folder",
    }.get(p.suffix.lower(), "")
    raise OutputError(
        f"{p} ends in {p.suffix}, a kind of file segevol_fast does not write a result as; give {OUTPUT_FORMS}{hint}"
    )


def label_map_names(path: PathLike) -> tuple[str, str]:
    """(stem, sidecar name) of a label-map path: 'x.nii.gz' -> ('x', 'x.json')."""
    name = pathlib.Path(path).name
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]
    return stem, stem + ".json"


def check_output_path(path: PathLike) -> pathlib.Path:
    """Fail fast (OutputError) when a result cannot be written to `path`; returns it, absolute.

    A path ending in .nii / .nii.gz is one label-map file (its sidecar `<stem>.json` must be absent
    or written by segevol_fast); a new path ending in another file kind (`FILE_SUFFIXES`: .png,
    .json, .dcm...) is refused with the accepted forms; anything else is a folder. Checks: no
    existing file where a folder is needed (or the reverse), no folder in the path is a file, the
    nearest existing ancestor is writable (a file is created and removed there), an existing folder
    is empty or a segevol_fast result.
    Nothing is left behind: folders that do not exist yet are not created.
    """
    p = _normalise(path)
    if is_nifti_path(p):
        if p.is_dir():
            raise OutputError(f"{p} is a folder; a .nii / .nii.gz output must be a file name")
        side = p.with_name(label_map_names(p)[1])
        if side.exists() and not _json_is_ours(side):
            raise OutputError(
                f"{side} exists and was not written by segevol_fast; refusing to overwrite it: "
                "give another label-map name"
            )
    else:
        if p.exists() and not p.is_dir():
            raise OutputError(f"{p} is a file; give a folder, or a .nii / .nii.gz path for one label map")
        _check_folder_name(p)
        _check_replaceable_folder(p)
    anc = p.parent
    while not anc.exists() and anc.parent != anc:  # exists() is False below a file, too
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"cannot create {p}: {anc} is a file, not a folder")
    _probe_writable(anc)
    return p


# ---------------------------------------------------------------------- single files
def file_mode() -> int:
    """The permission bits a file this user creates gets: 0o666 less the umask.

    Every file the package writes is given them, whatever library wrote it (safetensors, for one,
    creates its files 0600), so outputs are as readable as any file the user makes."""
    try:
        with open("/proc/self/status") as fh:  # Linux: read it without changing it (thread-safe)
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read the umask is to set it
    os.umask(mask)
    return 0o666 & ~mask


def write_file_atomic(path: PathLike, write: Callable[[str], None], suffix: str = "") -> pathlib.Path:
    """Make `path` appear complete or not at all: `write(tmp)` fills a temporary name in the same
    folder (ending in `suffix`, for writers that choose the format by extension), which gets the
    mode of a normal file (`file_mode`) and is renamed over `path`. Creates missing folders.

    An OSError (permissions, a full disk, a folder at `path`) becomes OutputError naming `path`,
    never the temporary name; the temporary file is removed on any failure or interruption."""
    p = pathlib.Path(path)
    tmp = p.parent / f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        write(str(tmp))
        os.chmod(tmp, file_mode())
        os.replace(tmp, p)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(f"cannot write {p}: {exc.strerror or exc}; {_write_hint(p)}") from exc
        raise
    return p


def _write_hint(p: pathlib.Path) -> str:
    if p.is_dir():
        return "it is a folder; give a file name"
    anc = p.parent
    while not anc.exists() and anc.parent != anc:
        anc = anc.parent
    if not anc.is_dir():
        return f"{anc} is a file, not a folder; choose another path"
    try:
        _probe_writable(anc)
    except OutputError:  # permissions, a read-only mount, /proc: nothing can be created there
        return f"no file can be created in the folder {anc}; choose another path"
    return "check the free space and the path, or choose another path"


# ---------------------------------------------------------------------- lock
@contextlib.contextmanager
def output_lock(target: PathLike, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the advisory lock of one output (`<parent>/.<name>.lock`) for the `with` body.

    Waits up to `timeout` seconds for another holder, then raises OutputLockedError. The holder
    deletes the lock file before releasing it; a waiter that then wins the lock on the deleted
    file notices (its inode is no longer at the path) and tries again on a fresh one.
    """
    p = _normalise(target)
    if fcntl is None:
        yield
        return
    lock_path = p.parent / f".{p.name}.lock"
    deadline = time.monotonic() + max(0.0, float(timeout))
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create the lock file {lock_path}: {exc.strerror or exc}") from exc
        try:
            if _try_lock(fd, lock_path, deadline):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # won the lock of a file its holder had already deleted: take a fresh one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)  # closing releases the flock


def _try_lock(fd: int, lock_path: pathlib.Path, deadline: float) -> bool:
    """Lock `fd` (polling until `deadline`); True when the lock is on the file now at `lock_path`."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputError(f"cannot lock {lock_path}: {exc.strerror or exc}") from exc
        if time.monotonic() >= deadline:
            holder = _read_pid(lock_path)
            target = lock_path.parent / lock_path.name[1 : -len(".lock")]
            raise OutputLockedError(
                f"another segevol_fast run{f' (pid {holder})' if holder else ''} is writing {target}; "
                "wait for it to finish or choose another output path"
            )
        time.sleep(_POLL_S)
    try:
        return os.stat(lock_path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read_pid(lock_path: pathlib.Path) -> Optional[int]:
    try:
        return int(lock_path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------- signals
def _raise_terminated(signum, frame):
    raise Terminated(f"terminated by signal {signum} while writing a result")


def _in_main_thread() -> bool:
    # Python runs signal handlers in the main thread only, and only there may they be changed
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the body, SIGTERM raises `Terminated` instead of killing the process (when its
    action is the default one; an application's own handler is kept)."""
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Record SIGINT / SIGTERM during the renames of a swap and raise them right after it.

    (Blocking the signals with pthread_sigmask would not do: in a process with other threads, such
    as torch's, the signal is taken by another thread and the Python handler still runs here.)"""
    raising = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_terminated}
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []
    saved = {}
    for sig, handler in raising.items():
        if signal.getsignal(sig) is handler:  # only the handlers that would raise mid-swap
            saved[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    if pending:
        raising[pending[0]](pending[0], None)


# ---------------------------------------------------------------------- leftovers
def _leftovers(p: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    """This output's staging ('tmp') and aside ('old') entries in its parent, oldest first."""
    found: dict[str, list[pathlib.Path]] = {"tmp": [], "old": []}
    prefix = f".{p.name}"
    try:
        entries = list(os.scandir(p.parent))
    except FileNotFoundError:
        return found
    for e in entries:
        if e.name.startswith(prefix):
            m = _TAG.match(e.name[len(prefix) :])
            if m:
                found[m.group(1)].append(pathlib.Path(e.path))
    for v in found.values():
        v.sort(key=lambda q: q.stat().st_mtime if q.exists() else 0.0)
    return found


def recover(target: PathLike) -> None:
    """Repair what a killed save of `target` left (call under its lock; saves do it themselves).

    An aside copy of the old folder is put back when the target is missing, else deleted; a
    staging folder with a commit journal is rolled forward (label-map form), any other deleted.
    """
    p = _normalise(target)
    found = _leftovers(p)
    for stage in found["tmp"]:
        if (stage / COMMIT).is_file():
            _roll_forward(stage, p.parent)
        shutil.rmtree(stage, ignore_errors=True)
    olds = found["old"]
    if olds and not os.path.lexists(p):
        os.rename(olds.pop(), p)  # the newest aside copy is the result the crashed run replaced
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def _staging(p: pathlib.Path, kind: str) -> pathlib.Path:
    return p.parent / f".{p.name}.segevol-{kind}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------- folder transaction
@contextlib.contextmanager
def replace_folder(target: PathLike, lock_timeout: float = LOCK_TIMEOUT_S) -> Iterator[pathlib.Path]:
    """Yield an empty staging folder; when the body returns, it replaces `target` as a whole.

    On any exception (KeyboardInterrupt and SIGTERM included) the staging folder is removed and
    `target` is left as it was. See the module docstring for the guarantees.
    """
    p = _normalise(target)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p} is a file; give a folder, or a .nii / .nii.gz path for one label map")
    _make_parent(p)
    with _sigterm_raises(), output_lock(p, lock_timeout):
        recover(p)
        _check_replaceable_folder(p)
        stage = _staging(p, "tmp")
        try:
            stage.mkdir()
            yield stage
            with _signals_deferred():
                _swap_in(stage, p)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False when not available here."""
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2 = fn
        except (OSError, AttributeError, TypeError):  # no renameat2 in this libc; TypeError: Windows
            _renameat2 = False
    if _renameat2 is False:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # this file system cannot exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


_renameat2 = None  # resolved on first use: a ctypes function, or False where libc lacks it


def exchange_supported(folder: PathLike) -> bool:
    """True when folder swaps under `folder` are single atomic exchanges (see the module docstring)."""
    base = pathlib.Path(folder) / f".segevol-xchg.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    a, b = base.with_name(base.name + "a"), base.with_name(base.name + "b")
    a.mkdir()
    b.mkdir()
    try:
        return _exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


def _swap_in(stage: pathlib.Path, p: pathlib.Path) -> None:
    if not os.path.lexists(p):
        os.rename(stage, p)
        return
    if _exchange(stage, p):  # `stage` now holds the old result; a crash here leaves it to recover()
        shutil.rmtree(stage, ignore_errors=True)
        return
    aside = _staging(p, "old")
    os.rename(p, aside)
    try:
        os.rename(stage, p)
    except BaseException:
        os.rename(aside, p)  # put the old result back
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _make_parent(p: pathlib.Path) -> None:
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder {p.parent}: {exc.strerror or exc}") from exc


# ---------------------------------------------------------------------- file-group transaction
class FileGroup:
    """The staging folder of a `replace_files` transaction.

    dir:    write each file here under its final base name.
    remove: base names in the destination folder to delete at commit (a previous run's files the
            new result does not have).
    """

    def __init__(self, stage: pathlib.Path):
        self.dir = stage
        self.remove: list[str] = []


@contextlib.contextmanager
def replace_files(
    anchor: PathLike, lock_timeout: float = LOCK_TIMEOUT_S, guard: Optional[Callable[[pathlib.Path], None]] = None
) -> Iterator[FileGroup]:
    """Yield a `FileGroup`; when the body returns, its files replace their namesakes next to
    `anchor` (e.g. the label map `x.nii.gz`, which also names the lock) all together.

    `guard(folder)` runs under the lock before anything is written (ownership checks).
    """
    p = _normalise(anchor)
    _make_parent(p)
    with _sigterm_raises(), output_lock(p, lock_timeout):
        recover(p)
        if guard is not None:
            guard(p.parent)
        group = FileGroup(_staging(p, "tmp"))
        try:
            group.dir.mkdir()
            yield group
            names = sorted(e.name for e in os.scandir(group.dir))
            _check_group(names, group.remove, p.parent)
            journal = group.dir / (COMMIT + ".tmp")
            journal.write_text(json.dumps({"files": names, "remove": list(group.remove)}))
            os.replace(journal, group.dir / COMMIT)  # the commit point: after it, recover() rolls forward
        except BaseException:
            shutil.rmtree(group.dir, ignore_errors=True)
            raise
        with _signals_deferred():
            _roll_forward(group.dir, p.parent)
            shutil.rmtree(group.dir, ignore_errors=True)


def _check_group(names: list[str], remove: list[str], dest: pathlib.Path) -> None:
    """Before the commit: every rename and removal must be able to succeed, so that rolling
    forward never stops half-way."""
    for n in remove:
        if pathlib.PurePath(n).name != n or n in names or n.startswith("."):
            raise OutputError(f"refusing to remove {n!r}: not a plain file name of this result")
    for n in names:
        if (dest / n).is_dir():
            raise OutputError(f"{dest / n} is a folder; it cannot be replaced by the file of that name")


def _roll_forward(stage: pathlib.Path, dest: pathlib.Path) -> None:
    """Finish a committed file group: move its files into `dest`, delete the stale ones."""
    try:
        journal = json.loads((stage / COMMIT).read_text())
    except (OSError, ValueError):
        return  # not committed after all: the caller deletes the staging folder
    for name in journal["files"]:
        if (stage / name).exists():
            os.replace(stage / name, dest / name)
    for name in journal["remove"]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dest / name)
