"""Reading and writing SegVol weights without executing pickled code.

Formats read (docs/official-pipeline.md §7):
    * an HF-style directory: config.json + model.safetensors or pytorch_model.bin (keys `model.*`)
      + tokenizer files; also our own `save_pretrained` output (safetensors, no prefix);
    * the original `SegVol_v1.pth`: {'model': {'module.*': ...}, 'optimizer', 'epoch', ...};
    * a ViT-only `vit_pretrain.ckpt`: {'state_dict': {'model.encoder.*': ...}} for encoder init;
    * a bare state dict file (.safetensors / .bin / .pt / .pth) in any of those key styles.
Pickle files go through `torch.load(weights_only=True)` (and `mmap=True` where the file allows);
safetensors files are memory-mapped by the safetensors library. A pickle that the weights-only
reader refuses (custom objects, calls such as os.system) is reported as such, never with torch's
advice to load it unsafely. Loaded tensors must be finite (`check_finite`).
"""

from __future__ import annotations

import os
import pathlib
import re
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from ..errors import CheckpointError, DamagedWeightsError, NonFiniteWeightsError

# transformers >= 4.31 made this buffer non-persistent; the official files still carry it.
POSITION_IDS_KEY = "text_encoder.clip_text_model.text_model.embeddings.position_ids"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "SegVol_v1.pth")
_SAFETENSORS_SUFFIXES = (".safetensors",)


@dataclass
class LoadedWeights:
    """A state dict with keys relative to `SegVol` (prefixes stripped) and where it came from."""

    state_dict: dict[str, torch.Tensor]
    kind: str  # "full" (whole model) or "image_encoder" (ViT-only pre-training)
    source: str
    dropped: list[str] = field(default_factory=list)  # keys deliberately ignored (e.g. position_ids)


def _not_a_checkpoint(path: pathlib.Path, head: bytes) -> str | None:
    """What the file is when its first bytes say it is not a checkpoint (None: it may be one).

    torch.load on a NIfTI or a DICOM answers with an unpickling error about "invalid load key"
    that tells the user nothing; the magic numbers of the formats people mix up say it plainly.
    """
    name = path.name.lower()
    if len(head) == 0:
        return "an empty file (0 bytes)"
    if head[:2] == b"\x1f\x8b":
        return (
            "a NIfTI image (gzip-compressed .nii.gz)"
            if name.endswith(".nii.gz")
            else "a gzip-compressed file (no checkpoint format is gzipped; a .nii.gz image?)"
        )
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return "a NIfTI image"
    if head[128:132] == b"DICM":
        return "a DICOM file"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "a PNG image"
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON / text file (config.json? give the folder or the weights file next to it)"
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _refused_objects(path: pathlib.Path, exc: BaseException) -> CheckpointError | None:
    """The error for a pickle that torch's weights-only reader refused (None for other failures).

    Such a file holds objects a weights file has no use for: a custom class, or a call such as
    os.system that the unsafe reader would run. torch's own message advises exactly that unsafe
    reader, so it is not relayed; ours says what was refused and where safe weights come from.
    """
    text = str(exc)
    if "Weights only load failed" not in text:
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text)
    what = f" (it asks for {found.group(1)})" if found else ""
    return CheckpointError(
        f"{path} holds Python objects or code besides tensors{what}, which a weights file must not "
        "contain; it was not loaded and nothing in it was run (torch's weights-only reader refused it). "
        "Get the weights as a safetensors file (model.safetensors) or a plain state dict (tensors only, "
        "as torch.save(model.state_dict(), path) writes) from a source you trust, e.g. the official "
        "BAAI/SegVol files."
    )


def _safetensors_header_ok(head: bytes) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON object
    return len(head) > 8 and head[8:9] == b"{"


def read_tensor_file(path: str | os.PathLike) -> Mapping:
    """Load a weights file without running pickled code.

    The first bytes are checked first, so an image (NIfTI, DICOM, PNG) or a JSON file given as
    weights is named for what it is, and a truncated or corrupt checkpoint is reported as damaged.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024)
    except OSError as exc:
        raise CheckpointError(f"cannot open weights file {path}: {exc.strerror or exc}") from exc
    what = _not_a_checkpoint(path, head)
    if what is not None:
        raise CheckpointError(
            f"{path} is {what}, not a checkpoint; give SegVol weights (a folder with "
            "model.safetensors or pytorch_model.bin, or SegVol_v1.pth)"
        )
    if path.suffix in _SAFETENSORS_SUFFIXES or (head[:2] != b"PK" and _safetensors_header_ok(head)):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{path} is damaged or not a safetensors file (truncated download?): {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):  # legacy (non-zip) files cannot be memory-mapped; retry plainly
            if head[:2] == b"PK" or "EOF" in str(exc):  # a zip torch cannot read, or a pickle cut short
                raise DamagedWeightsError(f"{path} is damaged (truncated download?): {_first_line(exc)}") from exc
            raise CheckpointError(f"cannot read {path} as a weights-only torch file: {exc}") from exc
    except EOFError as exc:
        raise DamagedWeightsError(f"{path} is damaged: it ends early (truncated download?)") from exc
    except Exception as exc:
        refused = _refused_objects(path, exc)
        if refused is not None:
            raise refused from None  # torch's message and traceback advise the unsafe reader
        raise CheckpointError(
            f"cannot read {path} as a weights-only torch file ({type(exc).__name__}: {exc}). "
            "segevol_fast never unpickles arbitrary objects; convert the file to safetensors."
        ) from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        refused = _refused_objects(path, exc)
        if refused is not None:
            raise refused from None  # torch's message and traceback advise the unsafe reader
        if isinstance(exc, EOFError) or "EOF" in str(exc):
            raise DamagedWeightsError(f"{path} is damaged: it ends early (truncated download?)") from exc
        raise CheckpointError(f"cannot read {path} as a weights-only torch file: {exc}") from exc


def _strip(sd: Mapping, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def normalize(obj: Mapping, source: str = "<memory>") -> LoadedWeights:
    """Recognise the checkpoint layout and return SegVol-relative keys."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], Mapping):  # SegVol_v1.pth (DataParallel)
        sd = dict(obj["model"])
        if sd and all(k.startswith("module.") for k in sd):
            sd = _strip(sd, "module.")
        return _finish(sd, "full", source)
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):  # vit_pretrain.ckpt
        inner = obj["state_dict"]
        enc = _strip(inner, "model.encoder.")
        if not enc:
            raise CheckpointError(
                f"{source}: 'state_dict' holds no 'model.encoder.*' keys (found e.g. {list(inner)[:3]})"
            )
        sd = {f"image_encoder.{k}": v for k, v in enc.items()}
        ignored = [k for k in inner if not k.startswith("model.encoder.")]
        return LoadedWeights(sd, "image_encoder", source, dropped=ignored)
    non_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(f"{source}: not a state dict; non-tensor entries {non_tensors[:5]}")
    sd = dict(obj)
    for prefix in ("model.", "module."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = _strip(sd, prefix)
            break
    return _finish(sd, "full", source)


def _finish(sd: dict, kind: str, source: str) -> LoadedWeights:
    dropped = [k for k in (POSITION_IDS_KEY,) if k in sd]
    for k in dropped:
        del sd[k]
    return LoadedWeights(sd, kind, source, dropped)


def find_weights_file(directory: str | os.PathLike) -> pathlib.Path:
    d = pathlib.Path(directory)
    for name in WEIGHT_FILES:
        if (d / name).is_file():
            return d / name
    raise CheckpointError(f"no weights in {d}: expected one of {', '.join(WEIGHT_FILES)}")


def load_weights(path: str | os.PathLike) -> LoadedWeights:
    """Read a weights file or a checkpoint directory into SegVol-relative keys; every floating-point
    tensor must be finite (NonFiniteWeightsError otherwise)."""
    p = pathlib.Path(path)
    file = find_weights_file(p) if p.is_dir() else p
    weights = normalize(read_tensor_file(file), str(file))
    check_finite(weights.state_dict, weights.source)
    return weights


_DAMAGED_ADVICE = "The file is damaged or was saved from a diverged training: use an intact copy."


def check_finite(tensors: Mapping[str, torch.Tensor], source: str, advice: str = _DAMAGED_ADVICE) -> None:
    """Refuse (NonFiniteWeightsError) floating-point tensors holding NaN or inf, naming them.

    One NaN weight turns every logit it reaches into NaN, and a NaN logit is an empty mask that
    looks like a result; one isfinite pass per tensor costs far less than the first forward.
    """
    bad = [k for k, t in tensors.items() if not all_finite(t)]
    if not bad:
        return
    first = tensors[bad[0]]
    raise NonFiniteWeightsError(
        f"{source}: tensor {bad[0]} holds {int(torch.isnan(first).sum())} NaN and {int(torch.isinf(first).sum())} "
        f"infinite values ({len(bad)} such tensor(s): {_describe(bad, 5)}). {advice}"
    )


def all_finite(t: torch.Tensor) -> bool:
    """True unless a floating-point `t` holds NaN or inf. A finite sum proves it in one vectorised
    pass (any NaN or inf makes the sum non-finite); only a non-finite sum, which huge finite values
    can also give, is settled element by element."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _describe(keys: list[str], limit: int = 40) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_and_load(
    module: nn.Module, sd: Mapping[str, torch.Tensor], source: str, *, prefix: str = "", assign: bool = False
) -> None:
    """Strict load: every key of `module` (under `prefix`) present, nothing unexpected, shapes equal.

    Raises one CheckpointError listing every missing, unexpected and mis-shaped key. With
    `assign=True` the module adopts the given tensors (for modules built on the meta device).
    """
    expected = module.state_dict()
    wanted = {prefix + k: v for k, v in expected.items()}
    missing = sorted(k for k in wanted if k not in sd)
    unexpected = sorted(k for k in sd if k not in wanted)
    mis_shaped = sorted(
        f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(v.shape)})"
        for k, v in wanted.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or mis_shaped:
        parts = [f"checkpoint {source} does not match the model"]
        if missing:
            parts.append(f"missing {len(missing)}: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_describe(unexpected)}")
        if mis_shaped:
            parts.append(f"mis-shaped {len(mis_shaped)}: {_describe(mis_shaped)}")
        parts.append("is the config right (SegVolConfig() for the official weights)?")
        raise CheckpointError("\n  ".join(parts))
    local = {k[len(prefix) :]: v for k, v in sd.items()}
    module.load_state_dict(local, strict=True, assign=assign)
    left_on_meta = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left_on_meta:  # a non-persistent buffer a checkpoint cannot fill: a bug in the module
        raise CheckpointError(f"tensors not covered by the checkpoint stayed uninitialised: {_describe(left_on_meta)}")


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write contiguous CPU copies atomically (`io.output.write_file_atomic`)."""
    from safetensors.torch import save_file

    from ..io.output import write_file_atomic

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    # a normal file's mode: safetensors alone creates its files 0600
    write_file_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "producer": "segevol_fast"}))
