"""LLaVA: the projection pattern. A CLIP ViT's patch features, mapped by a small MLP into the LLM's
embedding space, replace the `<image>` placeholder embeddings; the LLM then reads them as words.
Paper: Liu et al., "Visual Instruction Tuning" (2023) and "Improved Baselines ..." (LLaVA-1.5).
Loads `llava-hf/llava-1.5-7b-hf` and `liuhaotian/llava-v1.5-7b` (via conversion/).
pixels (B, 3, 336, 336) -> ViT layer -2 (B, 576, 1024) -> projector (B, 576, D) -> scattered at <image> -> LLM.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_llava import LlavaPatternConfig
from .input_checks import check_input_ids, check_pixel_values
from .pattern_pretrained import PatternPreTrainedModel
from .text_decoder import TextDecoder
from .vision_transformer import VisionTransformer

# Axes: B batch, T text tokens, I images, N visual tokens per image, Dv vision width, D text width.


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


def scatter_image_features(
    inputs_embeds: torch.Tensor, placeholder_mask: torch.Tensor, image_features: torch.Tensor
) -> torch.Tensor:
    """Write the image features, in order, over the placeholder embeddings.

    inputs_embeds (B, T, D), placeholder_mask (B, T) bool, image_features (I, N, D) -> (B, T, D).
    """
    num_placeholders = int(placeholder_mask.sum())
    num_features = image_features.shape[0] * image_features.shape[1]
    if num_placeholders != num_features:
        raise ValueError(
            f"The prompt has {num_placeholders} image placeholder tokens but the images give {num_features} features "
            f"({image_features.shape[0]} images x {image_features.shape[1]}). Put exactly one <image> in the text per "
            "image and let the processor expand it."
        )
    features = image_features.reshape(-1, inputs_embeds.shape[-1])  # (I * N, D)
    # With device_map="auto" the vision tower may sit on another device than the embeddings.
    features = features.to(inputs_embeds.device, inputs_embeds.dtype)
    return inputs_embeds.masked_scatter(placeholder_mask.unsqueeze(-1).to(inputs_embeds.device), features)


@dataclass
class LlavaPatternModelOutput(BaseModelOutputWithPast):
    """`image_hidden_states`: the projected image features (I, N, D) of this call, if it had images."""

    image_hidden_states: torch.Tensor | None = None


@dataclass
class LlavaPatternCausalLMOutput(CausalLMOutputWithPast):
    image_hidden_states: torch.Tensor | None = None


class LlavaPatternPreTrainedModel(PatternPreTrainedModel):
    config_class = LlavaPatternConfig
    config: LlavaPatternConfig
    auto_map_classes = {
        "AutoModel": "LlavaPatternModel",
        "AutoModelForImageTextToText": "LlavaPatternForConditionalGeneration",
    }


class LlavaPatternModel(LlavaPatternPreTrainedModel):
    def __init__(self, config: LlavaPatternConfig):
        super().__init__(config)
        self.vision_tower = VisionTransformer(config.vision_config)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = TextDecoder(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.language_model.embed_tokens = value

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (I, 3, S, S) -> projected features (I, N, D)."""
        check_pixel_values(pixel_values)
        hidden_states = self.vision_tower(pixel_values, self.config.feature_layers)  # each (I, 1 + P, Dv)
        if self.config.vision_feature_select_strategy == "default":
            hidden_states = [h[:, 1:] for h in hidden_states]  # drop the class token
        return self.multi_modal_projector(torch.cat(hidden_states, dim=-1))  # (I, N, D)

    def placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Where the `<image>` placeholders are, (B, T) bool; found by embedding when only embeddings are given."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(-1)

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
    ) -> LlavaPatternModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            check_input_ids(input_ids, self.config.text_config.vocab_size)
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else self.config.text_config.use_cache
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, D)

        image_features = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values)  # (I, N, D)
            mask = self.placeholder_mask(input_ids, inputs_embeds)
            inputs_embeds = scatter_image_features(inputs_embeds, mask, image_features)
        elif input_ids is not None and (cache is None or cache.get_seq_length() == 0):
            if bool((input_ids == self.config.image_token_id).any()):
                raise ValueError("The prompt has <image> placeholder tokens but no pixel_values were given")

        hidden_states, cache, all_hidden_states = self.language_model(
            inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=bool(output_hidden_states),
            **kwargs,
        )
        return LlavaPatternModelOutput(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=all_hidden_states,
            image_hidden_states=image_features,
        )


class LlavaPatternForConditionalGeneration(LlavaPatternPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: LlavaPatternConfig):
        super().__init__(config)
        self.model = LlavaPatternModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear):
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> LlavaPatternCausalLMOutput:
        """`labels` (B, T): next-token targets; image placeholders and -100 are ignored by the loss."""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            # The model never has to predict an image feature: placeholders are not targets.
            placeholders = self.model.placeholder_mask(input_ids, inputs_embeds)
            labels = labels.masked_fill(placeholders.to(labels.device), -100)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)

        return LlavaPatternCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            image_hidden_states=outputs.image_hidden_states,
        )
