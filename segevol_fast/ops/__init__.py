"""Kernels others can call directly.

Every op `<op>` has a plain-PyTorch twin `<op>_ref` that defines what correct means, dispatches
between native C++/CUDA, Triton and the reference (see `_backend`), and is registered as
`torch.ops.segevol_fast.<op>` with a fake kernel so torch.compile can trace it. Each op is one
folder, ops/<op>/ (function, reference, autograd, Triton kernel, spec), built on the one scaffold in
`_op` (`define_op`); its import line below registers it. Adding an op: docs/ops.md.
"""

from ._backend import available_backends, backend_report, forced_backend, registered_ops, select, use_backend
from .flash_attention import flash_attention, flash_attention_ref, flash_attention_with_lse
from .lora_linear import lora_linear, lora_linear_ref, stack_lora_slices
from .patch_embed import patch_embed, patch_embed_ref
from .routed_lora_linear import routed_lora_linear, routed_lora_linear_ref

__all__ = [
    "flash_attention",
    "flash_attention_ref",
    "flash_attention_with_lse",
    "lora_linear",
    "lora_linear_ref",
    "stack_lora_slices",
    "patch_embed",
    "patch_embed_ref",
    "routed_lora_linear",
    "routed_lora_linear_ref",
    "use_backend",
    "select",
    "available_backends",
    "forced_backend",
    "registered_ops",
    "backend_report",
]
