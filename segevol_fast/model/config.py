"""SegVol architecture configuration.

`SegVolConfig()` is the official architecture (docs/official-pipeline.md §1–4): a MONAI-style ViT-B image
encoder over 32×256×256 volumes with 4×16×16 patches, the default CLIP text tower, a SAM-style 3-D
prompt encoder and a two-way-transformer mask decoder. `SegVolConfig.tiny()` keeps every structural
quirk at toy widths so the whole model runs forward and backward on a CPU in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

Triple = tuple[int, int, int]


@dataclass
class SegVolConfig:
    # Image encoder (MONAI ViT, "perceptron" patch embedding, no cls token, no qkv bias).
    spatial_size: Triple = (32, 256, 256)  # (D, H, W) the encoder accepts, exactly
    patch_size: Triple = (4, 16, 16)
    in_channels: int = 1
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    layer_norm_eps: float = 1e-5

    # CLIP text tower: transformers' CLIPTextConfig() defaults, not the ViT-B/32 config file.
    text_vocab_size: int = 49408
    text_hidden_size: int = 512
    text_intermediate_size: int = 2048
    text_num_layers: int = 12
    text_num_heads: int = 8
    text_max_positions: int = 77
    text_layer_norm_eps: float = 1e-5
    text_bos_token_id: int = 49406
    text_eos_token_id: int = 49407
    text_pad_token_id: int = 49407

    # Prompt encoder.
    mask_in_chans: int = 16

    # Mask decoder (SAM TwoWayTransformer made 3-D).
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    # Free-form extras carried through save/load (e.g. the official HF config's fields).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spatial_size = tuple(int(v) for v in self.spatial_size)  # type: ignore[assignment]
        self.patch_size = tuple(int(v) for v in self.patch_size)  # type: ignore[assignment]
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def grid_size(self) -> Triple:
        """Token grid (d, h, w) of the image encoder: spatial_size // patch_size."""
        return tuple(s // p for s, p in zip(self.spatial_size, self.patch_size))  # type: ignore[return-value]

    @property
    def num_patches(self) -> int:
        d, h, w = self.grid_size
        return d * h * w

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: prod(patch_size) * in_channels (1024 officially)."""
        pd, ph, pw = self.patch_size
        return pd * ph * pw * self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def low_res_size(self) -> Triple:
        """Spatial size of the decoder's mask logits before the in-model upsample (grid × 4)."""
        return tuple(4 * g for g in self.grid_size)  # type: ignore[return-value]

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, **overrides: Any) -> "SegVolConfig":
        """Same structure as the official model at toy widths (forward+backward in seconds on CPU)."""
        return cls(**{**_PRESETS["tiny"], **overrides})

    @classmethod
    def small(cls, **overrides: Any) -> "SegVolConfig":
        """The official structure at a width and window that train on a CPU in minutes: a
        16x64x64 window of 4x8x8 patches (256 tokens of 96), 4 encoder blocks, a 2-block text
        tower. Used by the adaptation study (bench/adaptation_study.py) and its trained base."""
        return cls(**{**_PRESETS["small"], **overrides})

    # ------------------------------------------------------------------ checks and (de)serialisation
    def validate(self) -> None:
        problems = []
        for name in ("spatial_size", "patch_size"):
            if len(getattr(self, name)) != 3:
                problems.append(f"{name} must have 3 entries (D, H, W), got {getattr(self, name)}")
        if not problems:
            for s, p in zip(self.spatial_size, self.patch_size):
                if p <= 0 or s % p:
                    problems.append(
                        f"spatial_size {self.spatial_size} must be a multiple of patch_size {self.patch_size}"
                    )
                    break
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.text_hidden_size % self.text_num_heads:
            problems.append(
                f"text_hidden_size {self.text_hidden_size} not divisible by text_num_heads {self.text_num_heads}"
            )
        if self.hidden_size % 8:
            problems.append(f"hidden_size {self.hidden_size} must be divisible by 8 (decoder upscaling to hidden/8)")
        if self.hidden_size % (self.decoder_num_heads * self.attention_downsample_rate):
            problems.append("hidden_size must be divisible by decoder_num_heads * attention_downsample_rate")
        if problems:
            raise ConfigError("invalid SegVolConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["spatial_size"] = list(self.spatial_size)
        d["patch_size"] = list(self.patch_size)
        extra = d.pop("extra")
        out = {"model_type": "segvol", "segevol_fast_config": 1, **extra, **d}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SegVolConfig":
        """Build from our own config.json or the official HF one (which only names sizes)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known and k not in ("segevol_fast_config", "model_type")}
        return cls(**kwargs, extra=extra)

    def save(self, directory: str | os.PathLike) -> None:
        from ..io.output import write_file_atomic

        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(text)

        write_file_atomic(os.path.join(os.fspath(directory), "config.json"), write)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "SegVolConfig":
        path = os.path.join(os.fspath(directory), "config.json")
        with open(path) as f:
            return cls.from_dict(json.load(f))


# Presets: what differs from the official architecture (the dataclass defaults).
_PRESETS: dict[str, dict[str, Any]] = {
    # (name: spatial, patch, hidden, mlp, layers, heads, text hidden/intermediate/layers/heads, decoder heads/mlp, iou hidden)
    name: dict(
        spatial_size=v[0],
        patch_size=v[1],
        hidden_size=v[2],
        mlp_dim=v[3],
        num_layers=v[4],
        num_heads=v[5],
        text_hidden_size=v[6],
        text_intermediate_size=v[7],
        text_num_layers=v[8],
        text_num_heads=v[9],
        mask_in_chans=4,
        decoder_depth=2,
        decoder_num_heads=v[10],
        decoder_mlp_dim=v[11],
        iou_head_hidden_dim=v[12],
    )
    for name, v in {
        "tiny": ((8, 32, 32), (4, 16, 16), 32, 64, 2, 2, 32, 64, 2, 2, 2, 64, 16),
        "small": ((16, 64, 64), (4, 8, 8), 96, 192, 4, 4, 64, 128, 2, 2, 4, 192, 32),
    }.items()
}
