"""`TrainConfig`: everything a fine-tuning run needs besides the model and the data, checked when
it is made (`InvalidArgumentError` naming the field), and saved in every checkpoint as a dict."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidArgumentError
from . import validation
from .prompts import PROMPT_MIXES

AMP_MODES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# fields that decide which samples and prompts each step sees: a resumed run must keep them
STREAM_FIELDS = ("seed", "batch_size", "categories_per_image", "mixes", "box_jitter")


@dataclass
class TrainConfig:
    """Everything a fine-tuning run needs besides the model and the data.

    steps: optimizer steps in total. batch_size: images per step, global across ranks (a multiple
    of the world size). lr / weight_decay: AdamW (official 1e-4 / 1e-5). warmup_steps,
    min_lr_ratio: the schedule of `schedule.py`. grad_clip: max global grad norm (None: off).
    amp: "off" | "bf16" | "fp16" autocast (fp16 uses a GradScaler on CUDA). grad_checkpointing:
    recompute encoder blocks in backward. seed: of samples and prompts. categories_per_image:
    how many non-empty categories of a sample train per step (None: all, as officially). mixes:
    prompt mixes by name (default the official six; their losses are summed). box_jitter: voxels
    of box jitter in training prompts (0 as GitHub, 10 as HF). eval_every / save_every /
    log_every: in steps (0: eval and save only at the end; log_every >= 1). eval_jitter: voxels for
    the jittered-box evaluation. out_dir: where logs and checkpoints go (None: no files).
    workers: DataLoader workers. find_unused_parameters: passed to DDP (True is safe when some
    adapter parameters get no gradient in a step, e.g. unrouted experts).

    accumulate: micro-batches per optimizer step (batch_size must be a multiple of world size *
    accumulate): batch_size 4, accumulate 4 on one GPU holds one image at a time and steps like
    batch 4. eval_mode: "resized" (whole cases resized to the window, one decode: cheap) or
    "segment" (`model.segment()` zoom-out-zoom-in on the cases as stored: what users run; see
    `validation.py`). eval_prompts: prompt types to validate with (None: the mode's all: resized
    text, box, jittered_box; segment text, box, point). eval_points: positive clicks per organ of
    the segment "point" prompt. eval_zoom_in: segment validation runs the zoom-in (False: zoom-out
    only, faster). best_metric: the eval row's column that decides the best validation: "dice"
    (mean over organs and prompt types) or "dice_<prompt>". save_best: write out_dir/best/ at
    every new best. patience: stop after this many validations in a row without a new best (0:
    never). min_delta: how much a validation must beat the best by. tensorboard: also log to
    out_dir/tensorboard (needs the tensorboard package; off by default, so what a run writes never
    depends on what else is installed).
    """

    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    amp: str = "off"
    grad_checkpointing: bool = False
    seed: int = 2023
    categories_per_image: int | None = None
    mixes: tuple[str, ...] = field(default_factory=lambda: tuple(m.name for m in PROMPT_MIXES))
    box_jitter: int = 0
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 1
    eval_jitter: int = 5
    out_dir: str | None = None
    workers: int = 0
    find_unused_parameters: bool = True
    accumulate: int = 1
    eval_mode: str = "resized"
    eval_prompts: tuple[str, ...] | None = None
    eval_points: int = 1
    eval_zoom_in: bool = True
    best_metric: str = "dice"
    save_best: bool = True
    patience: int = 0
    min_delta: float = 0.0
    tensorboard: bool = False

    def __post_init__(self) -> None:
        self.mixes = tuple(self.mixes)
        if self.eval_prompts is not None and not isinstance(self.eval_prompts, str):
            self.eval_prompts = tuple(self.eval_prompts)
        if self.out_dir is not None:
            self.out_dir = os.fspath(self.out_dir)
        self.validate()

    def validate(self) -> None:
        def positive_int(name, allow_zero=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                raise InvalidArgumentError(f"TrainConfig.{name} must be an int >= {0 if allow_zero else 1}, got {v!r}")

        for name in ("steps", "batch_size", "log_every", "accumulate", "eval_points"):
            positive_int(name)
        for name in (
            "warmup_steps",
            "eval_every",
            "save_every",
            "box_jitter",
            "eval_jitter",
            "workers",
            "seed",
            "patience",
        ):
            positive_int(name, allow_zero=True)
        if self.batch_size % self.accumulate:
            raise InvalidArgumentError(
                f"TrainConfig.batch_size {self.batch_size} must be a multiple of accumulate {self.accumulate}"
            )
        prompts = validation.check_prompts(self.eval_mode, self.eval_prompts)
        metrics = ["dice"] + [f"dice_{p}" for p in prompts]
        if self.best_metric not in metrics:
            raise InvalidArgumentError(f"TrainConfig.best_metric must be one of {metrics}, got {self.best_metric!r}")
        if not (isinstance(self.min_delta, (int, float)) and math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise InvalidArgumentError(f"TrainConfig.min_delta must be a finite number >= 0, got {self.min_delta!r}")
        for name in ("eval_zoom_in", "save_best", "tensorboard", "grad_checkpointing", "find_unused_parameters"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"TrainConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.categories_per_image is not None:
            positive_int("categories_per_image")
        if self.amp not in AMP_MODES:
            raise InvalidArgumentError(f"TrainConfig.amp must be one of {list(AMP_MODES)}, got {self.amp!r}")
        if not (self.lr > 0 and self.weight_decay >= 0 and 0.0 <= self.min_lr_ratio <= 1.0):
            raise InvalidArgumentError("TrainConfig needs lr > 0, weight_decay >= 0 and 0 <= min_lr_ratio <= 1")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise InvalidArgumentError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip!r}")
        known = {m.name for m in PROMPT_MIXES}
        if not self.mixes or any(m not in known for m in self.mixes) or len(set(self.mixes)) != len(self.mixes):
            raise InvalidArgumentError(
                f"TrainConfig.mixes must be distinct names among {sorted(known)}, got {self.mixes}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mixes"] = list(self.mixes)
        if self.eval_prompts is not None:
            d["eval_prompts"] = list(self.eval_prompts)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidArgumentError(f"unknown TrainConfig fields {sorted(unknown)}")
        return cls(**d)
