"""Configs and models of the four VLM patterns (`import vlm_patterns` registers them with the Auto classes).

Every file here imports only from this folder and installed packages: `save_pretrained` copies a model's file and
the files it imports into the checkpoint, so that it loads anywhere with `trust_remote_code=True`.
"""

import transformers  # noqa: F401  (first, before any module of this folder: see vlm_patterns/__init__.py)

from .configuration_backbones import TextDecoderConfig, VisionTowerConfig
from .configuration_flamingo import FlamingoPatternConfig
from .configuration_fuyu import FuyuPatternConfig
from .configuration_llava import LlavaPatternConfig
from .configuration_qwen2_vl import Qwen2VLPatternConfig, Qwen2VLVisionTowerConfig
from .modeling_flamingo import FlamingoPatternForConditionalGeneration, FlamingoPatternModel
from .modeling_fuyu import FuyuPatternForConditionalGeneration, FuyuPatternModel
from .modeling_llava import LlavaPatternForConditionalGeneration, LlavaPatternModel
from .modeling_qwen2_vl import Qwen2VLPatternForConditionalGeneration, Qwen2VLPatternModel

__all__ = [
    "FlamingoPatternConfig",
    "FlamingoPatternForConditionalGeneration",
    "FlamingoPatternModel",
    "FuyuPatternConfig",
    "FuyuPatternForConditionalGeneration",
    "FuyuPatternModel",
    "LlavaPatternConfig",
    "LlavaPatternForConditionalGeneration",
    "LlavaPatternModel",
    "Qwen2VLPatternConfig",
    "Qwen2VLPatternForConditionalGeneration",
    "Qwen2VLPatternModel",
    "Qwen2VLVisionTowerConfig",
    "TextDecoderConfig",
    "VisionTowerConfig",
]
