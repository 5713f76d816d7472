"""patch_embed: a volume to patch tokens (patchify + Linear + bias + position embedding) in one op.

op.py holds the public function, its reference `patch_embed_ref`, the autograd formula and the
registration; triton_kernel.py the Triton kernel; spec.py the cases, argument makers, cost model and
baselines that tests and benchmarks iterate; the C++ and CUDA kernels live in csrc/patch_embed/.
"""

from .op import patch_embed, patch_embed_ref

__all__ = ["patch_embed", "patch_embed_ref"]
