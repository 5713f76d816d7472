"""Result folders are all or nothing: reruns, exceptions, signals, kills, concurrent writers, foreign folders.

Real processes are forked (numpy and nibabel only run in them), so interruptions hit a real save at a
known point: the child's save_nifti is slowed down and tells the parent when the write is under way.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from segevol_fast.errors import OutputError, OutputLockedError, SegVolFastError
from segevol_fast.inference import result_files
from segevol_fast.inference.result import SegmentationResult
from segevol_fast.io import output

SHAPE = (16, 14, 12)
FORK = multiprocessing.get_context("fork")


def _result(labels=("liver", "spleen", "left kidney"), probabilities=False, seed=0):
    rng = np.random.default_rng(seed)
    masks = {label: rng.random(SHAPE) > 0.7 for label in labels}
    probs = {k: rng.random(SHAPE).astype(np.float32) for k in labels} if probabilities else None
    return SegmentationResult(masks, np.diag([1.5, 1.5, 2.0, 1.0]), probabilities=probs, timings={"total": 1.0})


def _snapshot(folder):
    """{file name: bytes} of a folder."""
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


def _consistent(folder):
    """The folder is one complete result: summary.json lists exactly the mask files present."""
    names = set(os.listdir(folder))
    s = json.loads((folder / "summary.json").read_text())
    expected = set(s["files"].values()) | set((s["probability_files"] or {}).values()) | {"summary.json"}
    for extra in (s["preview"], s["label_map"]["file"], s.get("dicom_seg")):
        if extra:
            expected.add(extra)
    return names == expected, s


def _only(parent, *names):
    """Nothing but `names` in `parent`: no staging folder, aside copy, lock or temporary file."""
    return sorted(os.listdir(parent)) == sorted(names)


# ---------------------------------------------------------------------- in-process
def test_rerun_with_fewer_labels_leaves_only_the_new_files(tmp_path):
    out = tmp_path / "out"
    _result(probabilities=True).save(out, preview=True)
    assert len(os.listdir(out)) == 3 + 3 + 3  # masks, probabilities, label map, preview, summary
    _result(labels=("spleen",)).save(out)
    assert sorted(os.listdir(out)) == ["label_map.nii.gz", "spleen.nii.gz", "summary.json"]
    ok, s = _consistent(out)
    assert ok and s["labels"] == ["spleen"] and s["probability_files"] is None and s["preview"] is None
    assert _only(tmp_path, "out")


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_the_old_result(tmp_path, monkeypatch, exc):
    out = tmp_path / "out"
    _result(labels=("a", "b")).save(out)
    before = _snapshot(out)
    real, calls = result_files.save_nifti, []

    def failing(path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise exc
        return real(path, *a, **kw)

    monkeypatch.setattr(result_files, "save_nifti", failing)
    with pytest.raises(type(exc)):
        _result(labels=("x", "y", "z")).save(out)
    assert len(calls) == 2  # it did fail in the middle of the new result
    assert _snapshot(out) == before
    assert _only(tmp_path, "out")


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.docx").write_text("years of work")
    with pytest.raises(OutputError, match="did not write") as info:
        _result().save(out)
    assert isinstance(info.value, SegVolFastError) and isinstance(info.value, OSError)
    assert os.listdir(out) == ["thesis.docx"] and _only(tmp_path, "mine")
    with pytest.raises(OutputError, match="did not write"):
        output.check_output_path(out)
    # a summary.json that is not ours does not make it ours
    (out / "summary.json").write_text(json.dumps({"labels": []}))
    with pytest.raises(OutputError, match="did not write"):
        _result().save(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _consistent(_result().save(empty))[0]


class _VirtualClock:
    """Stands in for the `time` module of segevol_fast.io.output: a sleep advances the clock at
    once and is recorded, so a test sees how a lock waiter waits without waiting itself."""

    def __init__(self):
        self.now, self.sleeps = 1000.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.now > 1060.0:
            raise AssertionError("the lock waiter is still polling a minute past its timeout")


def test_lock_held_elsewhere_fails_clearly_and_writes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _result(labels=("a",)).save(out)
    before = _snapshot(out)
    clock = _VirtualClock()
    with output.output_lock(out):  # another open file description: conflicts even in this process
        monkeypatch.setattr(output, "time", clock)
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}.*writing {out}"):
            _result(labels=("b",)).save(out, lock_timeout=0.3)
        monkeypatch.undo()
    # the save polled the lock, with pauses, for its whole timeout and gave up right after it: a
    # waiter that fails at the first conflict, busy-spins, or ignores the timeout fails here
    assert clock.sleeps and all(s > 0 for s in clock.sleeps)
    assert 0.3 - 1e-9 <= sum(clock.sleeps) <= 0.3 + max(clock.sleeps) + 1e-9
    assert _snapshot(out) == before
    assert _only(tmp_path, "out")  # the lock file went with its holder


def test_recovery_after_a_kill_between_the_two_renames(tmp_path):
    """The fallback swap renames the old folder aside first; a SIGKILL right then leaves no folder."""
    out = tmp_path / "out"
    _result(labels=("old",)).save(out)
    before = _snapshot(out)
    aside = tmp_path / ".out.segevol-old.4242.0123abcd"
    os.rename(out, aside)
    (tmp_path / ".out.segevol-tmp.4242.89abcdef").mkdir()  # the complete or partial new one
    (tmp_path / ".out.segevol-tmp.4242.89abcdef" / "new.nii.gz").write_bytes(b"partial")
    (tmp_path / ".out2.segevol-tmp.4242.89abcdef").mkdir()  # another output's: not touched
    output.recover(out)
    assert _snapshot(out) == before
    assert _only(tmp_path, "out", ".out2.segevol-tmp.4242.89abcdef")
    # a leftover aside copy next to a present folder is deleted by the next save
    os.mkdir(aside)
    _result(labels=("new",)).save(out)
    assert _consistent(out)[1]["labels"] == ["new"]
    assert _only(tmp_path, "out", ".out2.segevol-tmp.4242.89abcdef")


def test_two_rename_fallback_swaps_too(tmp_path, monkeypatch):
    monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    _result(labels=("a",)).save(out)
    _result(labels=("b", "c")).save(out)
    assert _consistent(out)[1]["labels"] == ["b", "c"] and _only(tmp_path, "out")


# ---------------------------------------------------------------------- real processes
def _slow_save(started, seconds):
    """In a child: every save_nifti sleeps; the first one tells the parent the write is under way."""
    real = result_files.save_nifti

    def slow(path, *a, **kw):
        p = real(path, *a, **kw)
        started.set()
        time.sleep(seconds)
        return p

    result_files.save_nifti = slow


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt here, as in a terminal. A test run started in the background
    (`make test &` in a script) inherits SIGINT ignored, and Python then leaves it ignored, so
    without this the signal tests would test nothing; forked children inherit the handler."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def _child_save(out, started, labels):
    _slow_save(started, 0.5)
    _result(labels=labels, seed=1).save(out, preview=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_write_keeps_the_old_result(tmp_path, sig):
    out = tmp_path / "out"
    _result(labels=("old 1", "old 2")).save(out)
    before = _snapshot(out)
    started = FORK.Event()
    child = FORK.Process(target=_child_save, args=(out, started, ("n1", "n2", "n3", "n4")))
    child.start()
    assert started.wait(30), "the child never started writing"
    os.kill(child.pid, sig)
    child.join(30)
    # the signal was turned into an exception that rolled back (not a kill: that would be -sig)
    assert child.exitcode == 1
    assert _snapshot(out) == before
    assert _only(tmp_path, "out")


def test_sigterm_handler_is_restored_and_an_own_handler_kept(tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    _result().save(tmp_path / "o")
    assert signal.getsignal(signal.SIGTERM) is before
    seen = []
    monkeypatch.setattr(output, "_swap_in", lambda *a: seen.append(signal.getsignal(signal.SIGTERM)))
    mine = lambda signum, frame: None  # noqa: E731
    signal.signal(signal.SIGTERM, mine)
    try:
        _result().save(tmp_path / "o")
        assert seen == [mine] and signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_signal_during_the_swap_is_raised_after_it(tmp_path, monkeypatch):
    """Ctrl-C between the renames of the swap must not leave half a swap: it is raised once done."""
    out = tmp_path / "out"
    _result(labels=("old",)).save(out)
    real = output._exchange

    def interrupted(a, b):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the Python handler gets many chances to run here
        return real(a, b)

    monkeypatch.setattr(output, "_exchange", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _result(labels=("new",)).save(out)
    assert _consistent(out)[1]["labels"] == ["new"]  # the swap completed before the interrupt
    assert _only(tmp_path, "out")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigkill_mid_write_is_cleaned_by_the_next_save(tmp_path):
    out = tmp_path / "out"
    _result(labels=("old",)).save(out)
    before = _snapshot(out)
    started = FORK.Event()
    child = FORK.Process(target=_child_save, args=(out, started, ("n1", "n2")))
    child.start()
    assert started.wait(30)
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    assert _snapshot(out) == before  # readers still see the old result
    assert not _only(tmp_path, "out")  # the killed run left its staging folder and lock behind
    _result(labels=("new",)).save(out)
    assert _consistent(out)[1]["labels"] == ["new"]
    assert _only(tmp_path, "out")


def _writer(out, labels, rounds, errors):
    try:
        for i in range(rounds):
            _result(labels=labels, seed=i).save(out, lock_timeout=60)
    except BaseException as exc:  # reported to the parent, which fails the test
        errors.put(repr(exc))
        raise


def _read_consistently(out):
    """(labels, ok) of one snapshot of the folder, or None when it changed while being read."""
    try:
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return "missing"
    try:
        names = set(os.listdir(fd))
        with open("summary.json", "rb", opener=lambda p, f: os.open(p, f, dir_fd=fd)) as fh:
            s = json.loads(fh.read())
        still_there = os.stat(out).st_ino == os.fstat(fd).st_ino  # not swapped out (and deleted) meanwhile
    except (FileNotFoundError, ValueError):
        return None  # read while being deleted after a swap
    finally:
        os.close(fd)
    if not still_there:
        return None
    return s["labels"], names == set(s["files"].values()) | {"summary.json", s["label_map"]["file"]}


def test_concurrent_writers_always_leave_one_complete_result(tmp_path):
    out = tmp_path / "out"
    a, b = ("a1", "a2", "a3"), ("b1",)
    errors = FORK.Queue()
    procs = [FORK.Process(target=_writer, args=(out, labels, 25, errors)) for labels in (a, b)]
    for p in procs:
        p.start()
    seen, missing = set(), 0
    while any(p.is_alive() for p in procs):  # a reader polls the folder while both write
        snap = _read_consistently(out) if out.exists() else None
        if snap == "missing":
            missing += 1
        elif snap is not None:
            labels, ok = snap
            assert ok, f"mixed folder: summary {labels} vs files {sorted(os.listdir(out))}"
            seen.add(tuple(labels))
    for p in procs:
        p.join(60)
    assert errors.empty(), errors.get()
    assert [p.exitcode for p in procs] == [0, 0]
    assert seen <= {a, b} and seen, seen
    if output.exchange_supported(tmp_path):
        assert missing == 0  # one atomic exchange: the path always names a complete folder
    ok, s = _consistent(out)
    assert ok and tuple(s["labels"]) in (a, b)
    assert _only(tmp_path, "out")


# ---------------------------------------------------------------------- writability pre-check
def _bad_output(t, case):
    (t / "afile").write_text("x")
    if case == "folder below a file":
        return t / "afile" / "out"
    if case == "file as folder":
        return t / "afile"
    if case == "label map below a file":
        return t / "afile" / "deeper" / "x.nii.gz"
    if case == "folder as label map":
        (t / "d.nii.gz").mkdir()
        return t / "d.nii.gz"
    (t / "seg.json").write_text("{}")  # a sidecar name taken by someone else's file
    return t / "seg.nii.gz"


@pytest.mark.parametrize(
    "case, words",
    [
        ("folder below a file", "afile is a file, not a folder"),
        ("file as folder", "afile is a file; give a folder"),
        ("label map below a file", "afile is a file, not a folder"),
        ("folder as label map", "is a folder; a .nii"),
        ("foreign sidecar", "seg.json exists and was not written by segevol_fast"),
    ],
)
def test_check_output_path_refuses_unwritable_outputs(tmp_path, case, words):
    path = _bad_output(tmp_path, case)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(OutputError, match=words):
        output.check_output_path(path)
    assert sorted(os.listdir(tmp_path)) == before


def test_check_output_path_proc_and_ok_paths(tmp_path):
    with pytest.raises(OutputError, match="cannot write into /proc"):
        output.check_output_path("/proc/segevol_out")  # even root cannot create files there
    p = output.check_output_path(tmp_path / "new" / "deep" / "out")
    assert p.is_absolute() and os.listdir(tmp_path) == []  # nothing created by the check
    assert output.check_output_path(tmp_path / "x.nii.gz") == tmp_path / "x.nii.gz"


def test_save_into_an_unwritable_place_fails_before_writing(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError):
        _result().save(tmp_path / "afile" / "out")
    with pytest.raises(OutputError):
        _result().save("/proc/segevol_out/x.nii.gz")
    assert os.listdir(tmp_path) == ["afile"]


# ---------------------------------------------------------------------- label-map file groups
def test_label_map_group_recovery_rolls_committed_forward_and_drops_the_rest(tmp_path):
    r = _result(labels=("a", "b"), probabilities=True)
    r.save(tmp_path / "seg.nii.gz")
    old = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    assert sorted(old) == ["seg.json", "seg.nii.gz", "seg_prob.nii.gz"]
    # a run killed before its commit point: its staging folder is garbage
    stage = tmp_path / ".seg.nii.gz.segevol-tmp.4242.0123abcd"
    stage.mkdir()
    (stage / "seg.nii.gz").write_bytes(b"half")
    (stage / ".commit.tmp").write_text('{"files": ["seg.ni')  # killed while writing the journal
    output.recover(tmp_path / "seg.nii.gz")
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == old
    # a run killed after its commit point: finished by the next one
    stage.mkdir()
    (stage / "seg.nii.gz").write_bytes(b"new map")
    (stage / "seg.json").write_bytes(b"new sidecar")
    (stage / ".commit").write_text(json.dumps({"files": ["seg.json", "seg.nii.gz"], "remove": ["seg_prob.nii.gz"]}))
    os.replace(stage / "seg.json", tmp_path / "seg.json")  # it had moved one file already
    output.recover(tmp_path / "seg.nii.gz")
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == {
        "seg.nii.gz": b"new map",
        "seg.json": b"new sidecar",
    }


def test_label_map_group_refuses_a_folder_in_the_way_before_committing(tmp_path):
    r = _result(labels=("a",))
    (tmp_path / "seg.png").mkdir()
    with pytest.raises(OutputError, match="seg.png is a folder"):
        r.save(tmp_path / "seg.nii.gz", preview=True)
    assert sorted(os.listdir(tmp_path)) == ["seg.png"]


def test_results_of_earlier_releases_count_as_ours(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "liver.nii.gz").write_bytes(b"old mask")
    legacy = {k: {} for k in ("labels", "volumes_ml", "voxels", "timings_s", "spacing_mm", "affine")}
    (out / "summary.json").write_text(json.dumps(legacy))  # written before the "writer" field existed
    _result(labels=("spleen",)).save(out)
    assert sorted(os.listdir(out)) == ["label_map.nii.gz", "spleen.nii.gz", "summary.json"]
