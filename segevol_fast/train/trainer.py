"""The fine-tuning loop: official loss and prompt mix, AdamW + warm-up/cosine, AMP, gradient
checkpointing and clipping, metrics, evaluation, checkpoints with bit-exact resume, DDP.

    cfg = TrainConfig(steps=2000, batch_size=4, out_dir="runs/mri_lora")
    trainer = Trainer(model, cfg, train_dataset, eval_dataset)   # model: SegVol (+ adapters)
    trainer.resume("runs/mri_lora/checkpoint_0001000.pt")        # optional
    trainer.fit()

One optimizer step (docs/official-pipeline.md §6, batched): the step's global batch of `batch_size` images is
encoded at once; for each image, each chosen category (non-empty in the crop) draws one box and
one point set from its mask, and the decoder runs every prompt mix (official six: points+text,
box+text, text, box, points, box+points) for all chosen categories of the image in one call.
A category's loss is the sum over mixes of BCE + Dice (official); the step's loss is its mean over
all (image, category) pairs of the global batch. (Officially one step is taken per category with
the encoder re-run each time; here all categories of a step share one encoder pass and one step.)
Adapters that read each prompt's task (context priors) get it as `segment()` gives it: the
structure's name in mixes with text, none in box / points mixes when the priors have a "no task"
prior, which those mixes train.

Randomness: the prompts and category choice of sample j of the global batch at step s come from a
generator seeded by (seed, s, j) only, and the samples themselves from (seed, epoch, index)
(`datasets.py`), so the run is the same for any number of ranks or loader workers, and a resumed
run continues exactly (global RNGs, used by e.g. LoRA dropout, are checkpointed too).

DDP: with world_size > 1 (see `distributed.py`) each rank takes batch_size / world_size images of
the global batch (rank r the positions r, r + W, ...); the loss of a rank is scaled so that DDP's
gradient average equals the gradient of the global mean; only rank 0 logs, shows progress and
writes files.

Gradient accumulation (`accumulate` A): a rank's share of the step's batch runs as A micro-batches
of batch_size / (world_size * A) images, each backward adding to the gradients, DDP synchronising
only after the last (`no_sync` before). Every micro-batch's loss is scaled by the step's global
pair count, so the gradient is the one of the whole batch's mean; the samples and prompts are
those of the same run without accumulation (only float summation order differs).

Validation (`validation.py`), every eval_every steps and at the end: "segment" scores
`model.segment()` on whole held-out cases, "resized" decodes them resized to the window. A
validation whose `best_metric` beats the best so far by more than `min_delta` is written to
out_dir/best/ (`save_best`); `patience` validations in a row without one stop the run early
(`selection.py`). Metrics go to CSV / JSONL and, when asked, TensorBoard (`logs.py`); a progress bar
shows the loss and the last validation Dice (`progress.py`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import pathlib
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Sampler

from .. import adapters
from .. import distributed as dist_utils
from ..errors import CheckpointError, InvalidArgumentError
from ..io.output import write_file_atomic
from ..model.network import model_device
from . import validation
from .checkpoint import FORMAT as CHECKPOINT_FORMAT
from .checkpoint import read_checkpoint, rng_state, seed_global_rngs, set_rng_state, write_checkpoint
from .config import AMP_MODES, STREAM_FIELDS, TrainConfig
from .datasets import sample_seed
from .encode import encode_names, routed
from .loader import ModalityBalancedSampler, make_loader
from .logs import RunLogs, tensorboard_writer_class
from .loss import bce_dice_loss
from .progress import TrainProgress
from .prompts import PROMPT_MIXES, collate_prompts, restrict_to_mix, sample_prompts
from .schedule import warmup_cosine
from .selection import BestTracker

__all__ = ["TrainConfig", "Trainer", "encode_names", "CHECKPOINT_FORMAT"]

EVAL_PROMPTS = validation.RESIZED_PROMPTS  # `evaluate`'s prompt types


# ---------------------------------------------------------------------------------- data order
class _ResumableSampler(Sampler):
    """This rank's share of a ModalityBalancedSampler epoch, starting `skip` indices in (a run
    resumed mid-epoch starts at the batch it stopped at without loading the ones before)."""

    def __init__(self, inner: ModalityBalancedSampler):
        self.inner, self.skip = inner, 0

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self):
        return itertools.islice(iter(self.inner), self.skip, None)

    def __len__(self) -> int:
        return len(self.inner) - self.skip


# ---------------------------------------------------------------------------------- one step
class _StepModule(nn.Module):
    """The forward of one training step as a module, so that DDP can wrap it (DDP synchronises
    gradients only for work done inside its forward).

    forward(images (B, 1, D, H, W) float32, plans: B dicts from `Trainer._plan`) ->
        (loss_sum 0-d float32: sum over this rank's (image, category) pairs of that category's
         summed-over-mixes loss, parts (2 + n_mixes,) float64 detached: the same sums of BCE,
         Dice and of each mix's loss).
    """

    def __init__(self, model: nn.Module, mixes: Sequence[str], params: Sequence[nn.Parameter]):
        super().__init__()
        self.model = model
        self.mixes = tuple(mixes)
        self._params = list(params)  # not registered twice: a plain list

    def forward(self, images: Tensor, plans: list[dict]) -> tuple[Tensor, Tensor]:
        model = self.model
        zero = torch.zeros((), dtype=torch.float64, device=images.device)
        parts = [zero] * (2 + len(self.mixes))  # detached sums, synchronised once at the end
        if not any(p["names"] for p in plans):
            # nothing to learn on this rank this step; still touch every parameter so DDP's
            # gradient all-reduce sees the same parameters on every rank
            return self._zero_on_every_param(), torch.stack(parts)
        modalities = [p["modality"] for p in plans]
        route = adapters.batch_route(model, images, modalities)  # a mixture's choice per image, or None
        with adapters.prompt_context(modalities=modalities), routed(route):
            emb = model.encode_image(images)
        total = images.new_zeros((), dtype=torch.float32)
        for i, plan in enumerate(plans):
            n = len(plan["names"])
            if n == 0:
                continue
            with (
                adapters.prompt_context(modalities=[plan["modality"]], tasks=plan["names"]),
                routed(None if route is None else route.row(i)),
            ):
                text = encode_names(model, plan["names"], plan["modality"]) if plan["needs_text"] else None
                for k, prompt in enumerate(plan["prompts"]):
                    with adapters.prompt_context(tasks=prompt["tasks"]):
                        logits = model.decode(
                            emb[i : i + 1],
                            text_embedding=text if prompt["text"] else None,
                            boxes=prompt["boxes"],
                            points=prompt["points"],
                        )
                    loss, bce, dc = bce_dice_loss(logits, plan["target"], return_parts=True)
                    total = total + n * loss  # loss is a mean over the n categories
                    for slot, value in ((0, bce), (1, dc), (2 + k, loss)):
                        parts[slot] = parts[slot] + n * value.detach().double()
        aux = adapters.aux_loss(model)  # router load balancing / prior modality loss of this forward
        if aux is not None:  # weighted by this rank's pairs: the step's scaling turns it into a mean
            total = total + aux * sum(len(p["names"]) for p in plans)
        if not total.requires_grad:
            # No trained parameter is on this batch's graph (every image routed to a mixture's
            # identity expert, e.g. an all-CT batch): their gradient is exactly zero. Adding a
            # zero-weighted term gives backward a graph and every parameter that zero gradient, so
            # this rank runs the same backward and all-reduce as the others.
            total = total + self._zero_on_every_param()
        return total, torch.stack(parts)

    def _zero_on_every_param(self) -> Tensor:
        """0.0, as a function of every trained parameter (their gradients from it are zeros)."""
        return sum(p.reshape(-1)[0] * 0.0 for p in self._params)


# ---------------------------------------------------------------------------------- trainer
def _mix_uses_text(name: str) -> bool:
    return next(m for m in PROMPT_MIXES if m.name == name).text


def _nonempty(labels: Tensor) -> list[int]:
    """Categories of a (C, D, H, W) target with a voxel > 0."""
    return [c for c in range(labels.shape[0]) if bool(labels[c].amax() > 0)]


def _default_params(model: nn.Module) -> list[nn.Parameter]:
    """Adapter parameters when the model has adapters, else every parameter that requires grad."""
    adapter_ids = {id(p) for m in model.modules() if isinstance(m, adapters.AdapterModule) for p in m.parameters()}
    adapter_ids |= {id(p) for p in adapters.adapter_parameters(model)}
    if adapter_ids:
        return [p for p in model.parameters() if id(p) in adapter_ids and p.requires_grad]
    return [p for p in model.parameters() if p.requires_grad]


def _wrap_ddp(module: nn.Module, device: torch.device, find_unused: bool) -> nn.Module:
    """DistributedDataParallel over `module`; buffers are not re-broadcast every forward (the
    model's buffers never change in training, and the official model's are large)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    no_sync = {"forward_sync_buffers": False}  # newer torch; older spells it broadcast_buffers
    if "forward_sync_buffers" not in inspect.signature(DistributedDataParallel.__init__).parameters:
        no_sync = {"broadcast_buffers": False}
    return DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused,
        **no_sync,
    )


class Trainer:
    """Fine-tune `model` (a SegVol, with or without adapters) on `train_dataset`.

    Args:
        model: on its target device already; DDP-wrapped here when a process group is up.
        config: a TrainConfig.
        train_dataset: a `SegmentationDataset` (train=True); batches come from a
            ModalityBalancedSampler over it, batch_size * ceil(len / batch_size) draws an epoch.
        eval_dataset: optional held-out data, validated every eval_every steps and at the end:
            a `SegmentationDataset` (train=False; eval_mode "segment" uses its `cases`), or for
            eval_mode "segment" also a list of `Case` records.
        params: what to train; default `_default_params` (adapter parameters if any, else every
            requires_grad parameter). Every other parameter of the model is set
            requires_grad=False, so that autograd and DDP track only what is trained.

    Construction seeds the global torch / numpy / Python generators from (config.seed, rank).

    Attributes: step (optimizer steps done), history (logged train rows), eval_history (one row
    per validation), best (a `selection.BestTracker`: best score and step), stopped_early.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_dataset,
        eval_dataset=None,
        params: Sequence[nn.Parameter] | None = None,
    ):
        if not isinstance(config, TrainConfig):
            raise InvalidArgumentError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.model, self.config = model, config
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.rank, self.world_size = dist_utils.rank(), dist_utils.world_size()
        if config.batch_size % (self.world_size * config.accumulate):
            raise InvalidArgumentError(
                f"batch_size {config.batch_size} (global) must be a multiple of the world size {self.world_size} "
                f"times accumulate {config.accumulate}"
            )
        self.local_batch = config.batch_size // self.world_size
        if config.tensorboard:
            if config.out_dir is None:
                raise InvalidArgumentError("TensorBoard logging writes to out_dir: set TrainConfig.out_dir")
            tensorboard_writer_class()  # a missing package fails now, not after the first steps
        if eval_dataset is not None and config.eval_mode == "resized" and not hasattr(eval_dataset, "spatial_size"):
            raise InvalidArgumentError("eval_mode 'resized' needs a SegmentationDataset(train=False) as eval_dataset")
        self.device = model_device(model)
        if getattr(model, "tokenizer", True) is None and any(_mix_uses_text(m) for m in config.mixes):
            raise InvalidArgumentError(
                "text prompt mixes need the model's CLIP tokenizer (model.tokenizer = DIR), "
                "or train without them (TrainConfig.mixes=('box', 'points', 'box+points'))"
            )
        self.params, self.param_names = self._select_params(params)
        if hasattr(model, "image_encoder"):
            model.image_encoder.gradient_checkpointing = bool(config.grad_checkpointing)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, config.steps, config.warmup_steps, config.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=config.amp == "fp16" and self.device.type == "cuda"
        )
        self.step = 0
        seed_global_rngs(sample_seed(config.seed, self.rank, 0x61D))
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self.best = BestTracker(patience=config.patience, min_delta=float(config.min_delta))
        self.stopped_early = False
        self.steps_per_epoch = max(1, math.ceil(len(train_dataset) / config.batch_size))
        self.sampler = _ResumableSampler(
            ModalityBalancedSampler(
                train_dataset,
                self.steps_per_epoch * config.batch_size,
                seed=config.seed,
                rank=self.rank,
                world_size=self.world_size,
            )
        )
        self.loader = make_loader(
            train_dataset, self.local_batch, sampler=self.sampler, workers=config.workers, seed=config.seed
        )
        self._step_module = _StepModule(model, config.mixes, self.params)
        self._engine: nn.Module = self._step_module
        if self.world_size > 1:
            self._engine = _wrap_ddp(self._step_module, self.device, config.find_unused_parameters)

    # ------------------------------------------------------------------ setup helpers
    def _select_params(self, params) -> tuple[list[nn.Parameter], list[str]]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        wanted = {id(p) for p in (_default_params(self.model) if params is None else params)}
        if not wanted <= set(names):
            raise InvalidArgumentError("params holds tensors that are not parameters of the model")
        if not wanted:
            raise InvalidArgumentError("nothing to train: no parameter requires grad (add an adapter or unfreeze)")
        chosen = [p for p in self.model.parameters() if id(p) in wanted]  # model order: stable optimizer state
        for p in self.model.parameters():  # autograd and DDP then track exactly what is trained
            p.requires_grad_(id(p) in wanted)
        return chosen, [names[id(p)] for p in chosen]

    def _autocast(self):
        dtype = AMP_MODES[self.config.amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ one step
    def _plan(self, batch: dict, step: int, offset: int = 0) -> list[dict]:
        """Per image of this rank's batch: chosen categories, their targets and the prompts of
        every mix (collated for one decode call). All draws from (seed, step, global position).
        offset: where `batch` starts in this rank's share of the step (a micro-batch)."""
        cfg = self.config
        untasked = adapters.prompts_without_text_are_untasked(self.model)
        plans = []
        for j, labels in enumerate(batch["labels"], start=offset):
            position = j * self.world_size + self.rank  # place in the global batch (see the sampler)
            g = torch.Generator().manual_seed(sample_seed(cfg.seed, step, position))
            nonempty = _nonempty(labels)  # official: skip empty categories
            if cfg.categories_per_image is not None and len(nonempty) > cfg.categories_per_image:
                pick = torch.randperm(len(nonempty), generator=g)[: cfg.categories_per_image]
                nonempty = sorted(nonempty[int(i)] for i in pick)
            drawn = [sample_prompts(labels[c], None, g, jitter=cfg.box_jitter) for c in nonempty]
            names = [batch["names"][j - offset][c] for c in nonempty]
            prompts = []
            if nonempty:
                for mix in cfg.mixes:
                    p = collate_prompts([restrict_to_mix(d, mix) for d in drawn])
                    prompts.append(
                        {
                            "text": p["text"],
                            # inference gives a prompt without text no task: train that prior on such mixes
                            "tasks": names if p["text"] or not untasked else [None] * len(names),
                            "boxes": None if p["boxes"] is None else p["boxes"].to(self.device),
                            "points": None if p["points"] is None else tuple(t.to(self.device) for t in p["points"]),
                        }
                    )
            plans.append(
                {
                    "names": names,
                    "modality": batch["modality"][j - offset],
                    "target": labels[nonempty].to(self.device),
                    "prompts": prompts,
                    "needs_text": any(p["text"] for p in prompts),
                }
            )
        return plans

    def _global_pairs(self, batch: dict) -> float:
        """The step's number of (image, category) pairs over all ranks (what `_plan` will choose)."""
        cap = self.config.categories_per_image or math.inf
        mine = sum(min(len(_nonempty(labels)), cap) for labels in batch["labels"])
        return float(dist_utils.all_reduce_sum(torch.tensor([mine], dtype=torch.float64, device=self.device)).item())

    def loss_on(
        self, batch: dict, step: int | None = None, *, offset: int = 0, count: float | None = None
    ) -> tuple[Tensor, Tensor, float]:
        """Forward of one step on this rank's batch (no optimizer work); with `offset` and `count`
        (the whole step's global pairs), of one micro-batch starting `offset` images into it.

        Returns:
            loss: 0-d float32 to call backward on: this rank's loss sum * world_size / global
                number of (image, category) pairs, so DDP's gradient average is the gradient of
                the global mean loss;
            parts: (2 + n_mixes,) float64 global means (all-reduced) of BCE, Dice, each mix;
            count: the global number of (image, category) pairs (0: nothing to learn).
        """
        step = self.step if step is None else step
        plans = self._plan(batch, step, offset)
        if count is None:
            count = self._global_pairs(batch)
        if count == 0:  # no rank has a non-empty category: no forward at all (keeps DDP's ranks in step)
            return (
                torch.zeros((), device=self.device),
                torch.zeros(2 + len(self.config.mixes), dtype=torch.float64),
                0.0,
            )
        with self._autocast():
            total, parts = self._engine(batch["image"].to(self.device), plans)
        parts = dist_utils.all_reduce_sum(parts.to(self.device)).cpu() / count
        return total * (self.world_size / count), parts, count

    def backward(self, batch: dict) -> tuple[Tensor, float]:
        """Zero the gradients, then forward and backward of this rank's batch as `accumulate`
        micro-batches; DDP all-reduces only in the last one's backward (`no_sync` before). The
        gradients are those of the global batch's mean loss (each micro-batch's loss is divided by
        the whole step's pair count). Returns (parts, count) as `loss_on` for the whole step."""
        self.optimizer.zero_grad(set_to_none=True)
        parts = torch.zeros(2 + len(self.config.mixes), dtype=torch.float64)
        count = self._global_pairs(batch)
        if count == 0:  # no rank has a non-empty category: no forward at all (keeps DDP's ranks in step)
            return parts, 0.0
        size = self.local_batch // self.config.accumulate
        for offset in range(0, self.local_batch, size):
            micro = {k: v[offset : offset + size] for k, v in batch.items()}
            last = offset + size >= self.local_batch
            hold = getattr(self._engine, "no_sync", None)
            with contextlib.nullcontext() if last or hold is None else hold():
                loss, micro_parts, _ = self.loss_on(micro, offset=offset, count=count)
                self.scaler.scale(loss).backward()
            parts += micro_parts
        return parts, count

    def train_step(self, batch: dict) -> dict:
        """One optimizer step on this rank's share of the global batch; returns the metric row."""
        cfg = self.config
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        parts, count = self.backward(batch)
        grad_norm = float("nan")
        if count > 0:  # the same on every rank (all-reduced): ranks stay in step
            self.scaler.unscale_(self.optimizer)
            # max_norm inf measures without changing the gradients (the clip factor clamps to 1)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip or float("inf")))
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.step += 1
        row = {
            "step": self.step,
            "epoch": (self.step - 1) // self.steps_per_epoch,
            "loss": float(parts[2:].sum()) if count else float("nan"),
            "bce": float(parts[0]) if count else float("nan"),
            "dice": float(parts[1]) if count else float("nan"),
        }
        for k, mix in enumerate(cfg.mixes):
            row[f"loss[{mix}]"] = float(parts[2 + k]) if count else float("nan")
        row.update(lr=lr, grad_norm=grad_norm, step_time=time.perf_counter() - t0, categories=int(count))
        return row

    # ------------------------------------------------------------------ the loop
    def checkpoint_path(self, step: int | None = None) -> pathlib.Path | None:
        if self.config.out_dir is None:
            return None
        return pathlib.Path(self.config.out_dir) / f"checkpoint_{self.step if step is None else step:07d}.pt"

    def best_dir(self) -> pathlib.Path | None:
        """out_dir/best: the best validation's checkpoint.pt, best.json and adapter files."""
        return None if self.config.out_dir is None else pathlib.Path(self.config.out_dir) / "best"

    def fit(self, progress: bool = True, until: int | None = None) -> list[dict]:
        """Train until config.steps optimizer steps are done (from `self.step`, e.g. after resume),
        or only until step `until` (< config.steps: stop early with the schedule of the full run;
        no final validation or checkpoint then), or until early stopping (`patience`).

        Logs every log_every steps (rank 0, to out_dir/train_log.{csv,jsonl}), validates every
        eval_every steps and at the end (out_dir/eval_log.*, eval_labels.*; a new best goes to
        out_dir/best/), checkpoints every save_every steps and at the end
        (out_dir/checkpoint_<step>.pt). progress: show the bar (rank 0, on a terminal or in a
        notebook only). Returns `history` (the logged rows of all fit calls)."""
        cfg = self.config
        stop = cfg.steps if until is None else int(until)
        if not self.step <= stop <= cfg.steps:
            raise InvalidArgumentError(f"until must be in [{self.step}, {cfg.steps}], got {until!r}")
        logs = None
        if cfg.out_dir is not None and dist_utils.is_main():
            logs = RunLogs(cfg.out_dir, validating=self.eval_dataset is not None, tensorboard=cfg.tensorboard)
        bar = TrainProgress(cfg.steps, self.step, enabled=progress)
        last_saved = last_eval = None
        self.stopped_early = False
        self.model.train()
        try:
            while self.step < stop and not self.stopped_early:
                epoch, within = divmod(self.step, self.steps_per_epoch)
                self.sampler.skip = within * self.local_batch
                self.loader.set_epoch(epoch)
                for batch in self.loader:
                    row = self.train_step(batch)
                    bar.step(row)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        self.history.append(row)
                        if logs is not None:
                            logs.train(row)
                    if self.eval_dataset is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                        self._validate_and_log(logs, bar)
                        last_eval = self.step
                        self.stopped_early = self.best.should_stop
                    if cfg.save_every and self.step % cfg.save_every == 0 and cfg.out_dir is not None:
                        self.save_checkpoint(self.checkpoint_path())
                        last_saved = self.step
                    if self.step >= stop or self.stopped_early:
                        break
            if stop < cfg.steps and not self.stopped_early:
                return self.history
            if self.eval_dataset is not None and last_eval != self.step:
                self._validate_and_log(logs, bar)
            if cfg.out_dir is not None and last_saved != self.step:
                self.save_checkpoint(self.checkpoint_path())
        finally:
            bar.close()
            if logs is not None:
                logs.close()
        return self.history

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict:
        """Validate on the eval data as config.eval_mode says (`validation.py`); every rank gets
        the whole result: {"dice", "mean": {prompt: Dice}, "per_organ", "per_label"}."""
        cfg = self.config
        prompts = validation.check_prompts(cfg.eval_mode, cfg.eval_prompts)
        if self.eval_dataset is None:
            raise InvalidArgumentError("validate needs the Trainer's eval_dataset")
        if cfg.eval_mode == "resized":
            return self.evaluate(self.eval_dataset, prompts, jitter=cfg.eval_jitter)
        cases = getattr(self.eval_dataset, "cases", self.eval_dataset)
        return validation.segment_validation(
            self.model, list(cases), prompts, points=cfg.eval_points, zoom_in=cfg.eval_zoom_in
        )

    def _validate_and_log(self, logs: RunLogs | None, bar: TrainProgress) -> None:
        bar.validating()
        result = self.validate()
        row = {
            "step": self.step,
            "dice": result["dice"],
            **{f"dice_{k}": v for k, v in result["mean"].items()},
            "labels": len(result["per_label"]),
        }
        self.eval_history.append(row)
        if logs is not None:
            logs.validation(row, result, list(result["mean"]))
        bar.validated(row[self.config.best_metric])
        if self.best.update(row[self.config.best_metric], self.step) and self.config.save_best:
            self._save_best(row)

    def _save_best(self, row: dict) -> None:
        """out_dir/best/: checkpoint.pt (this trainer's format: `load_weights` or `resume` it),
        best.json (the eval row and the metric) and, for a model with adapters, each adapter's
        file as `adapters.save_adapter` writes it (ready for segment(adapter=...))."""
        best = self.best_dir()
        if best is None:
            return
        self.save_checkpoint(best / "checkpoint.pt")  # collective: every rank takes part
        if dist_utils.is_main():
            for name in adapters.adapter_names(self.model):
                adapters.save_adapter(self.model, name, best / f"adapter_{name}.safetensors")
            summary = {"metric": self.config.best_metric, "value": row[self.config.best_metric], **row}
            text = json.dumps(summary, indent=2, allow_nan=True) + "\n"
            write_file_atomic(best / "best.json", lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))

    def load_weights(self, path) -> Trainer:
        """Put the trained parameters of a checkpoint (e.g. out_dir/best/checkpoint.pt) into the
        model, nothing else (no optimizer, step or RNG): to use or export the best weights."""
        self._load_trainable(read_checkpoint(path)["trainable"], path)
        return self

    def evaluate(self, dataset, prompts: Sequence[str] = EVAL_PROMPTS, jitter: int = 5) -> dict:
        """The cheap validation (`validation.resized_validation`) on `dataset` (a SegmentationDataset,
        normally train=False; case i is dataset[i]): Dice of (logits > 0) per case and label for
        each of prompts "text", "box", "jittered_box" (corners moved by up to `jitter` voxels, the
        same boxes every call). With DDP the cases are split over the ranks and the results
        gathered. Returns {"dice", "mean": {kind: Dice}, "per_organ", "per_label": [{"case",
        "index", "position", "label", kind: Dice...}]}; labels empty after resizing are skipped."""
        return validation.resized_validation(self.model, dataset, prompts, jitter=jitter, autocast=self._autocast)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """What resume needs: trainable parameters (only), optimizer, scheduler, scaler, step,
        RNG states of every rank, config, the best validation so far. Collective under DDP
        (every rank must call it)."""
        rngs = dist_utils.all_gather_objects(rng_state())
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "world_size": self.world_size,
            "config": self.config.to_dict(),
            "trainable": {n: p.detach().cpu().clone() for n, p in zip(self.param_names, self.params)},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
            "best": self.best.state_dict(),
        }

    def save_checkpoint(self, path) -> pathlib.Path | None:
        """Write the checkpoint atomically (temporary file in the same folder, then rename), on
        rank 0 only; every rank must call it. Returns the path (None on other ranks)."""
        state = self.state_dict()
        path = pathlib.Path(path)
        if dist_utils.is_main():
            write_checkpoint(path, state)
        dist_utils.barrier()
        return path if dist_utils.is_main() else None

    def resume(self, path) -> Trainer:
        """Continue from a `save_checkpoint` file: the same model (base weights and adapters
        attached as when it was saved) and the same data-stream settings are required.

        Raises CheckpointError for a foreign or mismatched file."""
        path = pathlib.Path(path)
        state = read_checkpoint(path)
        saved = state["config"]
        changed = [k for k in STREAM_FIELDS if TrainConfig.from_dict(saved).to_dict()[k] != self.config.to_dict()[k]]
        if changed:
            raise CheckpointError(f"{path} was trained with other {changed}: resuming would not continue the run")
        self._load_trainable(state["trainable"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        if "best" in state:  # checkpoints from before best-checkpoint tracking have none
            self.best.load_state_dict(state["best"])
        rngs = state["rng"]
        set_rng_state(rngs[self.rank] if len(rngs) == self.world_size else rngs[0])
        return self

    def _load_trainable(self, tensors: dict, path) -> None:
        mine = dict(zip(self.param_names, self.params))
        missing, extra = sorted(set(mine) - set(tensors)), sorted(set(tensors) - set(mine))
        if missing or extra:
            raise CheckpointError(
                f"{path} trains other parameters than this trainer: missing {missing[:3]}, "
                f"unexpected {extra[:3]} (attach the same adapters first)"
            )
        for name, p in mine.items():
            if tensors[name].shape != p.shape:
                raise CheckpointError(
                    f"{path}: {name} has shape {tuple(tensors[name].shape)}, the model's {tuple(p.shape)}"
                )
        with torch.no_grad():
            for name, p in mine.items():
                p.copy_(tensors[name])
