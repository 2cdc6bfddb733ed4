"""Fuyu: early fusion. There is no vision encoder: each raw 30x30 RGB patch goes through one Linear layer and
takes the place of an image placeholder token, rows of patches separated by newline tokens, and the decoder
sees pixels and words in one stream from its first layer. Paper/blog: Bavishi et al., "Fuyu-8B" (Adept, 2023).
Loads `adept/fuyu-8b` (via conversion/).
pixels (any size) -> patches (N, 30*30*3) -> Linear (N, D) -> at |SPEAKER| tokens -> Persimmon decoder.
A patch's place reaches the decoder only through its order in the stream; `num_position_embeddings` adds learned
positions to the projected patches (resampled_positions.py), as Mono-InternVL, also without a vision encoder, does.
Fuyu-8B has none.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast

from .conditional_generation import PatternForConditionalGeneration
from .configuration_fuyu import FuyuPatternConfig
from .input_checks import check_pixel_values
from .pattern_model import PatternModel
from .pattern_pretrained import PatternPreTrainedModel
from .placeholders import scatter_placeholders
from .resampled_positions import resampled_positions, resampling_taps
from .text_decoder import TextDecoder

# Axes: B batch, T tokens, N patches of all images, D hidden.


def embed_patches(vision_embed_tokens: nn.Linear, pixel_values: torch.Tensor, patch_dim: int) -> torch.Tensor:
    """The whole vision side of Fuyu: flattened patches (N, 30*30*3), channel-last inside a patch -> (N, D)."""
    if pixel_values.shape[-1] != patch_dim:
        raise ValueError(f"pixel_values must hold patches of {patch_dim} values, got shape {tuple(pixel_values.shape)}")
    check_pixel_values(pixel_values)
    weight = vision_embed_tokens.weight
    return vision_embed_tokens(pixel_values.reshape(-1, patch_dim).to(weight.dtype))


def image_patch_places(input_ids: torch.Tensor, image_token_id: int, newline_token_id: int):
    """Each token's (row, column) in its image's patch grid and that grid's (rows, columns), both (B, T, 2), read
    from the placeholders alone: an image is a run of rows, each its patches' placeholders and a newline. Computed on
    the device with running sums and maxima (no host sync: the compiled prompt pass stays one graph); meaningless
    for tokens outside an image."""
    patch, newline = input_ids == image_token_id, input_ids == newline_token_id
    in_image = patch | newline
    index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    image_start = in_image & ~F.pad(in_image[:, :-1], (1, 0))
    row_start = image_start | (in_image & F.pad(newline[:, :-1], (1, 0)))
    newlines_before = newline.long().cumsum(1) - newline.long()
    # Both running values only grow, so a running maximum carries the latest start's value forward.
    row = newlines_before - torch.where(image_start, newlines_before, 0).cummax(1).values
    column = index - torch.where(row_start, index, 0).cummax(1).values
    image = image_start.long().cumsum(1)  # each token's image: 1, 2, ... (0 before the first)
    per_image = torch.zeros(input_ids.shape[0], input_ids.shape[1] + 1, dtype=torch.long, device=input_ids.device)
    rows = per_image.scatter_add(1, image, (newline & in_image).long()).gather(1, image)
    columns = per_image.scatter_add(1, image, (patch & (row == 0)).long()).gather(1, image)
    return torch.stack([row, column], -1), torch.stack([rows, columns], -1)


class FuyuPatternPreTrainedModel(PatternPreTrainedModel):
    config_class = FuyuPatternConfig
    config: FuyuPatternConfig
    _no_split_modules = ["DecoderLayer"]
    auto_map_classes = {
        "AutoModel": "FuyuPatternModel",
        "AutoModelForImageTextToText": "FuyuPatternForConditionalGeneration",
    }


class FuyuPatternModel(PatternModel, FuyuPatternPreTrainedModel):
    def __init__(self, config: FuyuPatternConfig):
        super().__init__(config)
        self.vision_embed_tokens = nn.Linear(config.patch_dim, config.text_config.hidden_size)
        self.vision_pos_embed = None
        if config.num_position_embeddings:
            self.add_learned_positions(config.num_position_embeddings)
        self.language_model = TextDecoder(config.text_config)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return embed_patches(self.vision_embed_tokens, pixel_values, self.config.patch_dim)

    def add_learned_positions(self, count: int) -> None:
        """Give the model learned patch positions, a sqrt(count) x sqrt(count) table (the config says so too, so a
        saved checkpoint has them)."""
        self.config.num_position_embeddings = count
        self.config.validate_fuyu()
        self.vision_pos_embed = nn.Embedding(count, self.config.text_config.hidden_size)

    def patch_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, D): each placeholder's learned position, resampled to its image's grid (other tokens: noise)."""
        places, sizes = image_patch_places(input_ids, self.config.image_token_id, self.config.image_newline_token_id)
        side = math.isqrt(self.config.num_position_embeddings)
        return resampled_positions(self.vision_pos_embed, *resampling_taps(places, sizes, side))

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
        inputs_embeds, cache, use_cache = self.start_forward(
            input_ids, inputs_embeds, cache, past_key_values, use_cache
        )
        pixel_values = pixel_values if pixel_values is not None else image_patches
        mask = self.placeholder_mask(input_ids, inputs_embeds)  # one placeholder per patch
        if pixel_values is not None:
            patches = self.get_image_features(pixel_values)  # (N, D)
            inputs_embeds = scatter_placeholders(inputs_embeds, mask, patches, "let the processor build the image rows")
            if self.vision_pos_embed is not None:
                if input_ids is None:
                    raise ValueError("This model adds learned positions to its patches: give input_ids, whose rows of "
                                     "placeholders and newlines say where each patch lies")  # fmt: skip
                positions = self.patch_positions(input_ids).to(inputs_embeds.dtype)
                inputs_embeds = inputs_embeds + torch.where(mask[..., None], positions, 0)
        elif (cache is None or cache.get_seq_length() == 0) and bool(mask.any()):
            raise ValueError("The prompt has image placeholder tokens but no pixel_values were given")
        hidden_states, cache, all_hidden_states = self.run_language_model(
            inputs_embeds, attention_mask, position_ids, cache, use_cache, output_hidden_states, **kwargs
        )
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states)


class FuyuPatternForConditionalGeneration(PatternForConditionalGeneration, FuyuPatternPreTrainedModel):
    base_model_class = FuyuPatternModel
    vision_encoder_prefixes = ()  # no vision encoder: that is the pattern
    connector_prefixes = ("model.vision_embed_tokens.", "model.vision_pos_embed.")
