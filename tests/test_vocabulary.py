"""The known-name vocabulary: its contents come from the reference, unknown names warn (never fail)."""

from __future__ import annotations

import warnings

import pytest

from segevol_fast import cli, vocabulary
from segevol_fast.errors import VocabularyWarning


def test_every_name_is_quoted_in_the_reference_section_8(reference_notes):
    text = reference_notes.read_text()
    section = text[text.index("## 8. Categories") : text.index("## 9.")].lower()
    missing = sorted(n for n in vocabulary.NAMES if n not in section)
    assert not missing, f"names not found in reference §8: {missing}"


def test_the_abdominal_defaults_and_demo_names_are_there():
    # the 13 AbdomenCT-12organ defaults and config_demo.json, exactly as §8 lists them
    for name in (
        "liver",
        "right kidney",
        "left kidney",
        "spleen",
        "pancreas",
        "aorta",
        "inferior vena cava",
        "right adrenal gland",
        "left adrenal gland",
        "gallbladder",
        "esophagus",
        "stomach",
        "duodenum",
        "kidney",
    ):
        assert vocabulary.is_known(name), name
    assert all(n == n.lower() == vocabulary.normalize(n) for n in vocabulary.NAMES)


@pytest.mark.parametrize("name", ["Liver", "  left   Kidney ", "GALLBLADDER"])
def test_case_and_spacing_do_not_matter(name):
    assert vocabulary.is_known(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails
        assert vocabulary.check_names([name]) == []


def test_unknown_names_warn_with_suggestions_and_return_them():
    with pytest.warns(VocabularyWarning) as rec:
        unknown = vocabulary.check_names(["liver", "kidney_left", "brain stem", "kidney_left"])
    assert unknown == ["kidney_left", "brain stem"]
    assert len(rec) == 1  # one warning per call, listing every unknown name once
    msg = str(rec[0].message)
    assert "'kidney_left'" in msg and "'brain stem'" in msg and "'liver'" not in msg.split("closest")[0]
    assert "closest known: 'kidney left'" in msg
    assert "segevol-fast vocabulary" in msg and "known subset" in msg


def test_vocabulary_warning_is_a_user_warning_that_can_be_filtered():
    assert issubclass(VocabularyWarning, UserWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=VocabularyWarning)
        assert vocabulary.check_names("white matter") == ["white matter"]


def test_cli_vocabulary_lists_the_names(capsys):
    assert cli.main(["vocabulary", "--plain"]) == 0
    lines = capsys.readouterr().out.split()
    assert "liver" in lines and "trachea" in lines
    assert cli.main(["vocabulary"]) == 0
    out = capsys.readouterr().out
    assert "known subset" in out and "AbdomenCT-12organ" in out and "inferior vena cava" in out
