"""flash_attention: non-causal multi-head attention with per-batch key lengths, forward and backward.

op.py holds the public functions, the autograd formula and the registration; reference.py the
plain-PyTorch definition (`flash_attention_ref`) and the CPU backend on ATen's fused kernels;
triton_kernel.py the Triton forward and backward kernels; spec.py the cases, argument makers, cost
model and baselines that tests and benchmarks iterate.
"""

from .op import flash_attention, flash_attention_ref, flash_attention_with_lse

__all__ = ["flash_attention", "flash_attention_ref", "flash_attention_with_lse"]
