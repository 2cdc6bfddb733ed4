"""Flamingo: images stay out of the token stream; a Perceiver Resampler makes each a fixed set of visual tokens
that text tokens read through tanh-gated cross-attention blocks placed before chosen decoder layers, each token
seeing only its most recent image. Alayrac et al., "Flamingo" (2022). Loads IDEFICS and OpenFlamingo.
pixels (B, I, 3, 224, 224) -> ViT (B*I, 257, Dv) -> resampler (B, I, 64, Dv) -> keys/values per gated block;
text -> [gated block] -> decoder layer -> ... -> LM head.   (perceiver_resampler.py, gated_cross_attention.py)
Axes: B batch, T text tokens, I images per row, N visual tokens per image, Dv vision width, D text width."""

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache

from .conditional_generation import CausalLMOutputWithImages, PatternForConditionalGeneration
from .configuration_flamingo import FlamingoPatternConfig
from .flamingo_cache import StaticImages, media_cache_entries
from .flamingo_visibility import (
    ImageState,
    check_image_tokens,
    image_attention,
    images_per_row,
    media_bias,
    track_images,
)
from .gated_cross_attention import GatedCrossAttentionBlock
from .input_checks import check_image_mask, check_pixel_values
from .pattern_model import ModelOutputWithImages, PatternModel
from .pattern_pretrained import PatternPreTrainedModel
from .perceiver_resampler import PerceiverResampler
from .text_decoder import TextDecoder, only_last_position
from .vision_transformer import VisionTransformer


class FlamingoPatternPreTrainedModel(PatternPreTrainedModel):
    config_class = FlamingoPatternConfig
    config: FlamingoPatternConfig
    _no_split_modules = ["DecoderLayer", "VisionEncoderLayer", "GatedCrossAttentionBlock", "PerceiverResampler"]
    auto_map_classes = {
        "AutoModel": "FlamingoPatternModel",
        "AutoModelForImageTextToText": "FlamingoPatternForConditionalGeneration",
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PerceiverResampler):
            init.normal_(module.latents)
        elif isinstance(module, GatedCrossAttentionBlock):  # gates closed: a new model is its language model
            init.zeros_(module.alpha_cross_attn)
            init.zeros_(module.alpha_dense)


class FlamingoPatternModel(PatternModel, FlamingoPatternPreTrainedModel):
    def __init__(self, config: FlamingoPatternConfig):
        super().__init__(config)
        self.vision_model = VisionTransformer(config.vision_config)
        self.perceiver_resampler = PerceiverResampler(config) if config.use_resampler else None
        self.language_model = TextDecoder(config.text_config)
        self.gated_cross_attn_layers = nn.ModuleList(
            [GatedCrossAttentionBlock(config) for _ in config.cross_attn_layer_ids]
        )
        # decoder layer index -> index of the block that runs just before it
        self.block_before_layer = {layer: k for k, layer in enumerate(config.cross_attn_layer_ids)}
        self.post_init()

    def freeze_backbones(self, train_embeddings: bool = False) -> int:
        """Freeze the vision tower and the language model (optionally not its input embeddings, e.g. to learn
        new tokens), leaving the resampler and the gated blocks trainable; returns the trainable parameter count."""
        self.requires_grad_(False)
        for module in (self.perceiver_resampler, self.gated_cross_attn_layers):
            if module is not None:
                module.requires_grad_(True)
        if train_embeddings:
            self.get_input_embeddings().requires_grad_(True)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def get_image_features(self, pixel_values: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values (B, I, 3, S, S) -> visual tokens (B, I, N, Dv). Images where `image_mask` (B, I) is
        False are padding: they are not encoded and their visual tokens are zeros (no text token sees them)."""
        if pixel_values.dim() != 5:
            raise ValueError(
                f"pixel_values must have shape (batch, images, 3, height, width), got {tuple(pixel_values.shape)}"
            )
        check_pixel_values(pixel_values)
        check_image_mask(image_mask, pixel_values)
        B, num_images = pixel_values.shape[:2]
        images = pixel_values.flatten(0, 1)  # (B*I, 3, S, S)
        real = None
        # Eager, padding images are not encoded at all. Compiled, every slot is encoded and padding's tokens are
        # zeroed below: picking the real ones out has a shape that depends on the mask's values, which would break
        # the compiled prompt pass in two around the encoder.
        pick_real = not torch.compiler.is_compiling()
        if image_mask is not None:
            real = image_mask.reshape(-1).to(images.device, torch.bool)
            if pick_real:
                images = images[real]
        (features,) = self.vision_model(images, [-1])  # (R, 1 + P, Dv), before post_layernorm
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]  # drop the class token
        if self.perceiver_resampler is not None:
            features = self.perceiver_resampler(features)  # (R, N, Dv)
        if real is not None and pick_real:
            padded = features.new_zeros(B * num_images, *features.shape[1:])
            padded[real] = features
            features = padded
        elif real is not None:
            features = features * real[:, None, None].to(features.dtype)
        return features.view(B, num_images, *features.shape[1:])

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> ModelOutputWithImages:
        """
        pixel_values (B, I, 3, S, S): every image of the sequence so far, in the order of its `<image>` tokens
            (rows with fewer images are padded; `image_mask` (B, I) marks the real ones). Their cross-attention
            keys and values go into the cache, so later calls (decode steps) need not pass them again.
        image_attention_mask (B, T, I): optional, which image each token of this call attends to (as
            transformers' IdeficsProcessor returns it). By default this follows from the `<image>` tokens.
        The output's `image_hidden_states`: this call's visual tokens (B, I, N, Dv), if it had images.
        """
        inputs_embeds, cache, use_cache = self.start_forward(
            input_ids, inputs_embeds, cache, past_key_values, use_cache
        )
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.text_config)
        past = cache.get_seq_length() if cache is not None else 0
        cursor, entries = None, None
        if cache is not None:
            cursor, entries = media_cache_entries(
                cache, self.config.text_config.num_hidden_layers, len(self.gated_cross_attn_layers)
            )

        # 1. Images -> each gated block's cross-attention keys and values, computed now or read from the cache.
        image_hidden_states, media = None, None
        if pixel_values is not None:
            image_hidden_states = self.get_image_features(pixel_values, image_mask)  # (B, I, N, Dv)
            media = self.media_keys_values(image_hidden_states.to(inputs_embeds.dtype), entries)
        elif entries and entries[0].is_initialized:
            media = [(entry.keys, entry.values) for entry in entries]

        # 2. Which image each token sees, as an additive bias over the visual tokens (B, 1, T, I * N).
        bias, sees_any = self.image_visibility(
            input_ids, inputs_embeds, pixel_values, image_mask, image_attention_mask, media, cursor, past
        )

        # 3. The decoder, with a gated block before the chosen layers (`run_layers`).
        mask, position_embeddings = self.language_model.prepare(inputs_embeds, attention_mask, position_ids, cache)
        all_hidden_states = [inputs_embeds] if output_hidden_states else None
        hidden_states = self.run_layers(
            inputs_embeds, position_embeddings, mask, cache, (media, bias, sees_any), all_hidden_states, **kwargs
        )
        hidden_states = self.language_model.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states[-1] = hidden_states
        return ModelOutputWithImages(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            image_hidden_states=image_hidden_states,
        )

    def run_layers(
        self, hidden_states, position_embeddings, mask, cache, image_context=None, all_hidden_states=None, **kwargs
    ) -> torch.Tensor:
        """The decoder layers over hidden states (B, T, D), each chosen one preceded by its gated block;
        `image_context`: (each block's media keys/values or None, the bias over visual tokens, who sees an image)."""
        media, bias, sees_any = image_context or (None, None, None)
        trim = only_last_position(kwargs, mask, all_hidden_states is not None, hidden_states.shape[1])
        layers = self.language_model.layers
        for i, layer in enumerate(layers):
            if i in self.block_before_layer:
                k = self.block_before_layer[i]
                # Before the last layer too on every token: its keys and values are read from this block's output.
                hidden_states = self.gated_cross_attn_layers[k](
                    hidden_states, media[k] if media else None, bias, sees_any
                )
            # The cache goes by keyword (see TextDecoder.forward).
            last = trim and i == len(layers) - 1
            hidden_states = layer(
                hidden_states, position_embeddings, mask, cache=cache, last_position_only=last, **kwargs
            )
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
        return hidden_states

    def static_images(self, prefill, previous):
        """For the static decode path: the prompt's image keys/values and each row's image state, in buffers
        (reused from `previous` when the shapes match, so a captured step stays valid)."""
        cursor, entries = media_cache_entries(
            prefill.cache, self.config.text_config.num_hidden_layers, len(self.gated_cross_attn_layers)
        )
        return StaticImages.from_cache(cursor, entries, self.config, previous)

    def media_keys_values(self, image_hidden_states: torch.Tensor, entries: list | None) -> list[tuple]:
        """Visual tokens (B, I, N, Dv) -> per gated block, cross-attention keys and values (B, H, I * N, d), kept
        in the cache entries (when there is a cache) so that later calls only read them."""
        visual_tokens = image_hidden_states.flatten(1, 2)  # (B, I * N, Dv)
        media = [block.cross_attn.media_keys_values(visual_tokens) for block in self.gated_cross_attn_layers]
        if entries:  # with a cache: one entry per gated block
            for entry, (keys, values) in zip(entries, media, strict=True):
                entry.store(keys, values)
        return media

    # Follows the <image> tokens on the host (checks, each row's image state): a compiled prompt pass runs it as it is,
    # in one piece, and compiles what comes before and after it.
    @torch.compiler.disable
    def image_visibility(self, input_ids, inputs_embeds, pixel_values, image_mask, image_attention_mask, media,
                         cursor, past: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
        """The attention bias over the visual tokens (B, 1, T, I * N) and whether each token sees any image
        (B, T), both None without images. By the rule from the `<image>` tokens (continued from the cache's
        cursor), or as `image_attention_mask` (B, T, I) says."""
        B, T, _ = inputs_embeds.shape
        device = inputs_embeds.device
        num_images = media[0][0].shape[2] // self.config.num_visual_tokens if media else 0
        state = cursor.state if cursor is not None else None
        if state is None or pixel_values is not None:
            available = images_per_row(image_mask, num_images, B).to(device)
            state = ImageState.start(B, available, device) if state is None else state
            state = ImageState(state.count, state.current, available)
        if input_ids is not None:
            if image_attention_mask is None:  # an explicit attention may pair tokens and images freely
                check_image_tokens(input_ids, self.config.image_token_id, pixel_values is not None, state, past)
            index, next_state = track_images(
                input_ids, self.config.image_token_id, self.config.media_reset_token_id, state
            )
        elif pixel_values is not None and image_attention_mask is None:
            raise ValueError(
                "With inputs_embeds the <image> tokens cannot be found: pass image_attention_mask (B, T, images)"
            )
        else:  # embeddings continue the text: each row keeps seeing its current image
            index, next_state = state.current.unsqueeze(1).expand(B, T), state
        if cursor is not None:
            cursor.state = next_state
        if image_attention_mask is not None:
            if tuple(image_attention_mask.shape[:2]) != (B, T):
                raise ValueError(
                    f"image_attention_mask has shape {tuple(image_attention_mask.shape)}; expected ({B}, {T}, images)"
                )
            sees = image_attention_mask[..., :num_images].to(device=device, dtype=torch.bool)
        else:
            sees = image_attention(index, num_images)  # (B, T, I)
        if not media:
            return None, None
        return media_bias(sees, self.config.num_visual_tokens, inputs_embeds.dtype), sees.any(-1)

    def image_attention_from_tokens(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T, I) bool: which image each token sees by the rule, from the `<image>` tokens of whole sequences;
        `<image>` tokens past a row's images are read as text."""
        B, num_images = input_ids.shape[0], pixel_values.shape[1]
        available = images_per_row(image_mask, num_images, B).to(input_ids.device)
        state = ImageState.start(B, available, input_ids.device)
        index, _ = track_images(input_ids, self.config.image_token_id, self.config.media_reset_token_id, state)
        return image_attention(index, num_images)


class FlamingoPatternForConditionalGeneration(PatternForConditionalGeneration, FlamingoPatternPreTrainedModel):
    base_model_class = FlamingoPatternModel
    output_class = CausalLMOutputWithImages
    vision_encoder_prefixes = ("model.vision_model.",)
    connector_prefixes = ("model.perceiver_resampler.", "model.gated_cross_attn_layers.")
    visual_tokens_in_sequence = False  # the latents are read through the gated cross-attention layers

    def positions_without_targets(self, input_ids, inputs_embeds, labels) -> torch.Tensor | None:
        return labels == self.config.image_token_id  # where an image goes

    def freeze_backbones(self, train_embeddings: bool = False) -> int:
        """Freeze the vision tower, the language model and the LM head; see `FlamingoPatternModel.freeze_backbones`."""
        self.lm_head.requires_grad_(False)
        return self.model.freeze_backbones(train_embeddings)

    def prepare_inputs_for_generation(
        self, input_ids, image_attention_mask=None, cache=None, is_first_iteration=False, **kwargs
    ):
        """An explicit `image_attention_mask`: generated tokens attend as the prompt's last token did (as
        transformers' IDEFICS does). Without it, the cache's image cursor carries the rule along; without a cache,
        each step re-reads prompt and continuation, and an `<image>` the model generated has no image to show:
        it is read as text, as the cached path reads it, rather than failing the prompt's token check."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, cache=cache, is_first_iteration=is_first_iteration, **kwargs
        )
        pixel_values, step_ids = model_inputs.get("pixel_values"), model_inputs.get("input_ids")
        if image_attention_mask is None and cache is None and not is_first_iteration and pixel_values is not None:
            if step_ids is not None:
                model_inputs["image_attention_mask"] = self.model.image_attention_from_tokens(
                    step_ids, pixel_values, model_inputs.get("image_mask")
                )
        elif image_attention_mask is not None:
            embeds = model_inputs.get("inputs_embeds")
            step = (embeds if embeds is not None else model_inputs["input_ids"]).shape[1]
            total = (cache.get_seq_length() if cache is not None else 0) + step
            missing = total - image_attention_mask.shape[1]
            if missing > 0:
                last = image_attention_mask[:, -1:].expand(-1, missing, -1)
                image_attention_mask = torch.cat([image_attention_mask, last], dim=1)
            model_inputs["image_attention_mask"] = image_attention_mask[:, total - step : total]
        return model_inputs
