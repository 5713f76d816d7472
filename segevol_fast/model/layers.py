"""Small building blocks shared by the model modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm32(nn.LayerNorm):
    """nn.LayerNorm that always normalises in at least float32.

    Under bf16/fp16 autocast the statistics of a LayerNorm must not be taken in 16 bits (the mask
    decoder's full-shape LayerNorm averages 3.1 M values per sample). CUDA autocast already runs
    layer_norm in float32 but CPU autocast does not, so this makes the rule device-independent.
    The output stays float32 (autocast casts it for the next matmul; residual streams stay wide).
    Same parameters and state-dict keys as nn.LayerNorm.
    """

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)
