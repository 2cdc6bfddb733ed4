"""The `PreTrainedModel` base every family shares: capability flags and initialisation of our own blocks."""

from typing import ClassVar

from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import logging

from .vision_transformer import VisionEmbeddings

logger = logging.get_logger(__name__)


class PatternPreTrainedModel(PreTrainedModel):
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # Blocks that `device_map="auto"` must keep whole on one device (residual adds need both operands there).
    _no_split_modules = ["DecoderLayer", "VisionEncoderLayer", "VisionBlock", "GatedCrossAttentionBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    # Auto class -> class name in the family's modeling file, written to config.json's `auto_map` on save, so
    # `trust_remote_code` loading works through AutoModel and AutoModelForImageTextToText alike.
    auto_map_classes: ClassVar[dict[str, str]] = {}

    def register_auto_map(self) -> None:
        module = type(self).__module__.rsplit(".", 1)[-1]
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.update({auto: f"{module}.{name}" for auto, name in self.auto_map_classes.items()})
        self.config.auto_map = auto_map

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.register_auto_map()
        return super().save_pretrained(save_directory, *args, **kwargs)

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """transformers' `generate`, fitted to the context first (`fit_to_context`)."""
        self.fit_to_context(inputs, generation_config, kwargs)
        return super().generate(inputs, generation_config, **kwargs)

    def fit_to_context(self, inputs, generation_config, kwargs: dict) -> None:
        """A request that would run past the language model's positions stops at the last one (with a warning)
        instead of failing there and losing the tokens; a prompt that fills the context already is refused
        before any work. Adjusts `kwargs["max_new_tokens"]` in place."""
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if prompt is None or getattr(prompt, "dim", lambda: 0)() < 2:
            return
        prompt_length, limit = prompt.shape[1], self.config.text_config.max_position_embeddings
        if prompt_length >= limit:
            raise ValueError(
                f"The prompt is {prompt_length} tokens; this model's context holds {limit}, so no token can be "
                "generated. Shorten the prompt (or the chat)"
            )
        config = generation_config if generation_config is not None else self.generation_config
        new_tokens = kwargs.get("max_new_tokens") or config.max_new_tokens
        if new_tokens is None:
            new_tokens = (kwargs.get("max_length") or config.max_length) - prompt_length
        if prompt_length + new_tokens > limit:
            logger.warning(
                f"The prompt is {prompt_length} tokens and {new_tokens} new ones were asked for; this model's "
                f"context holds {limit}, so generation stops after {limit - prompt_length}."
            )
            kwargs["max_new_tokens"] = limit - prompt_length

    def post_init(self):
        super().post_init()
        # Our towers are plain modules reading their sub-config, so the attention implementation transformers
        # resolves for the whole model must reach the sub-configs too (unless they were given one of their own).
        for sub_config in self.sub_config_objects():
            if sub_config._attn_implementation is None:
                sub_config._attn_implementation_internal = self.config._attn_implementation

    def set_attn_implementation(self, attn_implementation: str | dict, **kwargs):
        """Switch attention kernels ("eager", "sdpa", "flash_attention_2", ...) for every tower at once."""
        if not isinstance(attn_implementation, str):
            return super().set_attn_implementation(attn_implementation, **kwargs)
        previous = [(sub, sub._attn_implementation) for sub in self.sub_config_objects()]
        for sub, _ in previous:  # set first, so transformers does not warn that it set them blindly
            sub._attn_implementation_internal = attn_implementation
        try:
            return super().set_attn_implementation(attn_implementation, **kwargs)
        except Exception:
            for sub, value in previous:
                sub._attn_implementation_internal = value
            raise

    def sub_config_objects(self) -> list:
        return [getattr(self.config, key) for key in self.config.sub_configs if getattr(self.config, key) is not None]

    def _init_weights(self, module):
        super()._init_weights(module)  # Linear, Embedding, LayerNorm and RMSNorm
        if isinstance(module, VisionEmbeddings):
            init.normal_(module.class_embedding, std=module.config.hidden_size**-0.5)
        elif hasattr(module, "compute_inv_freq"):
            # Rotary frequency tables are non-persistent buffers: loading materialises them empty, so recompute.
            init.copy_(module.inv_freq, module.compute_inv_freq())
