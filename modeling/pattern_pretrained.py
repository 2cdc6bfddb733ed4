"""The `PreTrainedModel` base every family shares: capability flags and initialisation of our own blocks."""

from typing import ClassVar

from transformers import PreTrainedModel
from transformers import initialization as init

from .vision_transformer import VisionEmbeddings


class PatternPreTrainedModel(PreTrainedModel):
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # Blocks that `device_map="auto"` must keep whole on one device (residual adds need both operands there).
    _no_split_modules = ["DecoderLayer", "VisionEncoderLayer"]
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
