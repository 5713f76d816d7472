"""Small building blocks shared by the model modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def wide_dtype(param: Tensor) -> torch.dtype:
    """The dtype a parameter enters elementwise arithmetic in (additions to residual streams,
    position embeddings, prompt tokens): at least float32 under autocast, else its own dtype.

    Autocast narrows only the inputs of matmuls; what the model adds outside them stays wide, so
    weights cast to bf16/fp16 by the caller (`model.to(torch.bfloat16)`) give the same residual
    streams as float32 weights under autocast. For float32 weights this is always float32: a no-op.
    """
    if torch.is_autocast_enabled(param.device.type):
        return torch.promote_types(param.dtype, torch.float32)
    return param.dtype


class LayerNorm32(nn.LayerNorm):
    """nn.LayerNorm that always normalises in at least float32.

    Under bf16/fp16 autocast the statistics of a LayerNorm must not be taken in 16 bits (the mask
    decoder's full-shape LayerNorm averages 3.1 M values per sample). CUDA autocast already runs
    layer_norm in float32 but CPU autocast does not, so this makes the rule device-independent.
    Under autocast the output stays float32 (autocast casts it for the next matmul; residual
    streams stay wide). Without autocast it comes back in the input's dtype, so a model whose
    weights were cast to bf16/fp16 feeds its next Linear the dtype of that Linear's weights.
    Same parameters and state-dict keys as nn.LayerNorm.
    """

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        autocast = torch.is_autocast_enabled(x.device.type)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)
        return out if autocast else out.to(x.dtype)
