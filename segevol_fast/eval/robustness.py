"""How much a model's Dice falls when the scan is rotated or the prompts are drawn imprecisely.

    from segevol_fast.eval import robustness
    report = robustness(model, cases, out_dir="robustness/")   # table, JSON and plot in robustness/
    print(report.table())

Each case is read as stored (`train.cases.original_arrays`) and segmented with `model.session()`'s
zoom-out-zoom-in, then scored on its own grid against its labels, under these perturbations:

  none          the scan as stored, every prompt type;
  rotation      the scan's content and labels rotated in world millimetres about the grid's
                centre (`rotation.rotate_scan`: image trilinear, labels nearest neighbour) and the
                prompts derived again from the rotated labels, every prompt type. An organ that
                the rotation carries off the grid is skipped and counted (`report.skipped`);
  box_jitter    the unrotated scan, each corner coordinate of the organ's box moved by up to the
                given voxels (`jitter.jitter_box`), for the prompt types with a box;
  point_jitter  the unrotated scan, each coordinate of each click moved likewise
                (`jitter.jitter_points`), for the prompt types with points.

Prompt types: "text" (the organ's name), "box" (its ground-truth bounding box), "points" (`points`
clicks inside it, preferring its interior), "text+box" and "text+points" (both in one call). Clicks
are drawn from a generator seeded by (seed, case index, label id), the jitters from one seeded
by (seed, case index, label id, voxels) and the jitter kind: a rerun draws the same prompts, and
"box" and "text+box" see the same jittered box. A (case, rotation) opens one session (with TTA,
one per view), which every prompt type and jitter on it reuses.

`tta=k` segments every perturbed scan with k views rotated about the long axis (`tta.py`).

With `out_dir`, every finished case is kept (`resume.CaseStore`) and a rerun skips it; the table
(robustness.csv), the JSON (robustness.json) and the plot (robustness.png) are written at the end.
"""

from __future__ import annotations

import hashlib
import numbers
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .. import adapters
from ..errors import ArgumentTypeError, InvalidArgumentError
from ..inference.adapter_scope import attach_for_every_scan
from ..inference.arguments import SegmentOptions, check_adapter, check_text_support
from ..train.cases import Case, LabelMasks, original_arrays
from ..train.datasets import sample_seed
from ..train.encode import encode_names
from ..train.metrics import dice
from ..train.validation import ORGANS_PER_CALL, organ_box, organ_clicks
from .jitter import jitter_box, jitter_points
from .plot import require_matplotlib
from .report import RobustnessReport
from .resume import CaseStore
from .rotation import PUBLISHED, Rotation, rotate_scan, sweep
from .tta import RotatedViews, check_tta, session_opener

PROMPTS = ("text", "box", "points", "text+box", "text+points")
BOX_JITTER = (1, 5, 10, 50)
POINT_JITTER = (1, 5, 10)
_BOX_DRAWS, _POINT_DRAWS = 1, 2  # the last seed part: the two jitters never share a stream
_UNANNOTATED = -1  # in the label-id map: voxels under an "ignore" label, scored by neither side


@dataclass(frozen=True)
class Setting:
    """One perturbation setting: the row columns it fills, and the rotation or jitter it applies."""

    perturbation: str
    setting: str
    axis: Optional[str] = None
    angle_deg: Optional[float] = None
    voxels: Optional[int] = None
    rotation: Optional[Rotation] = None

    def columns(self) -> dict:
        return {k: getattr(self, k) for k in ("perturbation", "setting", "axis", "angle_deg", "voxels")}

    @classmethod
    def of_rotation(cls, rotation: Rotation) -> "Setting":
        turned = [(a, d) for a, d in zip("xyz", rotation.angles_deg) if d % 360.0 != 0.0]
        axis = "".join(a for a, _ in turned) or None
        angle = turned[0][1] if len(turned) == 1 else None
        return cls("rotation", rotation.name, axis, angle, rotation=rotation)


NONE = Setting("none", "none")


def robustness(
    model,
    cases: Sequence[Case],
    *,
    rotations: Sequence[Rotation] = (PUBLISHED, *sweep()),
    box_jitter: Sequence[int] = BOX_JITTER,
    point_jitter: Sequence[int] = POINT_JITTER,
    prompts: Sequence[str] = PROMPTS,
    points: int = 1,
    adapter: Optional[str] = None,
    tta: Optional[int] = None,
    out_dir=None,
    seed: int = 0,
    zoom_in: bool = True,
    precision: str = "auto",
    progress: bool = True,
    restart: bool = False,
) -> RobustnessReport:
    """Dice of `model` on `cases` unperturbed, rotated and with jittered prompts (module docstring).

    model: a SegVol. cases: `Case`s (`train.cases.discover_cases`, `cases_from_files`).
    rotations: `Rotation`s with distinct names (`rotation.PUBLISHED`, `rotation.sweep()`); () for none.
    box_jitter, point_jitter: jitters in voxels, distinct ints >= 0; () for none.
    prompts: prompt types among PROMPTS. points: clicks per organ for the point prompts.
    adapter: segment()'s (None: the model as set; "base"; an adapter's name; "auto") or the path
        of an adapter file, attached for the run and removed after it.
    tta: None, or k views rotated about the long axis per segmentation (1 is the same as None).
    out_dir: where finished cases are kept and the table, JSON and plot are written; a rerun skips
        finished cases, refuses cases finished under other settings, and with `restart` discards them.
    seed: seeds clicks and jitters. zoom_in, precision: segment()'s. progress: a bar over
        (case, perturbation setting) units.

    Returns a `RobustnessReport`. The model is put back in its train / eval mode."""
    cases, prompts, rotations = _checked_cases(cases), _checked_prompts(prompts), _checked_rotations(rotations)
    box_jitter, point_jitter = _checked_jitter(box_jitter, "box_jitter"), _checked_jitter(point_jitter, "point_jitter")
    _check_run_arguments(model, prompts, points, seed, tta, adapter, zoom_in, precision)
    if out_dir is not None:
        require_matplotlib()  # the plot is the last step: a missing package must not cost the whole run
    settings = {
        "rotations": [[r.name, list(r.angles_deg)] for r in rotations],
        "box_jitter": list(box_jitter),
        "point_jitter": list(point_jitter),
        "prompts": list(prompts),
        "points": int(points),
        "tta": None if tta is None else int(tta),
        "seed": int(seed),
        "zoom_in": zoom_in,
        "precision": precision,
        "adapter": _adapter_identity(adapter),
        "model": _model_identity(model),
    }
    store = None
    if out_dir is not None:
        store = CaseStore(out_dir, settings, restart=restart)
        store.check(cases)  # refused before the first case, not after hours of them

    has_box, has_points = any("box" in p for p in prompts), any("points" in p for p in prompts)
    per_rotation = [NONE] + [Setting.of_rotation(r) for r in rotations]
    jitters = [Setting("box_jitter", str(v), voxels=v) for v in (box_jitter if has_box else ())]
    jitters += [Setting("point_jitter", str(v), voxels=v) for v in (point_jitter if has_points else ())]
    was_training = model.training
    active, attached = attach_for_every_scan(model, adapter) if _is_file(adapter) else (adapter, None)
    try:
        model.eval()
        run = _CaseRun(model, prompts, points, seed, zoom_in, tta or 1, dict(adapter=active, precision=precision))
        rows, skipped = _run_cases(run, cases, store, per_rotation, jitters, progress)
    finally:
        model.train(was_training)
        if attached is not None:
            adapters.remove_adapter(model, attached)

    report = RobustnessReport(rows, skipped, settings)
    if out_dir is not None:
        out = pathlib.Path(out_dir)
        report.to_csv(out / "robustness.csv")
        report.to_json(out / "robustness.json")
        report.plot(out / "robustness.png")
    return report


def _run_cases(run: "_CaseRun", cases, store: Optional[CaseStore], per_rotation, jitters, progress: bool):
    """Every case's rows and skipped organs: read back when the store has it, else evaluated (and
    kept). The progress bar steps once per (case, setting)."""
    from tqdm.auto import tqdm

    units = len(per_rotation) + len(jitters)
    rows: list[dict] = []
    skipped: list[dict] = []
    with tqdm(total=len(cases) * units, desc="robustness", unit="setting", disable=not progress) as bar:
        for index, case in enumerate(cases):
            record = store.load(case, index) if store is not None else None
            if record is None:
                case_rows, case_skipped = run.evaluate(case, index, per_rotation, jitters, bar)
                if store is not None:
                    store.save(case, index, case_rows, case_skipped)
            else:
                case_rows, case_skipped = record["rows"], record["skipped"]
                bar.update(units)
            rows += case_rows
            skipped += case_skipped
    return rows, skipped


class _CaseRun:
    """Evaluates one case under every setting; holds what the cases share."""

    def __init__(self, model, prompts, points: int, seed: int, zoom_in: bool, views: int, session_options: dict):
        self.model, self.prompts, self.points, self.seed, self.zoom_in = model, prompts, points, seed, zoom_in
        self.views, self.session_options = views, session_options

    def evaluate(self, case: Case, index: int, per_rotation, jitters, bar) -> tuple[list[dict], list[dict]]:
        image, masks, annotated = original_arrays(case)
        affine = case_affine(case)
        organs = list(masks)
        ids = _id_map(masks, annotated, image.shape)
        del masks
        opener = session_opener(self.model, modality=case.modality, **self.session_options)
        rows, skipped = [], []
        for setting in per_rotation:
            if setting.rotation is None:
                scan, scan_ids, present = image, ids, organs
            else:
                scan, scan_ids = rotate_scan(image, affine, setting.rotation, ids)
                found = set(np.unique(scan_ids).tolist())
                present = [i for i in organs if i in found]
                skipped += [
                    {"case": case.case_id, "organ": case.label_map[i], "setting": setting.setting}
                    for i in organs
                    if i not in found
                ]
            views = RotatedViews(opener, scan, affine, self.views)
            truth = LabelMasks(scan_ids, present)
            for s in [setting] + (jitters if setting.rotation is None else []):  # jitter on the scan as stored
                bar.set_postfix_str(f"{case.case_id} {s.perturbation} {s.setting}", refresh=False)
                rows += self._score(case, index, views, truth, scan_ids, s)
                bar.update(1)
            del views  # its sessions go before the next rotation's are opened
        return rows, skipped

    def _score(self, case: Case, index: int, views, truth: LabelMasks, ids: np.ndarray, setting: Setting) -> list:
        kinds = [p for p in self.prompts if _applies(p, setting)]
        annotated = ids != _UNANNOTATED if case.ignore_ids else None
        rows = []
        organs = list(truth)
        for start in range(0, len(organs), ORGANS_PER_CALL):
            chunk = organs[start : start + ORGANS_PER_CALL]
            masks = [truth[i] for i in chunk]
            names = [case.label_map[i] for i in chunk]
            boxes = np.stack([self._box(m, index, i, setting) for m, i in zip(masks, chunk)])
            clicks = (
                [self._clicks(m, index, i, setting) for m, i in zip(masks, chunk)] if _uses("points", kinds) else []
            )
            scored = [_scored(m, annotated) for m in masks]
            for kind in kinds:
                predicted = self._predict(views, kind, names, boxes, clicks, case.modality)
                rows += [
                    {"case": case.case_id, "organ": name, **setting.columns(), "prompt": kind, "dice": dice(p, t)}
                    for name, p, t in zip(names, (_scored(p, annotated) for p in predicted), scored)
                ]
        return rows

    def _box(self, mask: np.ndarray, index: int, label: int, setting: Setting) -> np.ndarray:
        box = organ_box(mask)
        if setting.perturbation != "box_jitter":
            return box
        g = np.random.default_rng(sample_seed(self.seed, index, label, setting.voxels, _BOX_DRAWS))
        return jitter_box(box, setting.voxels, g, mask.shape)

    def _clicks(self, mask: np.ndarray, index: int, label: int, setting: Setting) -> np.ndarray:
        clicks = organ_clicks(mask, self.points, np.random.default_rng(sample_seed(self.seed, index, label)))
        if setting.perturbation != "point_jitter":
            return clicks
        g = np.random.default_rng(sample_seed(self.seed, index, label, setting.voxels, _POINT_DRAWS))
        return jitter_points(clicks, setting.voxels, g, mask.shape)

    def _predict(self, views: RotatedViews, kind: str, names, boxes, clicks, modality: str) -> list[np.ndarray]:
        """The masks of one prompt type for the organs `names`, in order."""
        text = names if "text" in kind else None
        if text is not None:
            with torch.no_grad():  # cache them one at a time: embeddings independent of what ran before
                encode_names(self.model, names, modality)
        if "points" not in kind:
            box = boxes if "box" in kind else None
            return list(views.segment(text=text, box=box, zoom_in=self.zoom_in).values())
        predicted = []
        for n, pts in enumerate(clicks):  # a call's points are shared by all its prompts: one organ a call
            one = None if text is None else [text[n]]
            predicted += views.segment(text=one, points=pts, point_labels=[1] * len(pts), zoom_in=self.zoom_in).values()
        return predicted


def case_affine(case: Case) -> np.ndarray:
    """The (4, 4) voxel -> world mm affine of a case's image: a NIfTI's header (its data is not
    read), a DICOM series' geometry; M3D-Seg arrays carry none, so 1 mm voxels on the axes."""
    if case.kind == "m3d":
        return np.eye(4)
    path = pathlib.Path(case.image)
    if path.is_file() and path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        return np.asarray(nib.load(str(path)).affine, dtype=np.float64)
    from ..io import load_volume

    return load_volume(path).affine


def _id_map(masks, annotated: Optional[np.ndarray], shape) -> np.ndarray:
    """One int32 map of the organs' ids (and `_UNANNOTATED`): one nearest-neighbour resampling
    rotates every organ, where a mask per organ would hold a scan-sized array each. Where masks
    overlap (M3D-Seg channels may), the higher id keeps the voxel."""
    ids = np.zeros(shape, dtype=np.int32)
    for i in masks:
        ids[masks[i]] = i
    if annotated is not None:
        ids[~annotated] = _UNANNOTATED
    return ids


def _scored(mask: np.ndarray, annotated: Optional[np.ndarray]) -> np.ndarray:
    return mask if annotated is None else mask & annotated


def _applies(kind: str, setting: Setting) -> bool:
    if setting.perturbation == "box_jitter":
        return "box" in kind
    if setting.perturbation == "point_jitter":
        return "points" in kind
    return True


def _uses(part: str, kinds) -> bool:
    return any(part in k for k in kinds)


# ---------------------------------------------------------------------------------- arguments
def _checked_cases(cases) -> list[Case]:
    if isinstance(cases, (Case, str, bytes)) or not isinstance(cases, Sequence):
        raise ArgumentTypeError(f"cases must be a list of Case, got {type(cases).__name__}")
    if not cases:
        raise InvalidArgumentError("cases is empty: give the cases to evaluate (train.cases.discover_cases(...))")
    wrong = [c for c in cases if not isinstance(c, Case)]
    if wrong:
        raise ArgumentTypeError(f"cases must hold Case records, got {type(wrong[0]).__name__}")
    ids = [c.case_id for c in cases]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise InvalidArgumentError(
            f"case ids must be distinct (rows and finished-case files are named by them): {twice}"
        )
    return list(cases)


def _check_run_arguments(model, prompts, points, seed, tta, adapter, zoom_in, precision) -> None:
    if not callable(getattr(model, "session", None)):
        raise ArgumentTypeError(f"model must be a SegVol (model.session / model.segment), got {type(model).__name__}")
    for name, value, least in (("points", points, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise InvalidArgumentError(f"{name} must be an int >= {least}, got {value!r}")
    if tta is not None:
        check_tta(tta)
    SegmentOptions(zoom_in=zoom_in, precision=precision, progress=False)  # segment()'s own checks of them
    if not _is_file(adapter):
        check_adapter(model, adapter)
    if any("text" in p for p in prompts):
        check_text_support(model, "text")


def _checked_prompts(prompts) -> tuple[str, ...]:
    chosen = (prompts,) if isinstance(prompts, str) else tuple(prompts)
    unknown = [p for p in chosen if p not in PROMPTS]
    if not chosen or unknown or len(set(chosen)) != len(chosen):
        raise InvalidArgumentError(
            f"prompts must be distinct prompt types among {PROMPTS}, got {list(chosen)}"
            + (f" ({unknown[0]!r} is not one)" if unknown else "")
        )
    return chosen


def _checked_rotations(rotations) -> tuple[Rotation, ...]:
    chosen = tuple(rotations)
    wrong = [r for r in chosen if not isinstance(r, Rotation)]
    if wrong:
        raise ArgumentTypeError(
            f"rotations must be Rotation objects (eval.rotation.Rotation, PUBLISHED, sweep()), got {wrong[0]!r:.60}"
        )
    names = [r.name for r in chosen]
    if len(set(names)) != len(names) or "none" in names:
        raise InvalidArgumentError(f"rotation names must be distinct and not 'none' (they name the rows), got {names}")
    return chosen


def _checked_jitter(values, name: str) -> tuple[int, ...]:
    chosen = tuple(values)
    for v in chosen:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ArgumentTypeError(f"{name} must be whole numbers of voxels, got {v!r}")
        if v < 0:
            raise InvalidArgumentError(f"{name} must be >= 0 voxels (the largest move of a coordinate), got {v}")
    if len(set(chosen)) != len(chosen):
        raise InvalidArgumentError(f"{name} must be distinct, got {list(chosen)}")
    return tuple(int(v) for v in chosen)


def _is_file(adapter) -> bool:
    return isinstance(adapter, str) and adapter not in ("base", "auto") and pathlib.Path(adapter).is_file()


def _adapter_identity(adapter) -> Optional[dict]:
    if adapter is None:
        return None
    if _is_file(adapter):
        path = pathlib.Path(adapter)
        return {"file": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if not isinstance(adapter, str):
        raise ArgumentTypeError(f"adapter must be None, a name or an adapter file's path, got {adapter!r:.60}")
    return {"name": adapter}


def _model_identity(model) -> dict:
    """The weights the rows come from: where they were loaded from, else a digest of them."""
    source = getattr(model, "weights_source", None)
    identity = {"adapters": list(adapters.adapter_names(model))}
    if source is not None:
        return {"weights": str(source), **identity}
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"random_weights_sha256": digest.hexdigest(), **identity}
