"""A synthetic abdominal CT with a label map, for the demo (when no real scan is at hand) and tests.

Geometry is RAS with a positive diagonal affine: i grows to the patient's right, j anteriorly, k
superiorly, so the liver sits at large i, the spleen at small i, spine and kidneys at small j.
Label ids follow TotalSegmentator's "total" task where the class exists there (1 spleen,
2 kidney_right, 3 kidney_left, 5 liver), so code that reads the shared real CT's labels.json
reads the phantom the same way; the spine (no single TotalSegmentator class) is SPINE_ID.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import ShapeError
from .io.volume import Volume

SPLEEN, KIDNEY_RIGHT, KIDNEY_LEFT, LIVER = 1, 2, 3, 5
SPINE_ID = 200  # outside TotalSegmentator's 1..117
NAMES = {SPLEEN: "spleen", KIDNEY_RIGHT: "kidney_right", KIDNEY_LEFT: "kidney_left", LIVER: "liver", SPINE_ID: "spine"}

# Hounsfield units (typical portal-venous-phase values)
AIR, FAT, SOFT, GAS = -1000, -100, 40, -800
LIVER_HU, SPLEEN_HU, MEDULLA, CORTEX, BONE, MARROW = 60, 50, 30, 150, 400, 200


def _ellipsoid(xyz, centre, radii, rng, wobble: float = 0.08) -> np.ndarray:
    """Bool mask of a smoothly irregular ellipsoid (mm). The radius is modulated by a few random
    low-frequency cosines so organs do not look like perfect spheres."""
    x, y, z = (c - c0 for c, c0 in zip(xyz, centre))
    r = np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2)
    bump = 0.0
    for _ in range(3):
        freq = rng.uniform(0.5, 2.0, size=3) / np.asarray(radii)
        bump = bump + wobble / 3 * np.cos(freq[0] * x + freq[1] * y + freq[2] * z + rng.uniform(0, 2 * np.pi))
    return r <= 1.0 + bump


def make_phantom(
    shape: Sequence[int] = (160, 160, 64), spacing: Sequence[float] = (1.5, 1.5, 3.0), seed: int = 0
) -> tuple[Volume, np.ndarray, dict[int, str]]:
    """Build the phantom.

    Returns:
        volume: `Volume` with an int16 HU array (X, Y, Z) = `shape`, RAS affine diag(spacing)
            centred on the volume, modality "ct".
        labels: uint8 (X, Y, Z) label map (0 background; ids in `names`).
        names:  {id: name}, e.g. {5: "liver", ...}.
    Organ sizes are in mm, so other shapes / spacings give the same anatomy resampled; the
    field of view is shape * spacing (240 x 240 x 192 mm by default).
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 8 or len(spacing) != 3 or min(spacing) <= 0:
        raise ShapeError(
            f"phantom needs a 3-D shape of at least 8 voxels per axis and 3 positive spacings, got {shape}, {spacing}"
        )
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing)
    # open grids in mm: broadcasting keeps memory at one volume per temporary
    xyz = tuple((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s for n, s in zip(shape, spacing))
    xyz = (xyz[0][:, None, None], xyz[1][None, :, None], xyz[2][None, None, :])
    fov = np.asarray(shape) * np.asarray(spacing)
    ax, ay = 0.46 * fov[0], 0.40 * fov[1]  # body ellipse semi-axes (constant along z)

    body_r = np.sqrt((xyz[0] / ax) ** 2 + (xyz[1] / ay) ** 2)
    body = np.broadcast_to(body_r <= 1.0, shape)
    hu = np.full(shape, AIR, dtype=np.float32)
    hu[body] = FAT
    hu[np.broadcast_to(body_r <= 1.0 - 12.0 / ay, shape)] = SOFT  # ~12 mm subcutaneous fat
    labels = np.zeros(shape, dtype=np.uint8)
    sx, sy, sz = fov / np.array([240.0, 240.0, 192.0])  # anatomy scales with the field of view

    def put(mask, value, label=None):
        mask = mask & body
        hu[mask] = value
        if label is not None:
            labels[mask] = label

    # a few bowel-gas pockets anterior-left, drawn first so organs overwrite any overlap
    for _ in range(4):
        c = (rng.uniform(-60, 10) * sx, rng.uniform(20, 60) * sy, rng.uniform(-80, 20) * sz)
        put(_ellipsoid(xyz, c, (8 * sx, 6 * sy, 10 * sz), rng, 0.2), GAS)
    liver = _ellipsoid(xyz, (55 * sx, 10 * sy, 35 * sz), (45 * sx, 50 * sy, 55 * sz), rng) | _ellipsoid(
        xyz, (20 * sx, 30 * sy, 55 * sz), (35 * sx, 30 * sy, 30 * sz), rng
    )
    put(liver, LIVER_HU, LIVER)
    put(_ellipsoid(xyz, (-72 * sx, -8 * sy, 45 * sz), (18 * sx, 30 * sy, 35 * sz), rng), SPLEEN_HU, SPLEEN)
    for side, lab in ((1, KIDNEY_RIGHT), (-1, KIDNEY_LEFT)):
        centre, radii = (side * 48 * sx, -42 * sy, -25 * sz), (22 * sx, 20 * sy, 38 * sz)
        put(_ellipsoid(xyz, centre, radii, rng, 0.03), CORTEX, lab)
        put(_ellipsoid(xyz, centre, tuple(0.7 * r for r in radii), rng, 0.0), MEDULLA, lab)
    # spine: vertebral bodies (marrow inside a cortical shell) with 6 mm discs, plus a posterior process
    cyl = (xyz[0] / (18 * sx)) ** 2 + ((xyz[1] + 62 * sy) / (16 * sy)) ** 2
    disc = np.broadcast_to((np.mod(xyz[2] / sz, 30.0) < 6.0), shape)
    vert = np.broadcast_to(cyl <= 1.0, shape) & ~disc
    put(vert, BONE, SPINE_ID)
    put(np.broadcast_to(cyl <= 0.6, shape) & ~disc, MARROW, SPINE_ID)
    put(np.broadcast_to(cyl <= 1.0, shape) & disc, 80)  # discs: soft tissue, not spine label
    proc = (np.abs(xyz[0]) <= 5 * sx) & (xyz[1] <= -78 * sy) & (xyz[1] >= -ay + 6)
    put(np.broadcast_to(proc, shape) & ~disc, BONE, SPINE_ID)

    hu += rng.normal(0.0, 12.0, size=shape).astype(np.float32)  # CT noise, ~12 HU
    hu[~body] = AIR + rng.normal(0.0, 5.0, size=int((~body).sum())).astype(np.float32)
    array = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    vol = Volume(array=array, affine=affine, modality="ct", source=f"phantom(seed={seed})")
    return vol, labels, dict(NAMES)
