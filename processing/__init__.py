"""Image processors and processors of the four VLM patterns (torch/numpy; no torchvision)."""

import transformers  # noqa: F401  (first, before any module of this folder: see vlm_patterns/__init__.py)

from .image_ops import ImageInputError, load_image
from .image_processing_flamingo import FlamingoPatternImageProcessor
from .image_processing_fuyu import FuyuPatternImageProcessor
from .image_processing_llava import LlavaPatternImageProcessor
from .image_processing_qwen2_vl import Qwen2VLPatternImageProcessor
from .processing_flamingo import FlamingoPatternProcessor
from .processing_fuyu import FuyuPatternProcessor
from .processing_llava import LlavaPatternProcessor
from .processing_qwen2_vl import Qwen2VLPatternProcessor

__all__ = [
    "FlamingoPatternImageProcessor",
    "FlamingoPatternProcessor",
    "FuyuPatternImageProcessor",
    "FuyuPatternProcessor",
    "ImageInputError",
    "LlavaPatternImageProcessor",
    "LlavaPatternProcessor",
    "Qwen2VLPatternImageProcessor",
    "Qwen2VLPatternProcessor",
    "load_image",
]
