"""Zoom-out-zoom-in inference: prompts, the exact (official) and fast modes, memory planning."""

from .prompts import Prompt, PromptError, build_prompts

__all__ = ["Prompt", "PromptError", "build_prompts"]
