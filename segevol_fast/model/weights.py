"""Finding the official SegVol weights on this machine.

Search order of `find_weights`:
    1. an explicit path (the CLI's `--weights`): a folder or a weights file;
    2. the environment variable SEGEVOL_WEIGHTS (same);
    3. a local Hugging Face cache of BAAI/SegVol: <hub>/models--BAAI--SegVol/snapshots/<rev>/,
       <hub> = $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
       ~/.cache/huggingface/hub (read directly: huggingface_hub is not needed for this);
    4. only with download=True: huggingface_hub.snapshot_download("BAAI/SegVol").
A path given in 1 or 2 that holds no weights is an error, not a reason to look further: the user
asked for those weights.

`resolve_pretrained` gives `SegVol.from_pretrained` the same search for the Hugging Face names
"BAAI/SegVol" / "SegVol" when no local file or folder of that name exists (a real one wins).
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional, Union

from ..errors import WeightsNotFoundError
from .checkpoint import WEIGHT_FILES

PathLike = Union[str, os.PathLike]
HF_REPO = "BAAI/SegVol"
ENV_VAR = "SEGEVOL_WEIGHTS"
# what the snapshot download needs: weights, config and tokenizer (not the README's demo case)
_DOWNLOAD_PATTERNS = ["*.json", "*.txt", "pytorch_model.bin", "model.safetensors"]

HOW_TO = f"""\
Get the official SegVol weights in one of these ways:
  1. From the Hugging Face repository {HF_REPO} (https://huggingface.co/{HF_REPO}): pytorch_model.bin
     + config.json + the tokenizer files (tokenizer.json, vocab.json, merges.txt,
     tokenizer_config.json, special_tokens_map.json) in one folder, e.g.
         hf download {HF_REPO} --local-dir ~/segvol
     (or `huggingface_hub.snapshot_download("{HF_REPO}")`, which fills the cache searched here).
  2. SegVol_v1.pth from the official GitHub README (https://github.com/BAAI-DCAI/SegVol); put the
     tokenizer files above next to it (text prompts need them).
Then pass --weights DIR (or the file) on the command line or SegVol.from_pretrained(DIR) in Python,
or set {ENV_VAR}=DIR (then --weights and SegVol.from_pretrained("{HF_REPO}") find them)."""
# names from_pretrained treats as the Hugging Face repository when no such local path exists
HUB_NAMES = frozenset({HF_REPO.lower(), HF_REPO.split("/")[1].lower()})


def hf_hub_dir() -> pathlib.Path:
    """The Hugging Face hub cache folder, resolved the way huggingface_hub resolves it."""
    if os.environ.get("HF_HUB_CACHE"):
        return pathlib.Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return pathlib.Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _has_weights(folder: pathlib.Path) -> bool:
    # is_file() follows the cache's symlinks: a dangling one (interrupted download) does not count
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def _checked(path: pathlib.Path, where: str) -> pathlib.Path:
    path = path.expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if _has_weights(path):
            return path
        raise WeightsNotFoundError(
            f"{where} points to {path}, which holds none of {', '.join(WEIGHT_FILES)}.\n{HOW_TO}"
        )
    raise WeightsNotFoundError(f"{where} points to {path}, which does not exist.\n{HOW_TO}")


def find_in_hf_cache(hub: Optional[pathlib.Path] = None) -> Optional[pathlib.Path]:
    """The BAAI/SegVol snapshot folder with weights in the local HF cache, or None.

    Prefers the revision `refs/main` names; otherwise the most recently modified snapshot.
    """
    repo = (hub or hf_hub_dir()) / ("models--" + HF_REPO.replace("/", "--"))
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        main = snaps / ref.read_text().strip()
        if main.is_dir() and _has_weights(main):
            return main
    found = [d for d in snaps.iterdir() if d.is_dir() and _has_weights(d)]
    return max(found, key=lambda d: d.stat().st_mtime) if found else None


def _download() -> tuple[Optional[pathlib.Path], str]:
    """(snapshot folder or None, why not)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None, "download=True, but huggingface_hub is not installed (pip install huggingface_hub)"
    try:
        path = pathlib.Path(snapshot_download(HF_REPO, allow_patterns=_DOWNLOAD_PATTERNS))
    except Exception as exc:  # network, auth, disk: report the cause and the manual route
        return None, f"downloading {HF_REPO} failed: {type(exc).__name__}: {exc}"
    return (path, "") if _has_weights(path) else (None, f"the download of {HF_REPO} holds no weights file")


def find_weights(explicit: Optional[PathLike] = None, download: bool = False) -> pathlib.Path:
    """Return the folder (or file) of the SegVol weights to pass to `SegVol.from_pretrained`.

    explicit: a folder or file given by the user (e.g. `--weights`); wins over everything.
    download: when nothing is found locally, try `huggingface_hub.snapshot_download("BAAI/SegVol")`.
    Raises WeightsNotFoundError (message: where it looked, how to get the weights).
    """
    given = "--weights (not given)"
    if explicit is not None and str(explicit) != "":
        if not _is_hub_name(explicit):
            return _checked(pathlib.Path(explicit), "--weights")
        given = f"--weights {str(explicit)!r} (no such local path: taken as the Hugging Face name {HF_REPO})"
    return _search(download, f"SegVol weights not found. Looked at: {given}", "")


def _search(download: bool, asked: str, not_downloading: str) -> pathlib.Path:
    """The shared search of `find_weights` and `resolve_pretrained`: $SEGEVOL_WEIGHTS, then the
    Hugging Face cache, then (download=True) the Hub. Otherwise WeightsNotFoundError: `asked` (what
    was asked for), where it looked, why nothing was downloaded (`not_downloading` when download is
    False), and HOW_TO."""
    env = os.environ.get(ENV_VAR)
    if env:
        return _checked(pathlib.Path(env), f"${ENV_VAR}")
    hub = hf_hub_dir()
    cached = find_in_hf_cache(hub)
    if cached is not None:
        return cached
    why = not_downloading
    if download:
        found, why = _download()
        if found is not None:
            return found
    cache = hub / ("models--" + HF_REPO.replace("/", "--"))
    looked = f"{asked}; ${ENV_VAR} is not set; the Hugging Face cache {cache} has no snapshot with weights."
    raise WeightsNotFoundError("\n".join(s for s in (looked, why, HOW_TO) if s))


def find_tokenizer(*candidates: Optional[PathLike]) -> Optional[pathlib.Path]:
    """The first folder holding the CLIP tokenizer files (tokenizer.json, or vocab.json +
    merges.txt) among `candidates` (folders, or weights files whose folder is searched), then the
    BAAI/SegVol snapshot in the HF cache. None when there is none (text prompts then cannot run).
    """
    folders = []
    for c in candidates:
        if c is not None and str(c) != "":
            p = pathlib.Path(c).expanduser()
            folders.append(p.parent if p.is_file() else p)
    cached = find_in_hf_cache()
    if cached is not None:
        folders.append(cached)
    for f in folders:
        if (f / "tokenizer.json").is_file() or ((f / "vocab.json").is_file() and (f / "merges.txt").is_file()):
            return f
    return None


def _is_hub_name(name: PathLike) -> bool:
    """True for "BAAI/SegVol" / "SegVol" (any case) when no local file or folder has that name."""
    return str(name).strip().lower() in HUB_NAMES and not pathlib.Path(name).expanduser().exists()


def resolve_pretrained(name: PathLike, download: bool = False) -> pathlib.Path:
    """The local path `SegVol.from_pretrained(name)` loads.

    An existing file or folder is returned as is (a local folder called "SegVol" wins). The names
    "BAAI/SegVol" and "SegVol" (any case) without a local copy are searched like the CLI's weights:
    $SEGEVOL_WEIGHTS, then the Hugging Face cache, then (download=True) the Hub; when none has them,
    WeightsNotFoundError says where it looked and how to get them. Any other missing path is
    returned unchanged for the loader to report.
    """
    if not _is_hub_name(name):
        return pathlib.Path(name).expanduser()
    return _search(
        download,
        f"SegVol.from_pretrained({str(name)!r}): no local file or folder of that name",
        "download=False (pass download=True to fetch it with huggingface_hub, network needed)",
    )
