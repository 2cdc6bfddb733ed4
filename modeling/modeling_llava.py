"""LLaVA: the projection pattern. A CLIP ViT's patch features, mapped by a small MLP into the LLM's
embedding space, replace the `<image>` placeholder embeddings; the LLM then reads them as words.
Paper: Liu et al., "Visual Instruction Tuning" (2023) and "Improved Baselines ..." (LLaVA-1.5).
Loads `llava-hf/llava-1.5-7b-hf` and `liuhaotian/llava-v1.5-7b` (via conversion/).
pixels (B, 3, 336, 336) -> ViT layer -2 (B, 576, 1024) -> projector (B, 576, D) -> scattered at <image> -> LLM.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache

from .conditional_generation import CausalLMOutputWithImages, PatternForConditionalGeneration
from .configuration_llava import LlavaPatternConfig
from .input_checks import check_pixel_values
from .pattern_model import ModelOutputWithImages, PatternModel
from .pattern_pretrained import PatternPreTrainedModel
from .placeholders import scatter_placeholders
from .text_decoder import TextDecoder
from .vision_transformer import VisionTransformer

# Axes: B batch, T text tokens, I images, N visual tokens per image, Dv vision width, D text width.

PLACEHOLDER_HINT = "put exactly one <image> in the text per image and let the processor expand it"


class MultiModalProjector(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu` (Linear, GELU, Linear) or LLaVA-1's single `linear`."""

    def __init__(self, config: LlavaPatternConfig):
        super().__init__()
        vision_width = config.vision_config.hidden_size * len(config.feature_layers)
        text_width = config.text_config.hidden_size
        self.linear_1 = nn.Linear(vision_width, text_width, bias=config.projector_bias)
        if config.projector_type == "mlp2x_gelu":
            self.act = ACT2FN[config.projector_hidden_act]
            self.linear_2 = nn.Linear(text_width, text_width, bias=config.projector_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(features)
        if hasattr(self, "linear_2"):
            hidden = self.linear_2(self.act(hidden))
        return hidden


class LlavaPatternPreTrainedModel(PatternPreTrainedModel):
    config_class = LlavaPatternConfig
    config: LlavaPatternConfig
    auto_map_classes = {
        "AutoModel": "LlavaPatternModel",
        "AutoModelForImageTextToText": "LlavaPatternForConditionalGeneration",
    }


class LlavaPatternModel(PatternModel, LlavaPatternPreTrainedModel):
    def __init__(self, config: LlavaPatternConfig):
        super().__init__(config)
        self.vision_tower = VisionTransformer(config.vision_config)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = TextDecoder(config.text_config)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (I, 3, S, S) -> projected features (I, N, D)."""
        check_pixel_values(pixel_values)
        hidden_states = self.vision_tower(pixel_values, self.config.feature_layers)  # each (I, 1 + P, Dv)
        if self.config.vision_feature_select_strategy == "default":
            hidden_states = [h[:, 1:] for h in hidden_states]  # drop the class token
        return self.multi_modal_projector(torch.cat(hidden_states, dim=-1))  # (I, N, D)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> ModelOutputWithImages:
        """`image_hidden_states` of the output: the projected image features (I, N, D) of this call."""
        inputs_embeds, cache, use_cache = self.start_forward(
            input_ids, inputs_embeds, cache, past_key_values, use_cache
        )

        image_features = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values)  # (I, N, D)
            mask = self.placeholder_mask(input_ids, inputs_embeds)
            inputs_embeds = scatter_placeholders(inputs_embeds, mask, image_features, PLACEHOLDER_HINT)
        elif input_ids is not None and (cache is None or cache.get_seq_length() == 0):
            if bool((input_ids == self.config.image_token_id).any()):
                raise ValueError("The prompt has <image> placeholder tokens but no pixel_values were given")

        hidden_states, cache, all_hidden_states = self.run_language_model(
            inputs_embeds, attention_mask, position_ids, cache, use_cache, output_hidden_states, **kwargs
        )
        return ModelOutputWithImages(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=all_hidden_states,
            image_hidden_states=image_features,
        )


class LlavaPatternForConditionalGeneration(PatternForConditionalGeneration, LlavaPatternPreTrainedModel):
    base_model_class = LlavaPatternModel
    output_class = CausalLMOutputWithImages
    vision_encoder_prefixes = ("model.vision_tower.",)
    connector_prefixes = ("model.multi_modal_projector.",)
