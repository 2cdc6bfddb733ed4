"""Configs and models of the four VLM patterns; importing this package registers them with the Auto classes.

After `import modeling`, `AutoConfig`, `AutoModel`, `AutoModelForImageTextToText`, `AutoProcessor` and
`AutoImageProcessor` resolve our model types; `save_pretrained` output also loads anywhere with
`trust_remote_code=True`, because each class registers itself for the Auto class that loads it.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

from processing import (
    FlamingoPatternImageProcessor,
    FlamingoPatternProcessor,
    FuyuPatternImageProcessor,
    FuyuPatternProcessor,
    LlavaPatternImageProcessor,
    LlavaPatternProcessor,
    Qwen2VLPatternImageProcessor,
    Qwen2VLPatternProcessor,
)

from .configuration_backbones import TextDecoderConfig, VisionTowerConfig
from .configuration_flamingo import FlamingoPatternConfig
from .configuration_fuyu import FuyuPatternConfig
from .configuration_llava import LlavaPatternConfig
from .configuration_qwen2_vl import Qwen2VLPatternConfig, Qwen2VLVisionTowerConfig
from .modeling_flamingo import FlamingoPatternForConditionalGeneration, FlamingoPatternModel
from .modeling_fuyu import FuyuPatternForConditionalGeneration, FuyuPatternModel
from .modeling_llava import LlavaPatternForConditionalGeneration, LlavaPatternModel
from .modeling_qwen2_vl import Qwen2VLPatternForConditionalGeneration, Qwen2VLPatternModel

FAMILIES = {
    "flamingo": (
        FlamingoPatternConfig,
        FlamingoPatternModel,
        FlamingoPatternForConditionalGeneration,
        FlamingoPatternProcessor,
        FlamingoPatternImageProcessor,
    ),
    "llava": (
        LlavaPatternConfig,
        LlavaPatternModel,
        LlavaPatternForConditionalGeneration,
        LlavaPatternProcessor,
        LlavaPatternImageProcessor,
    ),
    "qwen2_vl": (
        Qwen2VLPatternConfig,
        Qwen2VLPatternModel,
        Qwen2VLPatternForConditionalGeneration,
        Qwen2VLPatternProcessor,
        Qwen2VLPatternImageProcessor,
    ),
    "fuyu": (
        FuyuPatternConfig,
        FuyuPatternModel,
        FuyuPatternForConditionalGeneration,
        FuyuPatternProcessor,
        FuyuPatternImageProcessor,
    ),
}


def _register(config_class, model_class, generation_class, processor_class, image_processor_class) -> None:
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    AutoModelForImageTextToText.register(config_class, generation_class, exist_ok=True)
    AutoProcessor.register(config_class, processor_class, exist_ok=True)
    AutoImageProcessor.register(config_class, image_processor_classes={"pil": image_processor_class}, exist_ok=True)
    config_class.register_for_auto_class()
    model_class.register_for_auto_class("AutoModel")
    generation_class.register_for_auto_class("AutoModelForImageTextToText")
    processor_class.register_for_auto_class("AutoProcessor")
    image_processor_class.register_for_auto_class("AutoImageProcessor")


for _classes in FAMILIES.values():
    _register(*_classes)

__all__ = [
    "FAMILIES",
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
