"""The adaptation study's data: which volumes the base trains on, which the methods adapt on, and
which are held out from adaptation (bench/adaptation_study.py).

Shared data (SEGEVOL_DATA, README.md there):
    base (CT)        ct_abdomen_sm, ct_abdomen_dicom                     5 organs
    adapt (MRI)      mr_abdomen_sm                                        5 organs
                     mr_spine_t2                                          spinal cord
                     left hemisphere of the MNI152 T1                     gray matter, white matter
    held out (MRI)   mr_spine_t1 (same subject, the other contrast)       spinal cord
                     right hemisphere of the MNI152 T1                    gray matter, white matter

The brain volume is reduced to 2 mm (2x2x2 block means of the T1 and of the probability maps,
which are stored 0..255) so that it has the voxel count of the other volumes, its tissue labels
are the maps >= 0.5 (white matter where both are), and it is cut at x = 0 mm into two hemispheres,
written once under <out>/data. Held out means that no adaptation step sees the volume; it is not
held out in every sense: the spine T1 is the same subject as the spine T2 (a new contrast, not a
new anatomy), and the MNI152 template is an average brain, nearly symmetric, so the right
hemisphere is close to a mirror image of the left. The CT volumes are the base's own training
volumes: their Dice after adaptation measures what a method keeps of the base.

With --ct-root / --mr-root (Decathlon, nnU-Net or M3D-Seg folders) the CT cases train the base
and every fifth MRI case (the 5th, 10th... in the folder's order) is held out; a folder of fewer
than five MRI cases has none held out, and its MRI Dice is fitting only.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import numpy as np

from segevol_fast.train.cases import Case, cases_from_files, discover_cases

# TotalSegmentator ids shared by the "total" (CT) and "total_mr" (MRI) tasks for these organs
ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 6: "stomach"}
BRAIN_TISSUES = {1: "gray_matter", 2: "white_matter"}
HOLD_OUT_EVERY = 5  # dataset folders: every fifth MRI case is held out


@dataclass(frozen=True)
class StudyData:
    """ct: the base's training cases (CT); adapt: the MRI cases the methods train on; heldout: MRI
    cases no adaptation step sees (may be empty); layout: a description of each, for the report."""

    ct: list[Case]
    adapt: list[Case]
    heldout: list[Case]
    layout: dict


def study_data(data: pathlib.Path, out: pathlib.Path, ct_root=None, mr_root=None) -> StudyData:
    """The shared volumes (module docstring), or dataset folders when both roots are given."""
    if not (ct_root or mr_root):
        return shared_study_data(data, out / "data")
    if not (ct_root and mr_root):
        raise SystemExit("give both --ct-root and --mr-root (or neither: the shared data)")
    ct = discover_cases(ct_root, modality="ct")
    mr = discover_cases(mr_root, modality="mri")
    heldout = [c for i, c in enumerate(mr) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    adapt = [c for c in mr if c not in heldout]
    layout = {
        "base": f"{len(ct)} CT cases of {ct_root}",
        "adapt": f"{len(adapt)} MRI cases of {mr_root}",
        "heldout": f"every {HOLD_OUT_EVERY}th MRI case of {mr_root}: {len(heldout)}",
    }
    return StudyData(ct, adapt, heldout, layout)


def shared_study_data(data: pathlib.Path, derived: pathlib.Path) -> StudyData:
    ct = cases_from_files(
        [
            (data / "ct_abdomen_sm.nii.gz", data / "ct_abdomen_sm_labels.nii.gz"),
            (data / "ct_abdomen_dicom", data / "ct_abdomen_dicom_labels.nii.gz"),
        ],
        ORGANS,
        "ct",
        "shared-ct",
    )
    abdomen = cases_from_files(
        [(data / "mr_abdomen_sm.nii.gz", data / "mr_abdomen_sm_labels.nii.gz")], ORGANS, "mri", "shared-mr"
    )
    cord = json.loads((data / "labels.json").read_text())["mr_spine"]
    spine_t2, spine_t1 = (
        cases_from_files([(data / f"mr_spine_{c}.nii.gz", data / f"mr_spine_{c}_cord.nii.gz")], cord, "mri", "spine")
        for c in ("t2", "t1")
    )
    left, right = brain_hemispheres(data, derived)
    brain_left, brain_right = (cases_from_files([pair], BRAIN_TISSUES, "mri", "mni152") for pair in (left, right))
    layout = {
        "base": "CT: ct_abdomen_sm, ct_abdomen_dicom (5 organs)",
        "adapt": "MRI: mr_abdomen_sm (5 organs), mr_spine_t2 (spinal cord), MNI152 T1 left hemisphere at 2 mm "
        "(gray / white matter)",
        "heldout": "MRI: mr_spine_t1 (spinal cord; same subject as the T2, other contrast), MNI152 T1 right "
        "hemisphere at 2 mm (gray / white matter; the template is nearly symmetric)",
    }
    return StudyData(ct, abdomen + spine_t2 + brain_left, spine_t1 + brain_right, layout)


def brain_hemispheres(data: pathlib.Path, folder: pathlib.Path):
    """((image, labels) of the left hemisphere, of the right), written under `folder` once."""
    names = [folder / f"mni152_{side}_2mm{kind}.nii.gz" for side in ("left", "right") for kind in ("", "_tissue")]
    if not all(p.exists() for p in names):
        _write_hemispheres(data, folder, names)
    return (names[0], names[1]), (names[2], names[3])


def _write_hemispheres(data: pathlib.Path, folder: pathlib.Path, names) -> None:
    import nibabel as nib

    t1 = nib.load(str(data / "mr_brain_mni152_t1.nii.gz"))
    image = _halve(np.asarray(t1.dataobj, dtype=np.float32))
    gm, wm = (
        _halve(np.asarray(nib.load(str(data / f"mr_brain_mni152_{t}.nii.gz")).dataobj, dtype=np.float32))
        for t in ("gm", "wm")
    )
    scale = 255.0 if max(gm.max(), wm.max()) > 1.0 else 1.0  # the maps are stored 0..255
    tissue = np.zeros(image.shape, dtype=np.uint8)
    tissue[gm / scale >= 0.5] = 1
    tissue[wm / scale >= 0.5] = 2
    affine = t1.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] += t1.affine[:3, :3] @ np.full(3, 0.5)  # a 2 mm voxel's centre lies between two 1 mm ones
    midline = int(round(float(np.linalg.solve(affine, [0.0, 0.0, 0.0, 1.0])[0])))  # voxel of x = 0 mm
    folder.mkdir(parents=True, exist_ok=True)
    for n, part in enumerate((slice(0, midline), slice(midline, None))):  # RAS: low x is left
        shifted = affine.copy()
        shifted[:3, 3] += affine[:3, 0] * part.start
        for arr, path in ((np.rint(image[part]).astype(np.int16), names[2 * n]), (tissue[part], names[2 * n + 1])):
            nib.save(nib.Nifti1Image(arr, shifted), str(path))


def _halve(a: np.ndarray) -> np.ndarray:
    """2x2x2 block means (trailing odd planes dropped)."""
    x, y, z = (s // 2 * 2 for s in a.shape)
    return a[:x, :y, :z].reshape(x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(1, 3, 5))
