"""SegVol's prompt encoder: SAM's prompt encoder made 3-D (docs/official-pipeline.md §2).

Points, box corners and the text embedding become sparse tokens (B, T, hidden); the dense prompt
is always the learned "no mask" vector broadcast over the token grid. Two coordinate quirks that
are baked into the official weights are reproduced on purpose (docs/official-pipeline.md §11.4):

* point / box coordinates are divided by (spatial[1], spatial[0], spatial[2]) — (256, 32, 256)
  officially — i.e. dims 0 and 1 swap their divisors (SAM's (x/W, y/H) carried into 3-D);
* the dense positional encoding feeds cell (i, j, k) as [(j+.5)/gh, (i+.5)/gd, (k+.5)/gw].

Parameter and buffer names equal the official module's, so `state_dict()` keys match the
checkpoint's `prompt_encoder.*` keys.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from .config import SegVolConfig
from .layers import wide_dtype


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding of 3-D coordinates.

    The (3, num_feats) Gaussian matrix is a persistent buffer: it is drawn at construction but the
    checkpoint's copy must be loaded, since the decoder was trained against those frequencies.
    """

    def __init__(self, num_feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, num_feats))

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` must not round the frequencies: a phase of tens of radians
        # moves by a tenth of a radian when G loses its low bits. The matrix follows every device
        # move and `.double()`; a cast to 16 bits leaves it float32, taken from the tensor before.
        before = self.positional_encoding_gaussian_matrix
        super()._apply(fn, recurse)
        after = self.positional_encoding_gaussian_matrix
        wide = torch.promote_types(after.dtype, torch.float32)
        if after.dtype != wide:
            self.positional_encoding_gaussian_matrix = before.to(device=after.device, dtype=wide)
        return self

    def encode(self, coords: Tensor) -> Tensor:
        """coords (..., 3) already normalised (nominally to [0, 1]) -> (..., 2*num_feats) float32.

        [sin, cos] of 2π·(2c−1)·G. Computed in float32 whatever the module dtype: the phases reach
        tens of radians (h/32 goes up to 8), which half precision cannot resolve.
        """
        g = self.positional_encoding_gaussian_matrix.float()
        phase = (2.0 * math.pi) * ((2.0 * coords.float() - 1.0) @ g)
        return torch.cat([phase.sin(), phase.cos()], dim=-1)


class LayerNorm2d(nn.Module):
    """Channel-wise LayerNorm over (B, C, H, W), eps 1e-6 — only here to hold dead checkpoint keys."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> (B, C, H, W), normalised over C."""
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class PromptEncoder(nn.Module):
    """Encodes point / box / text prompts into sparse tokens and the dense "no mask" embedding."""

    def __init__(self, config: SegVolConfig):
        super().__init__()
        hidden, chans = config.hidden_size, config.mask_in_chans
        self.hidden_size = hidden
        self.grid_size = config.grid_size
        d, h, w = config.spatial_size
        # The official divisors for coordinate dims (0, 1, 2) are (H, D, W): see the module docstring.
        self.coord_divisors = (float(h), float(d), float(w))
        self.pe_layer = PositionEmbeddingRandom(hidden // 2)
        # 0: negative point, 1: positive point, 2: box corner min, 3: box corner max.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, hidden) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, hidden)
        self.no_mask_embed = nn.Embedding(1, hidden)
        # Dead 2-D mask stack left over from SAM. Kept ONLY so the official checkpoint loads
        # strictly; SegVol never passes masks and this would not even run on 3-D masks.
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(chans // 4),
            nn.GELU(),
            nn.Conv2d(chans // 4, chans, kernel_size=2, stride=2),
            LayerNorm2d(chans),
            nn.GELU(),
            nn.Conv2d(chans, hidden, kernel_size=1),
        )

    # ------------------------------------------------------------------ positional encodings
    def get_dense_pe(self) -> Tensor:
        """Positional encoding of every image token: (1, hidden, gd, gh, gw), module dtype
        (float32 under autocast).

        Cell (i, j, k) is encoded from [(j+.5)/gh, (i+.5)/gd, (k+.5)/gw] (official axis order).
        """
        gd, gh, gw = self.grid_size
        dev = self.pe_layer.positional_encoding_gaussian_matrix.device
        i = (torch.arange(gd, device=dev, dtype=torch.float32) + 0.5) / gd
        j = (torch.arange(gh, device=dev, dtype=torch.float32) + 0.5) / gh
        k = (torch.arange(gw, device=dev, dtype=torch.float32) + 0.5) / gw
        ii, jj, kk = torch.meshgrid(i, j, k, indexing="ij")
        pe = self.pe_layer.encode(torch.stack([jj, ii, kk], dim=-1))  # (gd, gh, gw, hidden)
        return pe.permute(3, 0, 1, 2).unsqueeze(0).to(wide_dtype(self.no_mask_embed.weight))

    def _encode_coords(self, coords: Tensor) -> Tensor:
        """Voxel indices (B, N, 3) in (d, h, w) -> PE (B, N, hidden) float32, with the +0.5 shift
        to voxel centres and the official per-axis divisors."""
        c = coords.float() + 0.5
        dh, dd, dw = self.coord_divisors
        return self.pe_layer.encode(torch.stack([c[..., 0] / dh, c[..., 1] / dd, c[..., 2] / dw], dim=-1))

    # ------------------------------------------------------------------ prompt embeddings
    def _embed_points(self, coords: Tensor, labels: Tensor, pad: bool) -> Tensor:
        """coords (B, P, 3), labels (B, P) in {-1, 0, 1} -> (B, P + pad, hidden).

        Label -1 (padding): PE zeroed, not_a_point added; 0: + point_embeddings[0]; 1: +
        point_embeddings[1]; any other label keeps the bare PE, as officially.
        """
        dtype = wide_dtype(self.not_a_point_embed.weight)
        pe = self._encode_coords(coords).to(dtype)
        if pad:
            # A not-a-point token keeps the decoder's token count the same with or without a box.
            # Its coordinate never matters: the PE of label -1 is zeroed below.
            pe = torch.cat([pe, pe.new_zeros(pe.shape[0], 1, pe.shape[2])], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        is_pad, neg, pos = (labels == -1)[..., None], (labels == 0)[..., None], (labels == 1)[..., None]
        pe = pe.masked_fill(is_pad, 0.0)
        return (
            pe
            + is_pad * self.not_a_point_embed.weight.to(dtype)
            + neg * self.point_embeddings[0].weight.to(dtype)
            + pos * self.point_embeddings[1].weight.to(dtype)
        )

    def _embed_boxes(self, boxes: Tensor) -> Tensor:
        """boxes (B, 6) = (d0, h0, w0, d1, h1, w1) -> corner tokens (B, 2, hidden).

        An all -1 "empty" box is encoded like any other (corners at -0.5), as officially.
        """
        dtype = wide_dtype(self.no_mask_embed.weight)
        pe = self._encode_coords(boxes.reshape(-1, 2, 3)).to(dtype)
        corner = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0).to(dtype)
        return pe + corner  # (B, 2, hidden) + (2, hidden)

    def forward(
        self,
        points: Optional[tuple[Tensor, Tensor]] = None,
        boxes: Optional[Tensor] = None,
        text_embedding: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        """Embed one batch of prompts.

        Args:
            points: None or (coords (B, P, 3) voxel indices (d, h, w) in the spatial_size frame,
                labels (B, P) integer: 1 positive, 0 negative, -1 padding).
            boxes: None or (B, 6) (or (B, 1, 6)) = (d_min, h_min, w_min, d_max, h_max, w_max),
                inclusive voxel indices; all -1 for an empty box.
            text_embedding: None or (B, hidden), appended as the last token unchanged.

        Returns:
            sparse: (B, T, hidden), tokens ordered [points (+1 padding point when no box)]
                [2 box corners] [text]; T may be 0.
            dense: (B, hidden, gd, gh, gw), the no-mask embedding expanded (a stride-0 view).
            B comes from points, else boxes, else text, else 1.
        """
        hidden = self.hidden_size
        # prompt tokens start the decoder's residual streams: float32 under autocast (`wide_dtype`)
        weight = self.no_mask_embed.weight
        weight = weight.to(wide_dtype(weight))
        batch = self._check(points, boxes, text_embedding)
        parts = []
        if points is not None:
            parts.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        if text_embedding is not None:
            parts.append(text_embedding.to(weight.dtype).unsqueeze(1))
        if parts:
            sparse = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        else:
            sparse = weight.new_empty(batch, 0, hidden)
        dense = weight.reshape(1, hidden, 1, 1, 1).expand(batch, hidden, *self.grid_size)
        return sparse, dense

    def _check(self, points, boxes, text) -> int:
        """Validate prompt shapes; return the batch size."""
        sizes = []
        if points is not None:
            if not isinstance(points, (tuple, list)) or len(points) != 2:
                raise ShapeError("points must be a pair (coords (B, P, 3), labels (B, P))")
            coords, labels = points
            if coords.dim() != 3 or coords.shape[-1] != 3:
                raise ShapeError(f"point coords must be (B, P, 3) voxel indices (d, h, w), got {tuple(coords.shape)}")
            if tuple(labels.shape) != tuple(coords.shape[:2]):
                raise ShapeError(f"point labels must be (B, P) = {tuple(coords.shape[:2])}, got {tuple(labels.shape)}")
            if labels.is_floating_point():
                raise ShapeError("point labels must be an integer tensor (1 positive, 0 negative, -1 padding)")
            sizes.append(("points", coords.shape[0]))
        if boxes is not None:
            if not (boxes.dim() == 2 and boxes.shape[1] == 6) and not (boxes.dim() == 3 and boxes.shape[1:] == (1, 6)):
                raise ShapeError(
                    f"boxes must be (B, 6) = (d_min, h_min, w_min, d_max, h_max, w_max), got {tuple(boxes.shape)}"
                )
            sizes.append(("boxes", boxes.shape[0]))
        if text is not None:
            if text.dim() != 2 or text.shape[1] != self.hidden_size:
                raise ShapeError(f"text_embedding must be (B, {self.hidden_size}), got {tuple(text.shape)}")
            sizes.append(("text_embedding", text.shape[0]))
        if len({b for _, b in sizes}) > 1:
            raise ShapeError("prompt batch sizes differ: " + ", ".join(f"{n} {b}" for n, b in sizes))
        return sizes[0][1] if sizes else 1
