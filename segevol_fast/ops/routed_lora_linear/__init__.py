"""routed_lora_linear: one Linear layer with E LoRA adapters, each segment of rows routed to its own.

op.py holds the public function, its reference `routed_lora_linear_ref`, the CPU composition, the
autograd formula and the registration (its Triton backend is lora_linear's kernel with per-row
adapter weights); spec.py the cases, argument makers, cost model and baselines that tests and
benchmarks iterate.
"""

from .op import routed_lora_linear, routed_lora_linear_ref

__all__ = ["routed_lora_linear", "routed_lora_linear_ref"]
