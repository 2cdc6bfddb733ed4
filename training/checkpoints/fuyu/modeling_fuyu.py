"""Fuyu: early fusion. There is no vision encoder: each raw 30x30 RGB patch goes through one Linear layer and
takes the place of an image placeholder token, rows of patches separated by newline tokens, and the decoder
sees pixels and words in one stream from its first layer. Paper/blog: Bavishi et al., "Fuyu-8B" (Adept, 2023).
Loads `adept/fuyu-8b` (via conversion/).
pixels (any size) -> patches (N, 30*30*3) -> Linear (N, D) -> at |SPEAKER| tokens -> Persimmon decoder.
"""

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_fuyu import FuyuPatternConfig
from .input_checks import check_input_ids, check_pixel_values
from .pattern_pretrained import PatternPreTrainedModel
from .text_decoder import TextDecoder

# Axes: B batch, T tokens, N patches of all images, D hidden.


def embed_patches(vision_embed_tokens: nn.Linear, pixel_values: torch.Tensor, patch_dim: int) -> torch.Tensor:
    """The whole vision side of Fuyu: flattened patches (N, 30*30*3), channel-last inside a patch -> (N, D)."""
    if pixel_values.shape[-1] != patch_dim:
        raise ValueError(f"pixel_values must hold patches of {patch_dim} values, got shape {tuple(pixel_values.shape)}")
    check_pixel_values(pixel_values)
    weight = vision_embed_tokens.weight
    return vision_embed_tokens(pixel_values.reshape(-1, patch_dim).to(weight.dtype))


def scatter_patches(inputs_embeds: torch.Tensor, placeholder_mask: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Write the patch embeddings (N, D), in order, over the placeholder embeddings of inputs_embeds (B, T, D)."""
    if int(placeholder_mask.sum()) != patches.shape[0]:
        raise ValueError(
            f"The prompt has {int(placeholder_mask.sum())} image placeholder tokens but the images give "
            f"{patches.shape[0]} patches; let the processor build the image rows"
        )
    patches = patches.to(inputs_embeds.device, inputs_embeds.dtype)
    return inputs_embeds.masked_scatter(placeholder_mask.unsqueeze(-1).to(inputs_embeds.device), patches)


class FuyuPatternPreTrainedModel(PatternPreTrainedModel):
    config_class = FuyuPatternConfig
    config: FuyuPatternConfig
    _no_split_modules = ["DecoderLayer"]
    auto_map_classes = {
        "AutoModel": "FuyuPatternModel",
        "AutoModelForImageTextToText": "FuyuPatternForConditionalGeneration",
    }


class FuyuPatternModel(FuyuPatternPreTrainedModel):
    def __init__(self, config: FuyuPatternConfig):
        super().__init__(config)
        self.vision_embed_tokens = nn.Linear(config.patch_dim, config.text_config.hidden_size)
        self.language_model = TextDecoder(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.language_model.embed_tokens = value

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return embed_patches(self.vision_embed_tokens, pixel_values, self.config.patch_dim)

    def placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        token = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(token)).all(-1)

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
        image_patches: torch.Tensor | None = None,
        image_patch_grid: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_scale_factors: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """pixel_values: patches (N, 2700) in the order of the placeholders (transformers' older name,
        `image_patches`, is accepted too). image_patch_grid / image_sizes / image_scale_factors are what the
        processor returns for post-processing boxes; the model does not need them."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            check_input_ids(input_ids, self.config.text_config.vocab_size)
        pixel_values = pixel_values if pixel_values is not None else image_patches
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else self.config.text_config.use_cache
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, D)
        mask = self.placeholder_mask(input_ids, inputs_embeds)
        if pixel_values is not None:
            inputs_embeds = scatter_patches(inputs_embeds, mask, self.get_image_features(pixel_values))
        elif (cache is None or cache.get_seq_length() == 0) and bool(mask.any()):
            raise ValueError("The prompt has image placeholder tokens but no pixel_values were given")
        hidden_states, cache, all_hidden_states = self.language_model(
            inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=bool(output_hidden_states),
            **kwargs,
        )
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states)


class FuyuPatternForConditionalGeneration(FuyuPatternPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: FuyuPatternConfig):
        super().__init__(config)
        self.model = FuyuPatternModel(config)
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
        image_patches: torch.Tensor | None = None,
        image_patch_grid: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_scale_factors: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`labels` (B, T): next-token targets; image placeholders and -100 are ignored by the loss."""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values if pixel_values is not None else image_patches,
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
            labels = labels.masked_fill(self.model.placeholder_mask(input_ids, inputs_embeds).to(labels.device), -100)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )
