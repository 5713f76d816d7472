"""find_weights: explicit path, SEGEVOL_WEIGHTS, the Hugging Face cache, optional download."""

from __future__ import annotations

import os
import sys
import types

import pytest

from segevol_fast.errors import SegVolFastError, WeightsNotFoundError
from segevol_fast.model.weights import find_tokenizer, find_weights, hf_hub_dir


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No weights anywhere: env cleared, HOME pointed at an empty folder."""
    for var in ("SEGEVOL_WEIGHTS", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def _weights_dir(path, name="pytorch_model.bin"):
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_bytes(b"x")
    (path / "config.json").write_text("{}")
    return path


def _snapshot(hub, rev, with_weights=True):
    snap = hub / "models--BAAI--SegVol" / "snapshots" / rev
    snap.mkdir(parents=True)
    if with_weights:
        (snap / "pytorch_model.bin").write_bytes(b"x")
    return snap


def test_explicit_path_wins(clean_env, tmp_path, monkeypatch):
    explicit = _weights_dir(tmp_path / "mine")
    monkeypatch.setenv("SEGEVOL_WEIGHTS", str(_weights_dir(tmp_path / "env")))
    _snapshot(clean_env / ".cache" / "huggingface" / "hub", "abc")
    assert find_weights(explicit) == explicit
    pth = tmp_path / "SegVol_v1.pth"
    pth.write_bytes(b"x")
    assert find_weights(str(pth)) == pth


def test_env_before_cache(clean_env, tmp_path, monkeypatch):
    env = _weights_dir(tmp_path / "env", "model.safetensors")
    monkeypatch.setenv("SEGEVOL_WEIGHTS", str(env))
    _snapshot(clean_env / ".cache" / "huggingface" / "hub", "abc")
    assert find_weights() == env


def test_bad_explicit_or_env_path_is_an_error_not_a_fallback(clean_env, tmp_path, monkeypatch):
    _snapshot(clean_env / ".cache" / "huggingface" / "hub", "abc")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsNotFoundError, match="holds none of"):
        find_weights(empty)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        find_weights(tmp_path / "missing")
    monkeypatch.setenv("SEGEVOL_WEIGHTS", str(empty))
    with pytest.raises(WeightsNotFoundError, match=r"\$SEGEVOL_WEIGHTS"):
        find_weights()


def test_hf_cache_locations(clean_env, tmp_path, monkeypatch):
    default = _snapshot(clean_env / ".cache" / "huggingface" / "hub", "r1")
    assert hf_hub_dir() == clean_env / ".cache" / "huggingface" / "hub"
    assert find_weights() == default
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    xdg = _snapshot(tmp_path / "xdg" / "huggingface" / "hub", "r2")
    assert find_weights() == xdg
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    hf_home = _snapshot(tmp_path / "hfhome" / "hub", "r3")
    assert find_weights() == hf_home
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    hub_cache = _snapshot(tmp_path / "hubcache", "r4")
    assert find_weights() == hub_cache


def test_hf_cache_prefers_refs_main_and_skips_incomplete(clean_env, tmp_path, monkeypatch):
    hub = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    old = _snapshot(hub, "old")
    new = _snapshot(hub, "new")
    os.utime(old, (1, 1))
    assert find_weights() == new  # newest snapshot when no ref
    (hub / "models--BAAI--SegVol" / "refs").mkdir()
    (hub / "models--BAAI--SegVol" / "refs" / "main").write_text("old\n")
    assert find_weights() == old
    # an interrupted download: a dangling symlink to a blob that never arrived
    broken = _snapshot(hub, "broken", with_weights=False)
    (broken / "pytorch_model.bin").symlink_to(hub / "missing-blob")
    (hub / "models--BAAI--SegVol" / "refs" / "main").write_text("broken")
    assert find_weights() in (old, new)


def test_nothing_found_says_how_to_get_them(clean_env):
    with pytest.raises(WeightsNotFoundError) as info:
        find_weights()
    msg = str(info.value)
    for needle in (
        "BAAI/SegVol",
        "pytorch_model.bin",
        "config.json",
        "tokenizer",
        "SegVol_v1.pth",
        "--weights",
        "SEGEVOL_WEIGHTS=",
        "github.com/BAAI-DCAI/SegVol",
    ):
        assert needle in msg, needle
    assert isinstance(info.value, SegVolFastError) and isinstance(info.value, FileNotFoundError)


def test_download_only_when_asked(clean_env, tmp_path, monkeypatch):
    calls = []
    target = _weights_dir(tmp_path / "downloaded")

    def snapshot_download(repo_id, **kw):
        calls.append(repo_id)
        return str(target)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    with pytest.raises(WeightsNotFoundError):
        find_weights()
    assert calls == []
    assert find_weights(download=True) == target and calls == ["BAAI/SegVol"]

    def failing(repo_id, **kw):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=failing))
    with pytest.raises(WeightsNotFoundError, match="offline"):
        find_weights(download=True)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(WeightsNotFoundError, match="huggingface_hub is not installed"):
        find_weights(download=True)


def test_find_tokenizer(clean_env, tmp_path):
    weights = _weights_dir(tmp_path / "w")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    assert find_tokenizer(None, weights / "pytorch_model.bin", tok) == tok
    (weights / "vocab.json").write_text("{}")
    (weights / "merges.txt").write_text("")
    assert find_tokenizer(weights / "pytorch_model.bin", tok) == weights
    assert find_tokenizer(tmp_path / "nothing") is None
