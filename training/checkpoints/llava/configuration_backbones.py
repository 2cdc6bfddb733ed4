"""Configs of the two shared backbones: a CLIP-style vision transformer and a decoder-only text model.

Every family nests these as `vision_config` / `text_config`. Defaults reproduce CLIP ViT-L/14-336 and
Llama-2-7B (the towers of LLaVA-1.5); the other families change explicit fields, never code paths.
"""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class VisionTowerConfig(PreTrainedConfig):
    """A pre-LayerNorm ViT with a class token and learned absolute positions (CLIP's vision tower)."""

    model_type = "pattern_vision_tower"
    base_config_key = "vision_config"

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate_vision_shapes(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")


@strict
class TextDecoderConfig(PreTrainedConfig):
    """One decoder-only LM for every family; each field names one architectural choice.

    Llama: RMSNorm, gated SiLU MLP, no biases, full rotary. Qwen2: + QKV bias, GQA, `mrope_section` for
    multimodal RoPE. Persimmon: LayerNorm, squared-ReLU MLP, biases everywhere, per-head q/k LayerNorm,
    rotary over `partial_rotary_factor` of each head.
    """

    model_type = "pattern_text_decoder"
    base_config_key = "text_config"

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096

    norm_type: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp_type: Literal["gated", "plain"] = "gated"
    hidden_act: str = "silu"
    qkv_bias: bool = False
    output_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    # Multimodal RoPE (Qwen2-VL): rotary frequency pairs given to the (temporal, height, width) positions.
    mrope_section: list[int] | None = None

    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def validate_decoder_shapes(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(
                f"partial_rotary_factor {self.partial_rotary_factor} of head_dim {self.head_dim} gives an invalid "
                f"rotary dimension {self.rotary_dim} (must be even and within the head)"
            )
        if self.mrope_section is not None and sum(self.mrope_section) != self.rotary_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to rotary_dim // 2 = {self.rotary_dim // 2}")
