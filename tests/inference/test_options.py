"""`SegmentOptions`: a call's settings, checked once when made, with the errors `segment()` has
always raised; `model.segment`, `sess.segment`, sessions and `segment_batch` build it once and the
layers below take it as it is."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from segevol_fast.errors import AdapterError, ArgumentTypeError, SegVolFastError, VolumeNotFoundError
from segevol_fast.inference import SegmentOptions, segment_batch
from tests.test_bad_inputs import ARGUMENT_CASES, BOX, MISSING  # MISSING: a check that reads it fails the test

pytestmark = pytest.mark.usefixtures("one_thread")

# segment()'s bad-argument cases that are settings (not prompts): (id, settings, error class, phrase)
BAD_OPTIONS = [c for c in ARGUMENT_CASES if set(c[1]) <= {f.name for f in dataclasses.fields(SegmentOptions)}]
IDS = [c[0] for c in BAD_OPTIONS]
SESSION_KEYS = ("modality", "max_memory", "device", "series", "precision", "adapter")  # model.session(...)'s
CALL_KEYS = ("coords", "zoom_in", "progress", "return_probabilities")  # sess.segment(...)'s


@pytest.fixture
def scan():
    rng = np.random.default_rng(0)
    return (rng.random((40, 40, 12)) * 100).astype(np.float32)


def _error(call) -> SegVolFastError:
    with pytest.raises(SegVolFastError) as info:
        call()
    return info.value


@pytest.mark.parametrize("settings,error,phrase", [c[1:] for c in BAD_OPTIONS], ids=IDS)
def test_a_bad_setting_fails_when_the_options_are_made(settings, error, phrase):
    with pytest.raises(error, match=phrase):
        SegmentOptions(**settings)
    with pytest.raises(error, match=phrase):  # a variant is checked too
        dataclasses.replace(SegmentOptions(), **settings)


@pytest.mark.parametrize("settings,error,phrase", [c[1:] for c in BAD_OPTIONS], ids=IDS)
def test_every_entry_point_raises_the_options_error(tiny_model, scan, settings, error, phrase):
    """The same class and message from the options, model.segment, model.session / sess.segment
    (whichever takes the setting) and segment_batch, before any scan is read."""
    (key,) = settings
    expected = _error(lambda: SegmentOptions(**settings))
    assert type(expected) is error and phrase in str(expected)
    calls = [lambda: tiny_model.segment(MISSING, box=BOX, **{"progress": False, **settings})]
    if key in SESSION_KEYS:
        calls.append(lambda: tiny_model.session(MISSING, **settings))
    if key in CALL_KEYS:
        sess = tiny_model.session(scan)
        calls.append(lambda: sess.segment(box=BOX, **settings))
    if key not in ("modality", "adapter", "mode"):  # segment_batch's own: one per scan; fast mode only
        calls.append(lambda: segment_batch(tiny_model, [MISSING], [None], box=BOX, **settings))
    for call in calls:
        got = _error(call)
        assert not isinstance(got, VolumeNotFoundError)  # refused before the scan was opened
        assert (type(got), str(got)) == (type(expected), str(expected))


def _count_checks(monkeypatch) -> list:
    """Every SegmentOptions check from now on appends to the returned list."""
    made = []
    check = SegmentOptions.__post_init__

    def counted(self):
        made.append(self)
        check(self)

    monkeypatch.setattr(SegmentOptions, "__post_init__", counted)
    return made


def test_segment_and_a_session_call_make_and_check_the_options_once(tiny_model, scan, monkeypatch):
    sess = tiny_model.session(scan)
    made = _count_checks(monkeypatch)
    res = tiny_model.segment(scan, box=BOX, zoom_in=False, progress=False)
    assert len(made) == 1 and made[0].zoom_in is False and res.labels == ["box 0"]
    made.clear()
    sess.segment(box=BOX, coords="voxel", return_probabilities=True)
    (options,) = made
    assert options.mode == "fast" and options.return_probabilities and options.modality == sess.modality
    made.clear()
    sess.refine("box 0", points=[[5, 5, 5]], point_labels=[0])
    assert len(made) == 1


def test_a_session_keeps_its_options_and_calls_vary_them(tiny_model, scan):
    sess = tiny_model.session(scan, max_memory="8GB", precision="fp32", modality="ct")
    assert dataclasses.astuple(sess.options) == dataclasses.astuple(
        SegmentOptions(mode="fast", modality="ct", max_memory="8GB", precision="fp32", progress=False)
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        sess.options.mode = "exact"
    with pytest.raises(TypeError):  # a session runs fast mode: refine takes only the call's own settings
        sess.refine("liver", points=[[5, 5, 5]], mode="exact")


def test_the_adapter_name_is_checked_against_the_model(tiny_model):
    options = SegmentOptions(adapter="no_such_adapter")  # a name: which ones exist is the model's to say
    with pytest.raises(AdapterError, match="no adapter named 'no_such_adapter'"):
        tiny_model.segment(MISSING, box=BOX, adapter=options.adapter)


def test_segment_batch_takes_one_adapter_per_scan_not_adapter(tiny_model):
    with pytest.raises(ArgumentTypeError, match="adapters="):
        segment_batch(tiny_model, [MISSING], [None], box=BOX, adapter="base")
