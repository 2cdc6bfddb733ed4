"""The base-model shell every family shares. Its language model's token embeddings are the model's input
embeddings; every `forward` starts the same way (exactly one of ids and embeddings, ids inside the vocabulary, the
cache under either of transformers' names) and, but for Flamingo's own layer loop, ends in the decoder. A family
adds only what is its pattern: how images reach the decoder.

Axes: B batch, T tokens, D text width.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast

from .input_checks import check_input_ids
from .pattern_pretrained import PatternPreTrainedModel
from .placeholders import placeholder_mask


@dataclass
class ModelOutputWithImages(BaseModelOutputWithPast):
    """`image_hidden_states`: the image features of this call, if it had images (the family says their shape)."""

    image_hidden_states: torch.Tensor | None = None


class PatternModel(PatternPreTrainedModel):
    """Put it first among a family's bases, before the family's PreTrainedModel: `class XModel(PatternModel,
    XPreTrainedModel)`. The family's `__init__` builds `self.language_model` (a TextDecoder)."""

    language_model: nn.Module

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.language_model.embed_tokens = value

    def start_forward(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        cache: Cache | None,
        past_key_values: Cache | None,
        use_cache: bool | None,
    ) -> tuple[torch.Tensor, Cache | None, bool]:
        """The checks and defaults every forward begins with -> (inputs_embeds (B, T, D), cache, use_cache)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            check_input_ids(input_ids, self.config.text_config.vocab_size)
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, D)
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else self.config.text_config.use_cache
        return inputs_embeds, cache, use_cache

    def placeholder_mask(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor, token_id: int | None = None
    ) -> torch.Tensor:
        """Where the image placeholders (or the placeholders of `token_id`) are, (B, T) bool."""
        token_id = self.config.image_token_id if token_id is None else token_id
        return placeholder_mask(self.get_input_embeddings(), token_id, input_ids, inputs_embeds)

    # Hooks of the static decode path (static_generation.py); projection and early fusion need no more than these
    # defaults, since their images are already inside the prompt's keys and values.

    def next_positions(self, prefill, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B,) long: the rotary position of the first generated token, from a prefill's outputs. Left padding
        does not count: a padded row continues where it would alone."""
        if attention_mask is not None:
            return attention_mask.long().sum(-1)
        batch = prefill.logits.shape[0]
        return torch.full((batch,), prefill.cache.get_seq_length(), dtype=torch.long, device=prefill.logits.device)

    def static_images(self, prefill, previous):
        """What decode steps read about the prompt's images beyond its keys and values (None: nothing)."""
        return None

    def run_layers(self, hidden_states, position_embeddings, mask, cache, image_context=None, **kwargs) -> torch.Tensor:
        """The decoder layers over hidden states (B, T, D), before the final norm."""
        for layer in self.language_model.layers:
            hidden_states = layer(hidden_states, position_embeddings, mask, cache=cache, **kwargs)
        return hidden_states

    def run_language_model(
        self, inputs_embeds, attention_mask, position_ids, cache, use_cache, output_hidden_states, **kwargs
    ) -> tuple[torch.Tensor, Cache | None, tuple[torch.Tensor, ...] | None]:
        """inputs_embeds (B, T, D) with the images already in them -> the decoder's (hidden states, cache, all)."""
        return self.language_model(
            inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=bool(output_hidden_states),
            **kwargs,
        )
