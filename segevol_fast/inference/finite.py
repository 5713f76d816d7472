"""Non-finite logits are refused, never turned into masks.

NaN > 0 is False, so a model that gives NaN logits (NaN weights or adapter tensors, a float16
overflow) would yield an empty mask and NaN probabilities that look like a result. The runs check
each prompt's logits with one isfinite reduction, kept on the device until the prompt is done,
and raise `NonFiniteOutputError` naming the prompts; the message says which cause applies by
looking for non-finite tensors in the model (only then, so the normal path pays nothing for it).
"""

from __future__ import annotations

from itertools import chain
from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import NonFiniteOutputError
from ..model.checkpoint import all_finite


def finite_rows(logits: Tensor) -> Tensor:
    """(N, ...) -> (N,) bool on the same device: row i holds only finite values (no sync)."""
    return torch.isfinite(logits).reshape(len(logits), -1).all(dim=1)


def check_finite_logits(model: nn.Module, finite, labels: Sequence[str], stage: str) -> None:
    """Raise NonFiniteOutputError for the prompts (labels[i]) whose `finite[i]` is False
    (`finite`: a (N,) bool tensor or a sequence of bools / 0-d bool tensors)."""
    flags = finite.tolist() if isinstance(finite, Tensor) else [bool(ok) for ok in finite]  # one sync each
    bad = [label for label, ok in zip(labels, flags) if not ok]
    if bad:
        raise NonFiniteOutputError(
            f"the model gave NaN or infinite logits in the {stage} pass for prompt(s) {', '.join(map(repr, bad))}: "
            f"no mask was made. {_cause(model)}",
            prompts=bad,
        )


def _cause(model: nn.Module) -> str:
    """Why the logits are not finite, as far as the model's own tensors tell."""
    for name, t in chain(model.named_parameters(), model.named_buffers()):
        if not all_finite(t):
            return (
                f"The model's tensor {name} holds NaN or infinite values: reload the weights "
                "(SegVol.from_pretrained) and any adapter from intact files."
            )
    return (
        "The weights are finite, so a computation overflowed: float16 (precision='fp16', or 'auto' on a "
        "GPU without bfloat16) ends at 65504; rerun with precision='fp32' or 'bf16'."
    )
