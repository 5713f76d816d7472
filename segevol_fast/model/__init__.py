"""SegVol model: image encoder, text encoder, prompt encoder, mask decoder, checkpoints."""

from .config import SegVolConfig

__all__ = ["SegVolConfig"]
