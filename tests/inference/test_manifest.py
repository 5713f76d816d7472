"""Manifest rows are checked once, with `segment()`'s prompt checks, and a bad value is reported
under its column."""

from __future__ import annotations

import pytest

from segevol_fast.errors import ArgumentTypeError, PromptError
from segevol_fast.inference import prompts
from segevol_fast.inference.manifest import CohortItem, check_item

WHERE = "m.csv, row 1 (line 2)"
FULL_ROW = dict(text=["liver"], box=[1, 2, 3, 10, 20, 30], points=[5, 6, 7, 8, 9, 10], point_labels=[1, 0])


def _row(**columns) -> CohortItem:
    return CohortItem(input="ct.nii.gz", name="ct", where=WHERE, **columns)


def test_a_row_is_checked_once(monkeypatch):
    calls = []
    check = prompts.check_prompt_arguments

    def counted(**given):
        calls.append(sorted(k for k, v in given.items() if v is not None))
        return check(**given)

    monkeypatch.setattr(prompts, "check_prompt_arguments", counted)
    check_item(_row(**FULL_ROW))
    assert calls == [["box", "point_labels", "points", "text"]]
    calls.clear()
    with pytest.raises(PromptError) as info:
        check_item(_row(**{**FULL_ROW, "point_labels": [1]}))
    assert str(info.value).startswith(f"{WHERE}, column point_labels: point_labels must give one label")
    assert len(calls) == 1


@pytest.mark.parametrize(
    "columns,error,message",
    [
        (dict(text=[5]), ArgumentTypeError, "column text: text prompts must be strings"),
        (dict(FULL_ROW, box=[1, 2, 3]), PromptError, "column box: box must be (6,)"),
        (dict(text=["a", "b", "c"], box=[0] * 12), PromptError, "column box: 2 boxes for 3 text prompts"),
        (dict(FULL_ROW, points=[1, 2]), PromptError, "column points: points must be (P, 3)"),
        (dict(points=[1, 2, 3], point_labels=[0]), PromptError, "column point_labels: at least one point"),
        (dict(text=["liver"], point_labels=[1]), PromptError, "column point_labels: point_labels given without"),
    ],
    ids=["text", "box-shape", "box-count", "points", "negative-only", "labels-alone"],
)
def test_the_column_at_fault_is_named(columns, error, message):
    with pytest.raises(error) as info:
        check_item(_row(**columns))
    assert str(info.value).startswith(f"{WHERE}, {message}")


def test_a_command_value_at_fault_says_so():
    item = _row(text=["a", "b", "c"], box=[0] * 12)
    item.from_command = ("box",)
    with pytest.raises(PromptError, match=r"column box \(empty in the row: the command's value\): 2 boxes"):
        check_item(item)
