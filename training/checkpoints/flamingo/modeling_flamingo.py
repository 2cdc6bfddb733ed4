"""Flamingo: images stay out of the token stream; a Perceiver Resampler makes each a fixed set of visual tokens
that text tokens read through tanh-gated cross-attention blocks placed before chosen decoder layers, each token
seeing only its most recent image. Alayrac et al., "Flamingo" (2022). Loads IDEFICS and OpenFlamingo.
pixels (B, I, 3, 224, 224) -> ViT (B*I, 257, Dv) -> resampler (B, I, 64, Dv) -> keys/values per gated block;
text -> [gated block] -> decoder layer -> ... -> LM head.   (perceiver_resampler.py, gated_cross_attention.py)
Axes: B batch, T text tokens, I images per row, N visual tokens per image, Dv vision width, D text width."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_flamingo import FlamingoPatternConfig
from .flamingo_media import ImageState, image_attention, media_bias, media_cache_entries, track_images
from .gated_cross_attention import GatedCrossAttentionBlock
from .input_checks import check_image_mask, check_input_ids, check_pixel_values
from .pattern_pretrained import PatternPreTrainedModel
from .perceiver_resampler import PerceiverResampler
from .text_decoder import TextDecoder
from .vision_transformer import VisionTransformer


@dataclass
class FlamingoPatternModelOutput(BaseModelOutputWithPast):
    """`image_hidden_states`: the visual tokens (B, I, N, Dv) of this call's images, if it had any."""

    image_hidden_states: torch.Tensor | None = None


@dataclass
class FlamingoPatternCausalLMOutput(CausalLMOutputWithPast):
    image_hidden_states: torch.Tensor | None = None


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


class FlamingoPatternModel(FlamingoPatternPreTrainedModel):
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

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.language_model.embed_tokens = value

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
        if image_mask is not None:
            real = image_mask.reshape(-1).to(images.device, torch.bool)
            images = images[real]
        (features,) = self.vision_model(images, [-1])  # (R, 1 + P, Dv), before post_layernorm
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]  # drop the class token
        if self.perceiver_resampler is not None:
            features = self.perceiver_resampler(features)  # (R, N, Dv)
        if real is not None:
            padded = features.new_zeros(B * num_images, *features.shape[1:])
            padded[real] = features
            features = padded
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
    ) -> FlamingoPatternModelOutput:
        """
        pixel_values (B, I, 3, S, S): every image of the sequence so far, in the order of its `<image>` tokens
            (rows with fewer images are padded; `image_mask` (B, I) marks the real ones). Their cross-attention
            keys and values go into the cache, so later calls (decode steps) need not pass them again.
        image_attention_mask (B, T, I): optional, which image each token of this call attends to (as
            transformers' IdeficsProcessor returns it). By default this follows from the `<image>` tokens.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            check_input_ids(input_ids, self.config.text_config.vocab_size)
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else self.config.text_config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.text_config)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, D)
        B, T, _ = inputs_embeds.shape
        past = cache.get_seq_length() if cache is not None else 0

        # 1. Visual tokens -> each block's cross-attention keys and values, computed here or read from the cache.
        cursor, entries = None, None
        if cache is not None:
            cursor, entries = media_cache_entries(
                cache, self.config.text_config.num_hidden_layers, len(self.gated_cross_attn_layers)
            )
        image_hidden_states, media, num_images = None, None, 0
        if pixel_values is not None:
            image_hidden_states = self.get_image_features(pixel_values, image_mask)  # (B, I, N, Dv)
            visual_tokens = image_hidden_states.flatten(1, 2).to(inputs_embeds.dtype)  # (B, I * N, Dv)
            media = [block.cross_attn.media_keys_values(visual_tokens) for block in self.gated_cross_attn_layers]
            if entries is not None:
                for entry, (keys, values) in zip(entries, media, strict=True):
                    entry.store(keys, values)
            num_images = pixel_values.shape[1]
        elif entries and entries[0].is_initialized:
            media = [(entry.keys, entry.values) for entry in entries]
            num_images = media[0][0].shape[2] // self.config.num_visual_tokens

        # 2. Which image each token sees.
        state = cursor.state if cursor is not None and cursor.state is not None else None
        if state is None or pixel_values is not None:
            available = self.images_per_row(pixel_values, image_mask, num_images, B).to(inputs_embeds.device)
            state = ImageState.start(B, available, inputs_embeds.device) if state is None else state
            state = ImageState(state.count, state.current, available)
        if input_ids is not None:
            if image_attention_mask is None:  # an explicit attention may pair tokens and images freely
                self.check_image_tokens(input_ids, pixel_values, state, past)
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
            sees = image_attention_mask[..., :num_images].to(device=inputs_embeds.device, dtype=torch.bool)
        else:
            sees = image_attention(index, num_images)  # (B, T, I)
        bias = sees_any = None
        if media:
            bias = media_bias(sees, self.config.num_visual_tokens, inputs_embeds.dtype)
            sees_any = sees.any(-1)

        # 3. The decoder, with a gated block before the chosen layers.
        decoder = self.language_model
        mask, position_embeddings = decoder.prepare(inputs_embeds, attention_mask, position_ids, cache)
        hidden_states = inputs_embeds
        all_hidden_states = [hidden_states] if output_hidden_states else None
        for i, layer in enumerate(decoder.layers):
            if i in self.block_before_layer:
                k = self.block_before_layer[i]
                hidden_states = self.gated_cross_attn_layers[k](
                    hidden_states, media[k] if media else None, bias, sees_any
                )
            # The cache goes by keyword (see TextDecoder.forward).
            hidden_states = layer(hidden_states, position_embeddings, mask, cache=cache, **kwargs)
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
        hidden_states = decoder.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states[-1] = hidden_states
        return FlamingoPatternModelOutput(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            image_hidden_states=image_hidden_states,
        )

    def image_attention_from_tokens(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T, I) bool: which image each token sees by the rule, from the `<image>` tokens of whole sequences;
        `<image>` tokens past a row's images are read as text."""
        B, num_images = input_ids.shape[0], pixel_values.shape[1]
        available = self.images_per_row(pixel_values, image_mask, num_images, B).to(input_ids.device)
        state = ImageState.start(B, available, input_ids.device)
        index, _ = track_images(input_ids, self.config.image_token_id, self.config.media_reset_token_id, state)
        return image_attention(index, num_images)

    @staticmethod
    def images_per_row(pixel_values, image_mask, num_images: int, batch: int) -> torch.Tensor:
        if image_mask is not None:
            return image_mask.to(torch.bool).sum(-1).long()
        return torch.full((batch,), num_images, dtype=torch.long)

    def check_image_tokens(self, input_ids: torch.Tensor, pixel_values, state: ImageState, past: int) -> None:
        """Each row's `<image>` tokens must match its images: a clear error instead of a silent mismatch."""
        tokens = (input_ids == self.config.image_token_id).sum(-1)
        if pixel_values is not None:
            expected = state.available - state.count  # images not yet reached by earlier calls
            if bool((tokens != expected).any()):
                raise ValueError(
                    f"The prompts hold {tokens.tolist()} <image> tokens per row but {expected.tolist()} images were "
                    "given for them; write one <image> per image, where the image belongs in the text (rows with "
                    "fewer images than others need image_mask)"
                )
        elif past == 0 and bool(tokens.any()):
            raise ValueError("The prompt has <image> tokens but no pixel_values were given")


class FlamingoPatternForConditionalGeneration(FlamingoPatternPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: FlamingoPatternConfig):
        super().__init__(config)
        self.model = FlamingoPatternModel(config)
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

    def get_image_features(self, pixel_values: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.get_image_features(pixel_values, image_mask)

    def freeze_backbones(self, train_embeddings: bool = False) -> int:
        """Freeze the vision tower, the language model and the LM head; see `FlamingoPatternModel.freeze_backbones`."""
        self.lm_head.requires_grad_(False)
        return self.model.freeze_backbones(train_embeddings)

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
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> FlamingoPatternCausalLMOutput:
        """`labels` (B, T): next-token targets; `<image>` tokens and -100 are ignored by the loss."""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_mask=image_mask,
            image_attention_mask=image_attention_mask,
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
            labels = labels.masked_fill(labels == self.config.image_token_id, -100)  # where an image goes
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        return FlamingoPatternCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            image_hidden_states=outputs.image_hidden_states,
        )

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
