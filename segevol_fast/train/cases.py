"""Training cases: where they come from and how one is loaded and preprocessed.

Case sources (each gives `Case` records; `discover_cases` picks by layout):
* Medical Segmentation Decathlon (v1) and nnU-Net v2 folders: dataset.json + imagesTr/ + labelsTr/.
  MSD: "modality" {"0": "CT"}, "labels" {"0": "background", "1": "liver"}, "training" [{"image":
  "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]. nnU-Net v2: "channel_names" {"0": "CT"},
  "labels" {"background": 0, "liver": 1}, "file_ending", images imagesTr/<case>_0000<ending>.
  Multi-channel cases use channel 0 only (MSD: the last axis of a 4-D NIfTI; nnU-Net: _0000), and
  its modality decides "ct" / "mri" (any channel name but "CT" - T2, ADC, FLAIR... - counts as MRI).
  nnU-Net region labels (a list of ids) are skipped with a warning; its "ignore" label marks
  unannotated voxels and is not a category.
* M3D-Seg (GoodBaiBai88/M3D-Seg on Hugging Face, SegVol's own training format, written by SegVol's
  data_process/train_data_process.py): <root>/<code>/<code>.json with "labels" {"0": "background",
  "1": name, ...}, "modality" {"0": "CT"} and the split lists "train" / "test" of {"image", "label"};
  each case folder holds image.npy (1, X, Y, Z) float, already foreground-normalised, and
  mask_(C, X, Y, Z).npz, a scipy CSR matrix of the (C, X*Y*Z) one-hot, channel c = label id c + 1
  (the dataset card also shows ct/<case>.npy + gt/<case>.(C, X, Y, Z).npz: accepted too).
  Confirmed from train_data_process.py and data_utils.py of BAAI-DCAI/SegVol and the dataset's
  data_load_demo.py. SegVol writes absolute paths into the json; the Hugging Face copy's demo joins
  them to the M3D_Seg root, so relative paths are tried against the root, then the code folder.
  SegVol's own loader reads the split "training"; the files it writes (and M3D-Seg) hold "train":
  both are accepted. The npz is read with numpy alone (no scipy needed). Since image.npy is
  normalised already, only min-max and the foreground crop are applied (as SegVol's loader does),
  and label names are kept as the json spells them (lower-cased): they are SegVol's trained prompts.
* `cases_from_files`: plain (image, label) pairs with one label map (e.g. TotalSegmentator ids).

Label ids found in a label volume but missing from the map are an error by default
(`unknown_labels="error"`): a silently dropped id usually means the wrong map for the data.
`unknown_labels="ignore"` drops them with a warning instead.
"""

from __future__ import annotations

import ast
import json
import math
import pathlib
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..errors import (
    DamagedFileError,
    InvalidArgumentError,
    PreprocessError,
    ShapeError,
    VolumeNotFoundError,
)
from ..io.volume import normalize_modality
from ..preprocess import preprocess

PathLike = str | pathlib.Path  # a runtime alias: Python >= 3.10
_NIFTI_ENDINGS = (".nii.gz", ".nii")


# ------------------------------------------------------------------------------------- names
def segvol_name(name: str) -> str:
    """A label id name -> the SegVol text prompt: "kidney_right" -> "right kidney",
    "inferior_vena_cava" -> "inferior vena cava", "Liver" -> "liver".

    Underscores become spaces, a trailing "_left" / "_right" moves to the front, everything is
    lower case and runs of whitespace collapse. A name already written with spaces ("kidney left",
    as some SegVol training sets spell it) keeps its word order: it is a trained prompt already.
    """
    text = str(name).strip()
    m = re.fullmatch(r"(.+)_(left|right)", text, flags=re.IGNORECASE)
    if m:
        text = f"{m.group(2)} {m.group(1)}"
    return re.sub(r"\s+", " ", text.replace("_", " ")).strip().lower()


# ------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One training case.

    image:     NIfTI file or DICOM folder (kind "volume"), or image.npy (kind "m3d").
    label:     label-map NIfTI (integer ids, (X, Y, Z)), or the M3D-Seg mask_(C, X, Y, Z).npz.
    label_map: {label id: SegVol text name}, background (0) excluded. For M3D-Seg, id c + 1 is
               mask channel c.
    modality:  "ct" | "mri".
    ignore_ids: label ids that mark unannotated voxels (nnU-Net v2's "ignore"): neither a category
               nor an unknown id.
    """

    image: pathlib.Path
    label: pathlib.Path
    label_map: Mapping[int, str]
    modality: str
    dataset: str
    case_id: str
    kind: str = "volume"
    ignore_ids: tuple[int, ...] = ()  # nnU-Net v2 "ignore" label: unannotated voxels, no category


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise VolumeNotFoundError(f"no dataset description at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DamagedFileError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _need_dir(path: pathlib.Path, what: str) -> None:
    if not path.is_dir():
        raise VolumeNotFoundError(f"{what}: no folder {path}")


def _modality_of(channels: Mapping, source: pathlib.Path) -> str:
    """Channel 0's modality name ("CT", "MRI", "T2", "FLAIR", "ADC"...) -> "ct" | "mri"."""
    if not isinstance(channels, Mapping) or not channels:
        raise InvalidArgumentError(f"{source}: the channel / modality table is missing or empty")
    name = str(channels.get("0", channels.get(0, next(iter(channels.values()))))).strip()
    # MSD and nnU-Net name MR channels by sequence (T1, T2, FLAIR, ADC, DWI...): anything not CT is MR
    return "ct" if name.lower() in ("ct", "computed tomography") else "mri"


def _label_map_from_ids(labels: Mapping, source: pathlib.Path, names_are_keys: bool) -> dict[int, str]:
    """{"1": "liver"} (MSD, M3D-Seg) or {"liver": 1} (nnU-Net v2) -> {1: "liver"}, background out."""
    if not isinstance(labels, Mapping) or not labels:
        raise InvalidArgumentError(f'{source}: "labels" is missing or empty')
    out: dict[int, str] = {}
    for key, value in labels.items():
        name, ident = (key, value) if names_are_keys else (value, key)
        if isinstance(ident, (list, tuple)):
            warnings.warn(
                f"{source}: label {name!r} is an nnU-Net region {list(ident)}; regions are skipped",
                UserWarning,
                stacklevel=3,
            )
            continue
        try:
            ident = int(ident)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"{source}: label id {ident!r} of {name!r} is not an integer") from None
        if ident != 0:
            out[ident] = str(name)
    return out


def _case_id(path: pathlib.Path, ending: str = "") -> str:
    name = path.name
    for end in ((ending,) if ending else ()) + _NIFTI_ENDINGS:
        if end and name.endswith(end):
            return name[: -len(end)]
    return path.stem


def cases_from_decathlon(root: PathLike, split: str = "training", modality: str | None = None) -> list[Case]:
    """Cases of a Medical Segmentation Decathlon (v1) task folder (dataset.json + imagesTr + labelsTr).

    modality overrides the json's channel 0 modality. Missing files are reported by
    `SegmentationDataset` when first read, so a listing stays cheap.
    """
    root = pathlib.Path(root)
    desc = _read_json(root / "dataset.json")
    _need_dir(root / "imagesTr", "MSD task"), _need_dir(root / "labelsTr", "MSD task")
    entries = desc.get(split)
    if not isinstance(entries, list) or not entries:
        raise InvalidArgumentError(f'{root / "dataset.json"} has no "{split}" list of image/label pairs')
    label_map = {k: segvol_name(v) for k, v in _label_map_from_ids(desc.get("labels"), root, False).items()}
    mod = normalize_modality(modality) or _modality_of(desc.get("modality"), root / "dataset.json")
    name = str(desc.get("name") or root.name)
    cases = []
    for e in entries:
        if not isinstance(e, Mapping) or "image" not in e or "label" not in e:
            raise InvalidArgumentError(f'{root / "dataset.json"}: entry {e!r} lacks "image" / "label"')
        image = (root / e["image"]).resolve()
        cases.append(Case(image, (root / e["label"]).resolve(), label_map, mod, name, _case_id(image)))
    return cases


def cases_from_nnunet(root: PathLike, modality: str | None = None) -> list[Case]:
    """Cases of an nnU-Net v2 raw dataset folder: every labelsTr/<case><ending> with
    imagesTr/<case>_0000<ending> (channel 0)."""
    root = pathlib.Path(root)
    desc = _read_json(root / "dataset.json")
    _need_dir(root / "imagesTr", "nnU-Net dataset"), _need_dir(root / "labelsTr", "nnU-Net dataset")
    ending = desc.get("file_ending")
    if not isinstance(ending, str) or not ending:
        raise InvalidArgumentError(f'{root / "dataset.json"} has no "file_ending"')
    label_map = {k: segvol_name(v) for k, v in _label_map_from_ids(desc.get("labels"), root, True).items()}
    ignore = tuple(k for k, v in label_map.items() if v == "ignore")  # nnU-Net v2's reserved name
    label_map = {k: v for k, v in label_map.items() if k not in ignore}
    mod = normalize_modality(modality) or _modality_of(desc.get("channel_names"), root / "dataset.json")
    name = str(desc.get("name") or desc.get("dataset_name") or root.name)
    labels = sorted(
        p for p in (root / "labelsTr").iterdir() if p.name.endswith(ending) and not p.name.startswith(".")
    )  # "._x": macOS metadata
    if not labels:
        raise VolumeNotFoundError(f"{root / 'labelsTr'} holds no *{ending} label files")
    cases = []
    for lab in labels:
        cid = lab.name[: -len(ending)]
        cases.append(Case(root / "imagesTr" / f"{cid}_0000{ending}", lab, label_map, mod, name, cid, ignore_ids=ignore))
    return cases


def _m3d_path(value: str, root: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    p = pathlib.Path(value)
    if p.is_absolute():
        return p
    for base in (root, folder):
        if (base / p).exists():
            return base / p
    return root / p  # reported as missing when read


def cases_from_m3d(root: PathLike, code: str, split: str = "train", modality: str | None = None) -> list[Case]:
    """Cases of one M3D-Seg dataset: <root>/<code>/<code>.json (see the module docstring).

    root is the M3D_Seg folder holding the dataset codes ("0000", "0011"...). Names are kept as the
    json spells them (they are the prompts SegVol was trained with), only lower-cased.
    """
    root = pathlib.Path(root)
    folder = root / code
    _need_dir(folder, f"M3D-Seg dataset {code}")
    desc = _read_json(folder / f"{code}.json")
    entries = desc.get(split)
    if entries is None and split == "train":
        entries = desc.get("training")  # what SegVol's data_utils.py reads
    if not isinstance(entries, list) or not entries:
        raise InvalidArgumentError(f'{folder / (code + ".json")} has no "{split}" list of image/label pairs')
    label_map = {
        k: re.sub(r"\s+", " ", v.strip().lower())
        for k, v in _label_map_from_ids(desc.get("labels"), folder, False).items()
    }
    mod = normalize_modality(modality) or (_modality_of(desc["modality"], folder) if desc.get("modality") else "ct")
    cases = []
    for e in entries:
        if not isinstance(e, Mapping) or "image" not in e or "label" not in e:
            raise InvalidArgumentError(f'{folder / (code + ".json")}: entry {e!r} lacks "image" / "label"')
        image = _m3d_path(e["image"], root, folder)
        cid = (
            image.parent.name if image.name == "image.npy" else _case_id(image, ".npy")
        )  # <case>/image.npy | ct/<case>.npy
        cases.append(Case(image, _m3d_path(e["label"], root, folder), label_map, mod, code, cid, "m3d"))
    return cases


def cases_from_files(
    pairs: Iterable[tuple[PathLike, PathLike]], label_map: Mapping, modality: str, dataset: str
) -> list[Case]:
    """Cases from (image, label) path pairs sharing one label map {id: name} (keys may be strings,
    as in a JSON file). Names go through `segvol_name` ("kidney_right" -> "right kidney")."""
    mod = normalize_modality(modality)
    if mod is None:
        raise InvalidArgumentError("cases_from_files needs a modality ('ct' or 'mri')")
    lmap = {k: segvol_name(v) for k, v in _label_map_from_ids(label_map, pathlib.Path(dataset), False).items()}
    cases = []
    for pair in pairs:
        if len(pair) != 2:
            raise InvalidArgumentError(f"expected (image, label) pairs, got {pair!r}")
        image, label = pathlib.Path(pair[0]), pathlib.Path(pair[1])
        cases.append(Case(image, label, lmap, mod, dataset, _case_id(image)))
    return cases


def discover_cases(root: PathLike, **kwargs) -> list[Case]:
    """Cases of a dataset folder, by its layout: dataset.json with "channel_names" -> nnU-Net v2,
    other dataset.json -> MSD; <name>/<name>.json inside -> M3D-Seg (root is then one dataset code
    folder). Keyword arguments go to the matching cases_from_* function."""
    root = pathlib.Path(root)
    if (root / "dataset.json").is_file():
        desc = _read_json(root / "dataset.json")
        return cases_from_nnunet(root, **kwargs) if "channel_names" in desc else cases_from_decathlon(root, **kwargs)
    if (root / f"{root.name}.json").is_file():
        return cases_from_m3d(root.parent, root.name, **kwargs)
    raise VolumeNotFoundError(f"{root}: no dataset.json (MSD / nnU-Net) nor {root.name}.json (M3D-Seg) found")


# ----------------------------------------------------------------------------------- loading
def _load_image(path: pathlib.Path) -> np.ndarray:
    """(X, Y, Z) voxel array of an image file or DICOM folder; a 4-D NIfTI gives channel 0."""
    from ..io import load_volume

    if str(path).endswith(_NIFTI_ENDINGS) and path.is_file():
        import nibabel as nib

        img = nib.load(str(path))
        if len(img.shape) == 4 and img.shape[3] > 1:  # MSD multi-channel (X, Y, Z, C): channel 0
            return np.asarray(img.dataobj[..., 0])
    return load_volume(path).array


def _load_label_map(case: Case) -> np.ndarray:
    """Integer (X, Y, Z) label ids of a NIfTI label file."""
    from ..io import load_volume

    if not case.label.exists():
        raise VolumeNotFoundError(f"case {case.case_id}: no label file {case.label}")
    arr = load_volume(case.label).array
    if arr.dtype.kind == "f":
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise InvalidArgumentError(f"{case.label} is not a label map: it holds non-integer values")
        arr = rounded.astype(np.int64)
    return arr


def read_m3d_mask(path: PathLike) -> np.ndarray:
    """mask_(C, X, Y, Z).npz (scipy CSR of the (C, X*Y*Z) one-hot) -> (C, X, Y, Z) bool, numpy only."""
    path = pathlib.Path(path)
    # SegVol writes mask_(C, X, Y, Z).npz; the Hugging Face copy's README shows <case>.(C, X, Y, Z).npz
    m = re.search(r"[._](\([\d,\s]+\))\.npz$", path.name)
    if not m:
        raise InvalidArgumentError(f"{path}: an M3D-Seg mask is named mask_(C, X, Y, Z).npz or <case>.(C, X, Y, Z).npz")
    shape = tuple(int(v) for v in ast.literal_eval(m.group(1)))
    if not path.is_file():
        raise VolumeNotFoundError(f"no such M3D-Seg mask file: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            fmt = z["format"].item()
            fmt = fmt.decode("ascii") if isinstance(fmt, bytes) else str(fmt)
            data, indices, indptr = z["data"], z["indices"], z["indptr"]
            stored = tuple(int(v) for v in z["shape"])
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise DamagedFileError(f"{path} is damaged or not a scipy sparse .npz ({type(exc).__name__}: {exc})") from exc
    if fmt != "csr" or len(shape) != 4 or stored != (shape[0], math.prod(shape[1:])):
        raise ShapeError(
            f"{path}: a CSR matrix of shape (C, X*Y*Z) = {(shape[0], math.prod(shape[1:]))} "
            f"was expected, got format {fmt!r} shape {stored}"
        )
    dense = np.zeros(stored, dtype=bool)
    rows = np.repeat(np.arange(stored[0]), np.diff(indptr))  # row of every stored entry
    dense[rows, indices] = data != 0
    return dense.reshape(shape)


@dataclass
class PreparedCase:
    """A case after the official preprocessing, in model axes.

    image:  (1, D', H', W') float32 in [0, 1], the foreground crop.
    labels: (C, D', H', W') bool, one mask per category present in the crop.
    names:  C SegVol names; ids: the C label ids.
    """

    image: Tensor
    labels: Tensor
    names: list[str]
    ids: list[int]
    case: Case = field(repr=False)


def _channels_from_ids(case: Case, ids_crop: np.ndarray, unknown: str) -> tuple[Tensor, list[int]]:
    present = [int(v) for v in np.unique(ids_crop) if v != 0 and int(v) not in case.ignore_ids]
    missing = [v for v in present if v not in case.label_map]
    if missing:
        msg = f"{case.label}: label ids {missing} are not in the label map of {case.dataset}"
        if unknown == "error":
            raise InvalidArgumentError(msg + " (pass unknown_labels='ignore' to drop them)")
        warnings.warn(msg + "; dropped", UserWarning, stacklevel=4)
    ids = [v for v in present if v in case.label_map]
    t = torch.from_numpy(np.ascontiguousarray(ids_crop))
    masks = torch.stack([t == v for v in ids]) if ids else torch.zeros((0,) + t.shape, dtype=torch.bool)
    return masks, ids


def _prepare_volume(case: Case, unknown: str) -> PreparedCase:
    if not case.image.exists():
        raise VolumeNotFoundError(f"case {case.case_id}: no image {case.image}")
    image = _load_image(case.image)
    label = _load_label_map(case)
    if image.shape != label.shape:
        raise ShapeError(
            f"case {case.case_id}: image {case.image} has shape {image.shape} but its labels "
            f"{case.label} have shape {label.shape}"
        )
    prep = preprocess(image)
    (z0, y0, x0), (z1, y1, x1) = prep.start, prep.end
    ids_crop = label[x0:x1, y0:y1, z0:z1].transpose(2, 1, 0)  # same box and axis reversal as the image
    masks, ids = _channels_from_ids(case, ids_crop, unknown)
    return PreparedCase(prep.image[0].contiguous(), masks, [case.label_map[i] for i in ids], ids, case)


def _prepare_m3d(case: Case) -> PreparedCase:
    """image.npy is foreground-normalised already: only min-max and the foreground crop remain
    (SegVol's loader: DimTranspose, MinMaxNormalization, CropForegroundd(select > 0))."""
    if not case.image.is_file():
        raise VolumeNotFoundError(f"case {case.case_id}: no image {case.image}")
    arr = np.load(case.image, allow_pickle=False)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ShapeError(f"{case.image}: an M3D-Seg image is (1, X, Y, Z), got {arr.shape}")
    masks = read_m3d_mask(case.label)
    if masks.shape[1:] != arr.shape:
        raise ShapeError(
            f"case {case.case_id}: image {case.image} has shape {arr.shape} but its masks "
            f"{case.label} have shape {masks.shape[1:]}"
        )
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 1, 0), dtype=np.float32))
    lo, hi = float(x.min()), float(x.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise PreprocessError(f"{case.image} is constant or not finite: nothing to segment")
    x = (x - lo) / max(hi - lo, 1e-8)
    nz = torch.nonzero(x > 0)  # CropForeground: the box of voxels > 0 after min-max
    start, end = nz.min(0).values.tolist(), (nz.max(0).values + 1).tolist()
    sl = tuple(slice(s, e) for s, e in zip(start, end))
    m = torch.from_numpy(masks.transpose(0, 3, 2, 1))[(slice(None),) + sl]
    keep = [c for c in range(m.shape[0]) if bool(m[c].any()) and (c + 1) in case.label_map]
    return PreparedCase(
        x[sl][None].contiguous(),
        m[keep].contiguous(),
        [case.label_map[c + 1] for c in keep],
        [c + 1 for c in keep],
        case,
    )


class LabelMasks(Mapping):
    """{label id: bool mask (X, Y, Z)} of one stored label volume, for the ids of the label map that
    occur in it (increasing), each mask made when asked: a TotalSegmentator map has over 100 ids, and
    all their masks at once would take 100 times the scan's size."""

    def __init__(self, ids: np.ndarray, wanted: Iterable[int]):
        self._ids = ids
        present = set(np.unique(ids).tolist())
        self._keys = [int(i) for i in sorted(wanted) if i in present]

    def __getitem__(self, key: int) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        return self._ids == key

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def original_arrays(case: Case) -> tuple[np.ndarray, Mapping[int, np.ndarray], np.ndarray | None]:
    """The case as stored, before any preprocessing: what a user would segment and score against.

    Returns image (X, Y, Z) (a 4-D NIfTI: channel 0; M3D-Seg: image.npy's only channel), {label id:
    bool mask (X, Y, Z)} for the ids of the label map that occur (`LabelMasks` for a label volume),
    and the annotated voxels (bool (X, Y, Z); None when every voxel is: no ignore label)."""
    if case.kind == "m3d":
        image = np.load(case.image, allow_pickle=False)
        image = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
        masks = read_m3d_mask(case.label)
        found = {c + 1: masks[c] for c in range(masks.shape[0]) if (c + 1) in case.label_map and masks[c].any()}
        return image, found, None
    image, ids = _load_image(case.image), _load_label_map(case)
    if image.shape != ids.shape:
        raise ShapeError(f"case {case.case_id}: image {image.shape} and labels {ids.shape} differ in shape")
    annotated = ~np.isin(ids, list(case.ignore_ids)) if case.ignore_ids else None
    return image, LabelMasks(ids, case.label_map), annotated


def prepare_case(case: Case, unknown_labels: str = "error") -> PreparedCase:
    """Load and preprocess one case (official pipeline, docs/official-pipeline.md §5.1 / §6)."""
    return _prepare_m3d(case) if case.kind == "m3d" else _prepare_volume(case, unknown_labels)
