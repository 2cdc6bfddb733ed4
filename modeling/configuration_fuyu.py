"""Config of the Fuyu (early fusion) pattern. Defaults reproduce `adept/fuyu-8b`."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_backbones import TextDecoderConfig
from .resampled_positions import check_num_position_embeddings

# Fuyu-8B's decoder is a Persimmon: LayerNorm, squared-ReLU MLP, biases everywhere, per-head q/k LayerNorm,
# rotary over half of each head.
FUYU_8B_TEXT = dict(
    vocab_size=262144,
    hidden_size=4096,
    intermediate_size=16384,
    num_hidden_layers=36,
    num_attention_heads=64,
    max_position_embeddings=16384,
    norm_type="layernorm",
    norm_eps=1e-5,
    mlp_type="plain",
    hidden_act="relu2",
    qkv_bias=True,
    output_bias=True,
    mlp_bias=True,
    qk_norm=True,
    rope_theta=25000.0,
    partial_rotary_factor=0.5,
    bos_token_id=1,
    eos_token_id=2,
)


@strict
class FuyuPatternConfig(PreTrainedConfig):
    """Raw patch_size x patch_size x num_channels patches -> one Linear -> the decoder's embeddings at the image
    placeholder tokens (`image_token_id`, `|SPEAKER|` in Fuyu's vocabulary); `|NEWLINE|` tokens close each row.
    `num_position_embeddings` (0: none, as in Fuyu-8B): learned positions, a square table of that many entries
    resampled to each image's patch grid and added to its projected patches, as Mono-InternVL adds them."""

    model_type = "fuyu_pattern"
    sub_configs_defaults = {"text_config": SubConfigSpec(TextDecoderConfig, init_kwargs=FUYU_8B_TEXT)}

    text_config: dict | PreTrainedConfig | None = None
    patch_size: int = 30
    num_channels: int = 3
    image_token_id: int = 71011
    image_newline_token_id: int = 71019
    num_position_embeddings: int = 0
    tie_word_embeddings: bool = False

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch (patch_size x patch_size x channels)."""
        return self.patch_size * self.patch_size * self.num_channels

    def validate_fuyu(self):
        check_num_position_embeddings(self.num_position_embeddings)
        for name in ("image_token_id", "image_newline_token_id"):
            if not 0 <= getattr(self, name) < self.text_config.vocab_size:
                raise ValueError(
                    f"{name} {getattr(self, name)} is outside the vocabulary ({self.text_config.vocab_size})"
                )
