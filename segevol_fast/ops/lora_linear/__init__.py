"""lora_linear: a Linear layer plus its LoRA update in one op (x read once).

op.py holds the public function, its reference `lora_linear_ref`, the CPU composition, the autograd
formula and the registration; triton_kernel.py the Triton kernel (routed_lora_linear launches it
too); spec.py the cases, argument makers, cost model and baselines that tests and benchmarks iterate.
"""

from .op import lora_linear, lora_linear_ref, stack_lora_slices

__all__ = ["lora_linear", "lora_linear_ref", "stack_lora_slices"]
