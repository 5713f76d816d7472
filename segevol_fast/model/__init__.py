"""SegVol's network: image encoder, text encoder, prompt encoder, mask decoder, checkpoints."""

from .config import SegVolConfig
from .image_encoder import ImageEncoder
from .mask_decoder import MaskDecoder
from .network import SegVolNetwork, model_device
from .prompt_encoder import PromptEncoder
from .text_encoder import TextEncoder
from .tokenizer import ClipTokenizer, prompt_text

__all__ = [
    "SegVolNetwork",
    "SegVolConfig",
    "ImageEncoder",
    "TextEncoder",
    "PromptEncoder",
    "MaskDecoder",
    "ClipTokenizer",
    "prompt_text",
    "model_device",
]
