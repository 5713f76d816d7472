"""SegVol training samples: the official preprocessing and augmentation of one case, reproducible
per (seed, epoch, index).

Every sample is a dict
    image:    (1, D, H, W) float32, (D, H, W) = spatial_size, model axes = the stored (X, Y, Z)
              reversed (docs/official-pipeline.md §5.1). In [0, 1], except that the official intensity augmentation
              (p 0.1 each, not clipped) may move it by up to ~0.1.
    labels:   (C, D, H, W) float32 binary masks, one per category present in the case's
              preprocessed crop (C differs between cases), in increasing label-id order.
    names:    C SegVol text names ("right kidney", ...), aligned with labels.
    modality: "ct" | "mri";  dataset: str;  case: str.

Cases come from `train.cases`; the sampler and DataLoader from `train.loader`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import InvalidArgumentError
from . import augment
from .cases import Case, PreparedCase, prepare_case

CROP_MODES = ("mixed", "resize", "crop")


# ----------------------------------------------------------------------------------- dataset
def sample_seed(*parts: int) -> int:
    """A 64-bit seed from non-negative integers (e.g. seed, epoch, index), well mixed."""
    if any(not isinstance(p, (int, np.integer)) or p < 0 for p in parts):
        raise InvalidArgumentError(f"seed parts must be non-negative integers, got {parts}")
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


class SegmentationDataset(Dataset):
    """SegVol training samples from a list of `Case`s (see the module docstring for the dict).

    Index i reads case i % len(cases): indices past the end are further draws of the same case
    with their own random stream (the sampler uses this so repeated draws differ). Sample i of
    epoch e depends only on (seed, e, i). An index may also be an (epoch, i) pair, which is how
    `make_loader` hands the epoch to persistent workers.

    Train samples (official recipe, docs/official-pipeline.md §6): zero-pad to >= spatial_size, then one of
    {resize the whole crop ('area'; labels 'area' then >= 0.5), a spatial_size crop centred on a
    foreground voxel with probability pos_fraction (2/3 = pos 2 : neg 1) or else on a background
    voxel with intensity > 0} (crop_mode "mixed" picks 1:1; "resize" / "crop" force one), then a
    random rotation about D by U(-rotation_deg, rotation_deg), flips per axis with p 0.2, intensity
    scale and shift by U(-0.1, 0.1) with p 0.1 each. Eval samples (train=False): pad and resize the
    whole crop, nothing random.

    cache: keep each preprocessed case in memory (bool masks: 1 byte per voxel and category). Call
    `preload()` before the loader's workers start so they share it instead of each filling their own.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        spatial_size: Sequence[int],
        *,
        train: bool = True,
        crop_mode: str = "mixed",
        rotation_deg: float = 0.0,
        seed: int = 0,
        cache: bool = True,
        pos_fraction: float = 2 / 3,
        flip_prob: float = 0.2,
        intensity_prob: float = 0.1,
        unknown_labels: str = "error",
    ):
        self.cases = list(cases)
        if not self.cases or not all(isinstance(c, Case) for c in self.cases):
            raise InvalidArgumentError("SegmentationDataset needs a non-empty list of Case records")
        size = tuple(int(s) for s in spatial_size)
        if len(size) != 3 or min(size) < 1:
            raise InvalidArgumentError(f"spatial_size must be 3 positive ints (D, H, W), got {spatial_size}")
        if crop_mode not in CROP_MODES:
            raise InvalidArgumentError(f"crop_mode must be one of {CROP_MODES}, got {crop_mode!r}")
        if unknown_labels not in ("error", "ignore"):
            raise InvalidArgumentError(f"unknown_labels must be 'error' or 'ignore', got {unknown_labels!r}")
        for name, p in (("pos_fraction", pos_fraction), ("flip_prob", flip_prob), ("intensity_prob", intensity_prob)):
            if not 0.0 <= float(p) <= 1.0:
                raise InvalidArgumentError(f"{name} must be in [0, 1], got {p}")
        if not float(rotation_deg) >= 0:
            raise InvalidArgumentError(f"rotation_deg must be >= 0, got {rotation_deg}")
        sample_seed(seed)
        self.spatial_size, self.train, self.crop_mode = size, bool(train), crop_mode
        self.rotation_deg, self.seed, self.cache = float(rotation_deg), int(seed), bool(cache)
        self.pos_fraction, self.flip_prob, self.intensity_prob = (
            float(pos_fraction),
            float(flip_prob),
            float(intensity_prob),
        )
        self.unknown_labels = unknown_labels
        self.epoch = 0
        self._cache: dict[int, PreparedCase] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def set_epoch(self, epoch: int) -> None:
        sample_seed(epoch)
        self.epoch = int(epoch)

    @property
    def modalities(self) -> list[str]:
        return [c.modality for c in self.cases]

    def prepared(self, case_index: int) -> PreparedCase:
        """The preprocessed case (cached when cache=True)."""
        if case_index in self._cache:
            return self._cache[case_index]
        prep = prepare_case(self.cases[case_index], self.unknown_labels)
        if self.cache:
            self._cache[case_index] = prep
        return prep

    def preload(self) -> None:
        for i in range(len(self.cases)):
            self.prepared(i)

    def __getitem__(self, index) -> dict:
        epoch, i = index if isinstance(index, tuple) else (self.epoch, index)
        if not isinstance(i, (int, np.integer)) or i < 0:
            raise InvalidArgumentError(f"sample index must be a non-negative int, got {i!r}")
        prep = self.prepared(int(i) % len(self.cases))
        g = torch.Generator().manual_seed(sample_seed(self.seed, int(epoch), int(i)))
        image, labels = self._sample(prep, g) if self.train else self._whole(prep)
        case = prep.case
        return {
            "image": image.float().contiguous(),
            "labels": labels.float().contiguous(),
            "names": list(prep.names),
            "modality": case.modality,
            "dataset": case.dataset,
            "case": case.case_id,
        }

    def _whole(self, prep: PreparedCase) -> tuple[Tensor, Tensor]:
        image, labels = augment.pad_to(prep.image, prep.labels, self.spatial_size)
        return augment.resize_image(image, self.spatial_size), augment.resize_labels(labels, self.spatial_size)

    def _sample(self, prep: PreparedCase, g: torch.Generator) -> tuple[Tensor, Tensor]:
        mode = self.crop_mode
        if mode == "mixed":
            mode = "resize" if float(torch.rand((), generator=g)) < 0.5 else "crop"
        if mode == "resize":
            image, labels = self._whole(prep)
        else:
            image, labels = augment.pad_to(prep.image, prep.labels, self.spatial_size)
            centre = augment.crop_center(image, labels, g, self.pos_fraction)
            image, labels = augment.crop_at(image, labels, centre, self.spatial_size)
        image, labels = augment.random_rotation(image, labels, g, self.rotation_deg)
        image, labels = augment.random_flips(image, labels, g, self.flip_prob)
        image = augment.random_intensity(image, g, self.intensity_prob)
        return image, labels
