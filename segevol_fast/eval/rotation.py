"""Rigid rotations of a scan's content in world space, resampled onto the scan's own voxel grid.

A robustness study asks how a model's masks change when the patient lies rotated in the scanner.
The scan keeps its grid (shape and affine): only what the voxels show turns, about the world
position of the grid's centre, so the rotated scan and its rotated labels drop into segment() and
the Dice computation unchanged. The rotation is rigid in millimetres (world RAS+), not in voxel
indices, so anisotropic spacing and oblique affines do not shear the anatomy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ArgumentTypeError, InvalidArgumentError, ShapeError
from ..io.volume import check_3d_shape

AXES = "xyz"
SWEEP_DEG = (-90, -45, -30, -15, -5, 5, 15, 30, 45, 90)

# Output voxels resampled per chunk. The float64 source coordinates (24 bytes a voxel) and the
# float32 sampling grid (12 bytes) or int64 indices (8 bytes) of one chunk then take ~100 MB
# whatever the scan's size; only the float32 copy of the input and the output scale with it.
CHUNK_VOXELS = 1 << 21
# How far from orthonormal a user's 3x3 matrix may be: float32 round trips give ~1e-7.
ORTHONORMAL_TOL = 1e-6


def _finite_numbers(values, name: str) -> tuple[float, ...]:
    """A sequence of real finite numbers -> tuple of floats; typed errors otherwise."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, (Sequence, np.ndarray)):
        raise ArgumentTypeError(f"{name} must be a sequence of numbers, got {type(values).__name__} {values!r:.60}")
    if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values):
        raise ArgumentTypeError(f"{name} must hold real numbers, got {values!r:.80}")
    floats = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in floats):
        raise InvalidArgumentError(f"{name} must be finite, got {values!r:.80}")
    return floats


@dataclass(frozen=True)
class Rotation:
    """A named rotation, by its angles in degrees about the world x, y and z axes.

    World is RAS+: x runs left to right, y posterior to anterior, z inferior to superior (the
    body's longitudinal axis). Each angle turns right-handedly about its axis (counter-clockwise
    seen from the axis's positive end: +90 about z takes +x, the patient's right, to +y, anterior),
    and they compose as R = Rz @ Ry @ Rx: x first, z last, all about fixed world axes.
    """

    name: str
    angles_deg: tuple[float, float, float]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ArgumentTypeError(f"Rotation name must be a string, got {type(self.name).__name__}")
        if not self.name:
            raise InvalidArgumentError("Rotation name must not be empty: it labels the rotation in reports")
        angles = _finite_numbers(self.angles_deg, "Rotation angles_deg")
        if len(angles) != 3:
            raise InvalidArgumentError(
                f"Rotation angles_deg must be 3 angles (about x, y, z), got {len(angles)}: {self.angles_deg!r}"
            )
        object.__setattr__(self, "angles_deg", angles)

    def matrix(self) -> np.ndarray:
        """The 3x3 float64 rotation R = Rz @ Ry @ Rx; quarter turns are exact (cos 90 = 0, not 6e-17)."""
        rx, ry, rz = (_axis_rotation(axis, deg) for axis, deg in enumerate(self.angles_deg))
        return rz @ ry @ rx

    @property
    def is_identity(self) -> bool:
        """True when every angle is a whole number of turns."""
        return all(deg % 360.0 == 0.0 for deg in self.angles_deg)


def _axis_rotation(axis: int, deg: float) -> np.ndarray:
    """Right-handed rotation by `deg` degrees about world axis `axis` (0 x, 1 y, 2 z)."""
    if deg % 90.0 == 0.0:
        cos, sin = ((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))[int(deg // 90.0) % 4]
    else:
        cos, sin = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    a, b = ((1, 2), (2, 0), (0, 1))[axis]  # the plane it turns, a towards b (cyclic order keeps it right-handed)
    m = np.eye(3)
    m[a, a] = m[b, b] = cos
    m[b, a], m[a, b] = sin, -sin
    return m


# The published rotation protocol: 45 degrees about the longitudinal axis, 0.1 rad about each other axis.
PUBLISHED = Rotation("published", (math.degrees(0.1), math.degrees(0.1), 45.0))


def sweep(angles: Sequence[float] = SWEEP_DEG, axes: str = AXES) -> list[Rotation]:
    """One single-axis Rotation per axis in `axes` and angle in `angles` (degrees), axis-major,
    named like "z+30" or "x-15". Angles must be distinct finite numbers; axes distinct letters of "xyz"."""
    if not isinstance(axes, str):
        raise ArgumentTypeError(f"axes must be a string of letters from 'xyz' (e.g. 'z'), got {axes!r}")
    if not axes or not set(axes) <= set(AXES) or len(set(axes)) != len(axes):
        raise InvalidArgumentError(f"axes must be distinct letters from 'xyz' (e.g. 'xyz' or 'z'), got {axes!r}")
    angles = _finite_numbers(angles, "angles")
    if not angles or len(set(angles)) != len(angles):
        raise InvalidArgumentError(f"angles must be a non-empty list of distinct angles in degrees, got {angles!r}")
    rotations = []
    for axis in axes:
        for deg in angles:
            about = [0.0, 0.0, 0.0]
            about[AXES.index(axis)] = deg
            rotations.append(Rotation(f"{axis}{deg:+g}", tuple(about)))
    return rotations


# ---------------------------------------------------------------------------------- resampling
Labels = Union[None, np.ndarray, Mapping]


def rotate_scan(image, affine, rotation, labels: Labels = None, *, fill=None) -> tuple[np.ndarray, Labels]:
    """Rotate a scan's content by `rotation` about the world position c of its grid's centre.

    The output lies on the same grid as the input (same shape, same affine): output voxel v shows
    what the input shows at world position c + R^T (A v - c), A the affine. An object at world p
    thus moves to c + R (p - c).

    image:    (X, Y, Z) real array on its stored grid. Resampled trilinearly; where the source
              position falls outside the input, `fill` (default the image's minimum: air in CT,
              background in MR) is blended in as a constant padding. Returned as float32.
    affine:   (4, 4) voxel index -> world mm (RAS+), finite, invertible.
    rotation: a Rotation, or a 3x3 proper rotation matrix acting on world coordinates.
    labels:   None, one integer label map (X, Y, Z), or a dict {name: bool mask (X, Y, Z)};
              nearest neighbour, 0 / False outside the input. Returned in the same form: the
              same dtype, and for a dict the same keys in the same order.

    Returns (rotated image, rotated labels). Chunks of the output are resampled in float32 with
    torch's grid_sample from float64 source coordinates, so memory stays bounded on large scans.
    """
    image = _checked_array(image, "image", "iuf")
    affine = _checked_affine(affine)
    matrix = _checked_rotation(rotation)
    label_arrays = _checked_labels(labels, image.shape)
    if fill is None:
        fill = float(image.min())
    elif isinstance(fill, bool) or not isinstance(fill, (int, float, np.integer, np.floating)):
        raise ArgumentTypeError(f"fill must be a number (or None for the image minimum), got {fill!r:.60}")
    elif not math.isfinite(float(fill)):
        raise InvalidArgumentError(f"fill must be finite, got {fill}")

    resampler = _Resampler(image.shape, affine, matrix)
    rotated = resampler.trilinear(image[None], float(fill))[0]
    if label_arrays is None:
        return rotated, None
    rotated_labels = resampler.nearest(list(label_arrays.values()))
    if isinstance(labels, Mapping):
        return rotated, dict(zip(label_arrays, rotated_labels))
    return rotated, rotated_labels[0]


def rotate_probabilities(prob, affine, rotation) -> np.ndarray:
    """Rotate a probability map (X, Y, Z), or a stack of them (C, X, Y, Z), as `rotate_scan` rotates
    an image: trilinear, 0 outside the input, float32 out. Passing R^T brings a prediction made on
    a scan rotated by R back onto the original scan's anatomy."""
    prob = np.asarray(prob)
    if prob.ndim not in (3, 4):
        raise ShapeError(f"prob must be (X, Y, Z) or (C, X, Y, Z), got shape {prob.shape}")
    stack = _checked_array(prob if prob.ndim == 4 else prob[None], "prob", "iufb", channels=True)
    resampler = _Resampler(stack.shape[1:], _checked_affine(affine), _checked_rotation(rotation))
    rotated = resampler.trilinear(stack, 0.0)
    return rotated if prob.ndim == 4 else rotated[0]


class _Resampler:
    """Where each output voxel of a rotated grid reads the input, and the two ways of reading it.

    In voxel indices the map is affine: with L the affine's 3x3 part and m = (shape - 1) / 2 the
    grid's centre, output voxel v reads input position u = m + M (v - m), M = L^-1 R^T L. M is a
    rotation only when L is a multiple of one, which is why the rotation is built in world mm.
    """

    def __init__(self, shape: Sequence[int], affine: np.ndarray, matrix: np.ndarray):
        self.shape = tuple(int(s) for s in shape)
        linear = affine[:3, :3]
        self.identity = bool(np.array_equal(matrix, np.eye(3)))
        self.voxel_map = np.linalg.solve(linear, matrix.T @ linear)
        centre = (np.asarray(self.shape, dtype=np.float64) - 1) / 2
        self.offset = centre - self.voxel_map @ centre
        # rows of the first axis per chunk, at least one
        self.rows = max(1, CHUNK_VOXELS // max(1, self.shape[1] * self.shape[2]))

    def _chunks(self):
        for start in range(0, self.shape[0], self.rows):
            yield slice(start, min(start + self.rows, self.shape[0]))

    def _sources(self, rows: slice) -> list[np.ndarray]:
        """Input positions (voxel indices, float64) read by the output voxels of `rows`: one
        (rows, Y, Z) array per input axis; a trailing axis of 3 would make every numpy loop strided."""
        i = np.arange(rows.start, rows.stop, dtype=np.float64)[:, None, None]
        j = np.arange(self.shape[1], dtype=np.float64)[None, :, None]
        k = np.arange(self.shape[2], dtype=np.float64)[None, None, :]
        m = self.voxel_map
        return [(self.offset[a] + m[a, 0] * i + m[a, 1] * j) + m[a, 2] * k for a in range(3)]

    def trilinear(self, stack: np.ndarray, fill: float) -> np.ndarray:
        """(C, X, Y, Z) -> float32 (C, X, Y, Z); positions outside blend towards `fill`."""
        if self.identity:
            return stack.astype(np.float32, copy=True)
        # grid_sample pads with zeros: shift the values so that zero stands for `fill`
        shifted = stack.astype(np.float32, copy=True)
        if fill:
            shifted -= np.float32(fill)
        source = torch.from_numpy(shifted)[None]  # (1, C, X, Y, Z): X is grid_sample's depth axis
        out = np.empty(stack.shape, dtype=np.float32)
        for rows in self._chunks():
            # align_corners=False normalises index u of an axis of n voxels to (2u + 1) / n - 1;
            # unlike align_corners=True it stays defined for one-voxel axes. grid_sample wants the
            # last tensor axis (Z) first in the grid's last dimension.
            normalised = [((2 * u + 1) / n - 1).astype(np.float32) for u, n in zip(self._sources(rows), self.shape)]
            grid = torch.from_numpy(np.stack(normalised[::-1], axis=-1))[None]
            sampled = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            out[:, rows] = sampled[0].numpy()
        if fill:
            out += np.float32(fill)
        return out

    def nearest(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Each (X, Y, Z) array read at the nearest input voxel, 0 / False outside; dtypes kept.

        Nearest neighbour is an index gather, not grid_sample: exact for every dtype (int64 label
        ids past 2**24 would not survive float32), and one set of indices serves every mask.
        """
        if self.identity:
            return [a.copy() for a in arrays]
        flat_inputs = [np.ascontiguousarray(a).reshape(-1) for a in arrays]
        outs = [np.empty(self.shape, dtype=a.dtype) for a in arrays]
        for rows in self._chunks():
            flat, outside = 0, False
            for u, n in zip(self._sources(rows), self.shape):
                # clip first so the integer cast is defined; -1 and n still count as outside
                index = np.floor(np.clip(u, -1.0, n) + 0.5).astype(np.int64)
                outside = outside | (index < 0) | (index >= n)
                flat = flat * n + np.clip(index, 0, n - 1)
            for src, out in zip(flat_inputs, outs):
                values = src[flat]
                values[outside] = 0
                out[rows] = values
        return outs


def _checked_array(value, name: str, kinds: str, channels: bool = False) -> np.ndarray:
    """A real, finite numpy array of 3 dimensions (after a leading channel axis when `channels`)."""
    if isinstance(value, Mapping) or value is None:
        raise ArgumentTypeError(f"{name} must be a numpy array, got {type(value).__name__}")
    arr = np.asarray(value)
    check_3d_shape(arr.shape[1:] if channels else arr.shape, name)
    if arr.dtype.kind not in kinds:
        raise ShapeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidArgumentError(f"{name} holds NaN or infinite values; resampling would spread them")
    if arr.size == 0:
        raise ShapeError(f"{name} is empty (shape {arr.shape})")
    return arr


def _checked_affine(affine) -> np.ndarray:
    arr = np.asarray(affine, dtype=np.float64)
    if arr.shape != (4, 4):
        raise ShapeError(f"affine must be 4x4 (voxel index -> world mm), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InvalidArgumentError(f"affine must be finite, got\n{arr}")
    if not np.array_equal(arr[3], [0.0, 0.0, 0.0, 1.0]):
        raise InvalidArgumentError(f"affine's last row must be (0, 0, 0, 1), got {arr[3].tolist()}")
    if abs(np.linalg.det(arr[:3, :3])) < 1e-12:
        raise InvalidArgumentError(f"affine must be invertible (non-zero voxel sizes), got\n{arr}")
    return arr


def _checked_rotation(rotation) -> np.ndarray:
    """A Rotation or a 3x3 proper rotation matrix -> float64 (3, 3)."""
    if isinstance(rotation, Rotation):
        return np.eye(3) if rotation.is_identity else rotation.matrix()
    if isinstance(rotation, (str, bytes, Mapping)) or rotation is None:
        raise ArgumentTypeError(f"rotation must be a Rotation or a 3x3 matrix, got {type(rotation).__name__}")
    try:
        matrix = np.asarray(rotation, dtype=np.float64)
    except (TypeError, ValueError):
        raise ArgumentTypeError(
            f"rotation must be a Rotation or a 3x3 matrix of numbers, got {rotation!r:.80}"
        ) from None
    if matrix.shape != (3, 3):
        raise ShapeError(f"a rotation matrix must be 3x3, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise InvalidArgumentError(f"rotation matrix must be finite, got\n{matrix}")
    if np.abs(matrix @ matrix.T - np.eye(3)).max() > ORTHONORMAL_TOL:
        raise InvalidArgumentError(f"rotation matrix must be orthonormal (R @ R.T = I), got\n{matrix}")
    if np.linalg.det(matrix) < 0:
        raise InvalidArgumentError(
            f"rotation matrix has determinant -1: a reflection, which would mirror left and right; got\n{matrix}"
        )
    return matrix


def _checked_labels(labels, shape: tuple[int, ...]):
    """None, or {key: array} in the caller's order (a single label map under the key None)."""
    if labels is None:
        return None
    items = labels.items() if isinstance(labels, Mapping) else [(None, labels)]
    checked = {}
    for key, value in items:
        what = "labels" if key is None else f"labels[{key!r}]"
        if not isinstance(value, np.ndarray):
            raise ArgumentTypeError(f"{what} must be a numpy array, got {type(value).__name__}")
        if value.dtype.kind not in "iub":
            raise ShapeError(
                f"{what} must be an integer label map or a bool mask, got dtype {value.dtype}; "
                "round and cast it (e.g. .astype(np.int16)) or threshold it"
            )
        if value.shape != tuple(shape):
            raise ShapeError(f"{what} has shape {value.shape}, but the image has shape {tuple(shape)}")
        checked[key] = value
    return checked
