"""Feeding the trainer: a modality-balanced, DDP-sharded sampler and a reproducible DataLoader
whose workers see the current epoch."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import InvalidArgumentError
from ..io.volume import normalize_modality
from .datasets import SegmentationDataset, sample_seed


# ----------------------------------------------------------------------------------- sampler
class ModalityBalancedSampler(Sampler):
    """Draws num_samples sample indices per epoch: a modality uniformly, then a case of it uniformly.

    The global order depends only on (seed, epoch). Draw j of case c yields index c + n_cases * j,
    so repeated draws of a case get different augmentation (see `SegmentationDataset`). With DDP,
    rank r iterates global[r::world_size]: the ranks together see exactly what one process sees.
    num_samples must then be a multiple of world_size (unequal per-rank lengths hang DDP).
    """

    def __init__(self, dataset_or_modalities, num_samples: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        mods = getattr(dataset_or_modalities, "modalities", dataset_or_modalities)
        mods = [normalize_modality(m) for m in mods]
        if not mods or any(m is None for m in mods):
            raise InvalidArgumentError("ModalityBalancedSampler needs a dataset or a non-empty list of modalities")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise InvalidArgumentError(f"num_samples must be a positive int, got {num_samples!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise InvalidArgumentError(f"need 0 <= rank < world_size, got rank={rank!r} world_size={world_size!r}")
        if num_samples % world_size:
            raise InvalidArgumentError(f"num_samples ({num_samples}) must be a multiple of world_size ({world_size})")
        sample_seed(seed)
        self.n_cases, self.num_samples = len(mods), num_samples
        self.groups = {m: [i for i, x in enumerate(mods) if x == m] for m in sorted(set(mods))}
        self.seed, self.rank, self.world_size, self.epoch = int(seed), rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        sample_seed(epoch)
        self.epoch = int(epoch)

    def global_order(self, epoch: int | None = None) -> list[int]:
        """All ranks' indices of one epoch, in order."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch if epoch is None else epoch, 0x5EB0))
        groups = list(self.groups.values())
        out = []
        for j in range(self.num_samples):
            members = groups[int(torch.randint(len(groups), (), generator=g))]
            out.append(members[int(torch.randint(len(members), (), generator=g))] + self.n_cases * j)
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_order()[self.rank :: self.world_size])

    def __len__(self) -> int:
        return self.num_samples // self.world_size


# ------------------------------------------------------------------------------------ loader
class _EpochTagged(Sampler):
    """Yields (epoch, index) pairs, the epoch read from the dataset when an epoch starts: persistent
    workers hold copies of the dataset that `set_epoch` in the main process never reaches."""

    def __init__(self, inner, dataset: SegmentationDataset):
        self.inner, self.dataset = inner, dataset

    def __iter__(self):
        epoch = self.dataset.epoch
        return ((epoch, i) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def collate_samples(batch: list[dict]) -> dict:
    """Stack images to (B, 1, D, H, W); labels stay a list of B (C_b, D, H, W) tensors (C differs
    between cases); names, modality, dataset, case become lists of B."""
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "labels": [b["labels"] for b in batch],
        **{k: [b[k] for b in batch] for k in ("names", "modality", "dataset", "case")},
    }


class SegLoader(DataLoader):
    """A DataLoader whose `set_epoch(e)` sets the epoch of the dataset and of the sampler."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        inner = getattr(self.sampler, "inner", None)
        if hasattr(inner, "set_epoch"):
            inner.set_epoch(epoch)


def _seed_worker(worker_id: int, seed: int = 0) -> None:
    """Global RNGs of a worker seeded from (seed, worker id), for any user code that uses them;
    the dataset itself never does."""
    s = sample_seed(seed, worker_id)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


class _WorkerInit:  # picklable under spawn, unlike a lambda
    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, worker_id: int) -> None:
        _seed_worker(worker_id, self.seed)


def make_loader(
    dataset: SegmentationDataset, batch_size: int, *, sampler=None, workers: int = 0, seed: int = 0
) -> SegLoader:
    """A DataLoader over `dataset`: `sampler` (e.g. ModalityBalancedSampler) or, when None, every
    case once in order. Batches from `collate_samples` (labels as lists). workers > 0 uses
    persistent workers; samples are identical for any number of workers, since each depends only
    on (dataset seed, epoch, index). Call `loader.set_epoch(e)` before each epoch."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(workers, int) or workers < 0:
        raise InvalidArgumentError(f"workers must be a non-negative int, got {workers!r}")
    inner = sampler if sampler is not None else range(len(dataset))
    gen = torch.Generator().manual_seed(sample_seed(seed))
    return SegLoader(
        dataset,
        batch_size=batch_size,
        sampler=_EpochTagged(inner, dataset),
        num_workers=workers,
        collate_fn=collate_samples,
        persistent_workers=workers > 0,
        worker_init_fn=_WorkerInit(seed) if workers > 0 else None,
        generator=gen,
    )
