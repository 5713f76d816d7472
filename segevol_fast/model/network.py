"""The assembled SegVol network: three calls make a forward pass.

    emb    = model.encode_image(x)                      # (B, hidden, gd, gh, gw)
    text   = model.encode_text(["liver", "spleen"])     # (N, hidden), cached per (name, modality)
    logits = model.decode(emb, text_embedding=text)     # (N, 1, D, H, W) logits; mask = logits > 0

N prompts decode against one image embedding in one batched call. Weights load from the official
checkpoints with `SegVol.from_pretrained` (see `checkpoint.py` for the formats) and save with
`save_pretrained` (safetensors + config.json + tokenizer.json).

This is the network alone; it knows nothing of whole-scan inference. The public `segevol_fast.SegVol`
adds `segment()` and `session()` on top of it (`segevol_fast/segvol.py`).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, InvalidArgumentError, PromptError, ShapeError
from . import checkpoint as ckpt
from .config import SegVolConfig
from .image_encoder import ImageEncoder
from .mask_decoder import MaskDecoder, upsample_logits
from .prompt_encoder import PromptEncoder
from .region_upsample import Box, low_res_box, upsample_box
from .text_encoder import TextEncoder
from .tokenizer import ClipTokenizer
from .weights import resolve_pretrained

# The arithmetic the network can run in, by name; inference adds "auto" (`inference/precision.py`).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def model_device(model: nn.Module) -> torch.device:
    """The device holding a model's weights (its first parameter's): where its inputs must go."""
    return next(model.parameters()).device


def _integer_labels(points):
    """(coords, labels) with float labels 1. / 0. / -1., as the official `forward_decoder` passes
    them, turned into the integer labels the prompt encoder takes; a float label that is none of
    them (0.5, nan) is a PromptError. Anything else is returned as is for the prompt encoder to check."""
    if not isinstance(points, (tuple, list)) or len(points) != 2:
        return points
    coords, labels = points
    if not (torch.is_tensor(labels) and labels.is_floating_point()):
        return points
    known = (labels == 1) | (labels == 0) | (labels == -1)
    if not bool(known.all()):
        wrong = labels[~known].flatten()[0].item()
        raise PromptError(
            f"point label {wrong:g} is not a label: each must be 1 (positive), 0 (negative) or "
            "-1 (padding), as an integer or the equal float"
        )
    return coords, labels.long()


def check_weights_precision(precision: str, weights: str) -> None:
    """Refuse arithmetic `precision` for weights stored as `weights` (both PRECISIONS names) when
    it cannot be honoured: bf16 / fp16 weights compute in their own dtype only."""
    if weights == "fp32" or precision == weights:
        return
    raise InvalidArgumentError(
        f"precision={precision!r} cannot run on weights stored in {weights}: they compute in {weights} only. "
        f"Use precision='auto' or {weights!r}, or keep float32 weights (model.float()) and ask for "
        "precision='bf16' (autocast) to save activation memory"
    )


class SegVolNetwork(nn.Module):
    """SegVol's network: image encoder, text encoder, prompt encoder and mask decoder.

    Args:
        config: architecture; `SegVolConfig()` (default) is the official one.
        tokenizer: a `ClipTokenizer` or a folder holding its files; needed for text prompts.
        precision: "fp32" (default), or "bf16"/"fp16" to run encode_image/decode under autocast
            (weights stay fp32; autocast keeps LayerNorm and softmax accumulation in fp32).

    Weights cast by the caller (`model.to(torch.bfloat16)` or `.half()`, half the weight memory)
    compute in their own dtype only: `precision` then reads "bf16" / "fp16" whatever was set,
    encode_image/decode run under that autocast (LayerNorm statistics, positional encodings and
    residual streams stay float32 as with float32 weights; see `layers.wide_dtype`), and asking
    for another precision is an InvalidArgumentError. `model.float()` restores the set precision.
    """

    def __init__(self, config: Optional[SegVolConfig] = None, tokenizer=None, precision: str = "fp32"):
        super().__init__()
        self.config = config if config is not None else SegVolConfig()
        self.image_encoder = ImageEncoder(self.config)
        self.text_encoder = TextEncoder(self.config)
        self.prompt_encoder = PromptEncoder(self.config)
        self.mask_decoder = MaskDecoder(self.config)
        self.tokenizer = tokenizer
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self._precision = precision  # not checked against the weights: a bf16 default dtype reads as "bf16"
        # Where the weights came from (set by from_pretrained); None means random initialisation,
        # which segment() reports loudly: masks from random weights are meaningless.
        self.weights_source: Optional[str] = None

    # ------------------------------------------------------------------ settings
    @property
    def tokenizer(self) -> Optional[ClipTokenizer]:
        return self.text_encoder.tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        if value is not None and not isinstance(value, ClipTokenizer):
            value = ClipTokenizer(value)
        self.text_encoder.tokenizer = value

    @property
    def weights_precision(self) -> str:
        """The dtype the weights are stored in, by precision name: "bf16" / "fp16" when the caller
        cast them, else "fp32" (float64 weights count as "fp32": they run as before, without
        autocast). Weights of several floating dtypes (part of the model cast) are an
        InvalidArgumentError."""
        dtypes = {p.dtype for p in self.parameters() if p.is_floating_point()}
        low = [name for name, dtype in PRECISIONS.items() if dtype in dtypes and name != "fp32"]
        if len(dtypes) > 1:
            raise InvalidArgumentError(
                f"the model's weights mix dtypes {sorted(str(d) for d in dtypes)}: cast the whole model at once "
                "(model.to(torch.bfloat16), or model.float() to run at any precision)"
            )
        return low[0] if low else "fp32"

    @property
    def precision(self) -> str:
        """The autocast precision encode_image/decode run under: the set one, or the weights' own
        dtype when they are bf16 / fp16."""
        weights = self.weights_precision
        return self._precision if weights == "fp32" else weights

    @precision.setter
    def precision(self, value: str) -> None:
        self.set_precision(value)

    def set_precision(self, precision: str) -> "SegVolNetwork":
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        check_weights_precision(precision, self.weights_precision)
        if self.weights_precision == "fp32":  # cast weights imply their precision; float() restores this one
            self._precision = precision
        return self

    def _autocast(self, device: torch.device):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=PRECISIONS[self.precision])

    # ------------------------------------------------------------------ the three calls
    def encode_image(self, x: Tensor, input_scale: float = 1.0, input_shift: float = 0.0) -> Tensor:
        """x (B, 1, D, H, W) == config.spatial_size, values in [0, 1] -> (B, hidden, gd, gh, gw).

        `input_scale`/`input_shift` apply x*scale+shift inside the patch embedding (fused).
        Under reduced precision the embedding comes back in the autocast dtype.
        """
        with self._autocast(x.device):
            return self.image_encoder(x, input_scale, input_shift)

    def encode_image_tokens(
        self,
        x: Tensor,
        token_lo: Sequence[int] | Sequence[Sequence[int]],
        token_hi: Sequence[int] | Sequence[Sequence[int]],
        input_scale: float = 1.0,
        input_shift: float = 0.0,
        padding_groups: Optional[Tensor] = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """`encode_image` of a box [token_lo, token_hi) of the token grid only: x holds the box's
        voxels (B, 1, bd*pd, bh*ph, bw*pw) -> (B, hidden, bd, bh, bw) (`ImageEncoder.encode_box`:
        one box for the batch or one per item; padding_groups adds summary tokens for the padding
        left out, and their outputs are returned too; AdapterError under an encoder-level adapter)."""
        with self._autocast(x.device):
            return self.image_encoder.encode_box(x, token_lo, token_hi, input_scale, input_shift, padding_groups)

    def encode_text(self, names: str | Sequence[str], modality: str = "ct") -> Tensor:
        """Category names -> (N, hidden) text embeddings, templated per modality ("ct" uses the
        official "A computerized tomography of a {}."; "mri" a magnetic-resonance template)."""
        if self.tokenizer is None:
            raise ValueError(
                "text prompts need the CLIP tokenizer: load the model with from_pretrained(dir) from a folder "
                "holding tokenizer.json (or vocab.json + merges.txt), or set model.tokenizer = 'path/to/folder'"
            )
        return self.text_encoder.encode(names, modality)

    def decode(
        self,
        image_embedding: Tensor,
        text_embedding: Optional[Tensor] = None,
        boxes: Optional[Tensor] = None,
        points: Optional[tuple[Tensor, Tensor]] = None,
        upsample: bool = True,
        region: Optional[Box] = None,
        image_pe: Optional[Tensor] = None,
        reassociate: bool = False,
    ) -> Tensor:
        """Decode N prompts against an image embedding.

        Args:
            image_embedding: (1 or N, hidden, gd, gh, gw) from `encode_image`; batch 1 is shared
                by all N prompts without copies.
            text_embedding: None or (N, hidden) from `encode_text`.
            boxes: None or (N, 6) voxel boxes (d_min, h_min, w_min, d_max, h_max, w_max), maxima
                inclusive, in the spatial_size frame; all -1 is the official "empty box".
            points: None or (coords (N, P, 3) voxel (d, h, w), labels (N, P): 1 positive,
                0 negative, -1 padding). Float labels equal to 1., 0., -1. (the official
                `forward_decoder` passes floats) are taken as those integers; others are a PromptError.
            upsample: True (official) returns logits at spatial_size; False returns the decoder's
                low-res logits (N, 1, 4gd, 4gh, 4gw), 16x smaller.
            region: None, or (lo, hi) a box of the spatial_size frame (hi exclusive, upsample
                only): just those logits are computed, (N, 1, *(hi - lo)); the decoder's upscaling
                runs over the low-res box they read (`MaskDecoder(region=...)`) and only the box is
                upsampled (`region_upsample.py`). Equal to the whole result cropped up to
                summation order.
            image_pe: `prompt_encoder.get_dense_pe()` when the caller already holds it (it
                depends on the weights only: many decodes can share one).
            reassociate: `MaskDecoder(reassociate=...)`: cross-attention products in the order
                that is cheap for a few prompt tokens; equal up to float rounding (fast mode).

        Returns:
            float32 logits (N, 1, D, H, W) (or low-res, or the region); the mask is logits > 0
            (sigmoid > 0.5).
        """
        if text_embedding is None and boxes is None and points is None:
            raise ValueError("decode needs at least one prompt: text_embedding, boxes or points")
        if region is not None and not upsample:
            raise ValueError("decode(region=...) is a box of the upsampled logits: it needs upsample=True")
        device, size = image_embedding.device, tuple(self.config.spatial_size)
        low_shape = tuple(4 * g for g in self.config.grid_size)
        low_box = None if region is None else low_res_box(low_shape, size, region)
        points = _integer_labels(points)
        with self._autocast(device):
            sparse, dense = self.prompt_encoder(points=points, boxes=boxes, text_embedding=text_embedding)
            if image_pe is None:
                image_pe = self.prompt_encoder.get_dense_pe()
            if image_embedding.dtype != sparse.dtype and not torch.is_autocast_enabled(device.type):
                image_embedding = image_embedding.to(sparse.dtype)
            low = self.mask_decoder(
                image_embedding, image_pe, sparse, dense, text_embedding, region=low_box, reassociate=reassociate
            )
        low = low.float()
        if region is not None:
            return upsample_box(low, low_box[0], low_shape, size, region)
        return upsample_logits(low, size) if upsample else low

    def forward(
        self,
        image: Tensor,
        text: str | Sequence[str] | None = None,
        boxes: Optional[Tensor] = None,
        points: Optional[tuple[Tensor, Tensor]] = None,
        modality: str = "ct",
    ) -> Tensor:
        """One image (1, 1, D, H, W) and N prompts -> logits (N, 1, D, H, W)."""
        if image.dim() != 5 or image.shape[0] != 1:
            raise ShapeError(
                f"forward takes one image (1, 1, D, H, W), got {tuple(image.shape)}; "
                "for batches call encode_image/decode"
            )
        emb = self.encode_image(image)
        txt = self.encode_text(text, modality) if text is not None else None
        return self.decode(emb, text_embedding=txt, boxes=boxes, points=points)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        config: Optional[SegVolConfig] = None,
        tokenizer=None,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        download: bool = False,
    ) -> "SegVolNetwork":
        """Load weights from an HF-style folder, `SegVol_v1.pth`, a bare state-dict file, our own
        `save_pretrained` folder, or (encoder only) `vit_pretrain.ckpt`, into an instance of `cls`
        (`segevol_fast.SegVol.from_pretrained` gives the public `SegVol`).

        `path` may also be the Hugging Face name "BAAI/SegVol" (or "SegVol") when no local file or
        folder has that name: the weights are then looked up as the CLI does ($SEGEVOL_WEIGHTS,
        the Hugging Face cache, and with download=True the Hub); WeightsNotFoundError says how to
        get them when none is found.

        The config comes from `config`, else the folder's config.json, else the official one.
        The tokenizer comes from `tokenizer`, else the folder of the weights. Loading is strict:
        one CheckpointError lists every missing, unexpected and mis-shaped key. Nothing pickled is
        executed (safetensors, or torch.load(weights_only=True), memory-mapped when possible).
        """
        path = resolve_pretrained(path, download=download)
        if not path.exists():
            raise CheckpointError(f"{path} does not exist")
        folder = path if path.is_dir() else path.parent
        if config is None:
            config = SegVolConfig.load(folder) if (folder / "config.json").is_file() else SegVolConfig()
        if tokenizer is None and any((folder / f).is_file() for f in _TOKENIZER_FILES):
            tokenizer = folder
        weights = ckpt.load_weights(path)
        if weights.kind == "image_encoder":
            model = cls(config, tokenizer=tokenizer, precision=precision)
            ckpt.check_and_load(model.image_encoder, weights.state_dict, weights.source, prefix="image_encoder.")
            warnings.warn(
                f"{weights.source} holds only the pre-trained image encoder; the text encoder, prompt "
                "encoder and mask decoder are randomly initialised",
                stacklevel=2,
            )
        else:
            # Build on the meta device and adopt the loaded tensors: no random init of 181 M
            # parameters and no second copy of the weights in memory.
            with torch.device("meta"):
                model = cls(config, precision=precision)
            ckpt.check_and_load(model, weights.state_dict, weights.source, assign=True)
            model.tokenizer = tokenizer
        model.weights_source = weights.source if weights.kind == "full" else None
        if device is not None:
            model.to(device)
        return model.eval()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write model.safetensors, config.json and (when set) tokenizer.json into `directory`."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ckpt.save_safetensors(self.state_dict(), directory / "model.safetensors")
        self.config.save(directory)
        if self.tokenizer is not None:
            self.tokenizer.save(directory / "tokenizer.json")
