"""Image processors and processors of the four VLM patterns (torch/numpy; no torchvision)."""

from .image_ops import ImageInputError, load_image
from .image_processing_llava import LlavaPatternImageProcessor
from .processing_llava import LlavaPatternProcessor

__all__ = ["ImageInputError", "LlavaPatternImageProcessor", "LlavaPatternProcessor", "load_image"]
