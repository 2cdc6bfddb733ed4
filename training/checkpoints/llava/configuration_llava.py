"""Config of the LLaVA (projection) pattern. Defaults reproduce `llava-hf/llava-1.5-7b-hf`."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_backbones import TextDecoderConfig, VisionTowerConfig


@strict
class LlavaPatternConfig(PreTrainedConfig):
    """CLIP ViT features from `vision_feature_layer` -> projector -> the LLM's embeddings at `<image>` tokens.

    projector_type: `mlp2x_gelu` (LLaVA-1.5: Linear, GELU, Linear) or `linear` (LLaVA-1).
    vision_feature_layer: hidden-state index of the ViT (-2: penultimate layer), or a list whose states are
        concatenated along the feature axis.
    vision_feature_select_strategy: `default` drops the class token, `full` keeps it.
    """

    model_type = "llava_pattern"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(VisionTowerConfig),
        "text_config": SubConfigSpec(TextDecoderConfig, init_kwargs={"vocab_size": 32064, "pad_token_id": 32001}),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    image_token_id: int = 32000
    tie_word_embeddings: bool = False

    @property
    def feature_layers(self) -> list[int]:
        layer = self.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    @property
    def image_seq_length(self) -> int:
        """Placeholder tokens (= projected features) per image."""
        return self.vision_config.num_patches + (self.vision_feature_select_strategy == "full")

    def validate_llava(self):
        count = self.vision_config.num_hidden_layers + 1
        for layer in self.feature_layers:
            if not -count <= layer < count:
                raise ValueError(f"vision_feature_layer {layer} is out of range for a {count - 1}-layer vision tower")
        if not self.feature_layers:
            raise ValueError("vision_feature_layer must name at least one layer")
        if not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"image_token_id {self.image_token_id} is outside the vocabulary (size {self.text_config.vocab_size})"
            )
