"""Configs of the Qwen2-VL (native resolution) pattern. Defaults reproduce `Qwen/Qwen2-VL-2B-Instruct`."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_backbones import TextDecoderConfig
from .resampled_positions import check_num_position_embeddings

# Qwen2-VL-2B's language model: Qwen2 with QKV bias, grouped-query attention and multimodal RoPE.
QWEN2_VL_2B_TEXT = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    norm_eps=1e-6,
    qkv_bias=True,
    rope_theta=1_000_000.0,
    mrope_section=[16, 24, 24],
    bos_token_id=151643,
    eos_token_id=151645,
)


@strict
class Qwen2VLVisionTowerConfig(PreTrainedConfig):
    """A ViT over (temporal_patch_size x patch_size x patch_size) patches at any resolution, with 2D RoPE and a
    PatchMerger that joins each spatial_merge_size^2 window into one token of `out_hidden_size` (the LLM width).
    `num_position_embeddings` (0: none, as in Qwen2-VL): Qwen3-VL's learned absolute positions, a square table of
    that many entries resampled to each image's patch grid and added to its patch embeddings."""

    model_type = "qwen2_vl_pattern_vision"
    base_config_key = "vision_config"

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 1536
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    num_position_embeddings: int = 0
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: channels x time x height x width."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    def validate_vision_shapes(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(
                f"head_dim {self.head_dim} must be a multiple of 4: 2D RoPE gives half to rows, half to columns"
            )
        check_num_position_embeddings(self.num_position_embeddings)


@strict
class Qwen2VLPatternConfig(PreTrainedConfig):
    """Dynamic-resolution ViT -> PatchMerger -> written over `<|image_pad|>` / `<|video_pad|>` tokens of a Qwen2 LLM
    whose RoPE gets (temporal, height, width) positions (`text_config.mrope_section`)."""

    model_type = "qwen2_vl_pattern"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(Qwen2VLVisionTowerConfig),
        "text_config": SubConfigSpec(TextDecoderConfig, init_kwargs=QWEN2_VL_2B_TEXT),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = True

    def validate_qwen2_vl(self):
        if self.vision_config.out_hidden_size != self.text_config.hidden_size:
            raise ValueError(
                f"vision out_hidden_size {self.vision_config.out_hidden_size} must equal the LLM hidden_size "
                f"{self.text_config.hidden_size}"
            )
        if self.text_config.mrope_section is None:
            raise ValueError("text_config.mrope_section is required: Qwen2-VL's LLM uses multimodal RoPE")
        for name in ("image_token_id", "video_token_id"):
            if not 0 <= getattr(self, name) < self.text_config.vocab_size:
                raise ValueError(
                    f"{name} {getattr(self, name)} is outside the vocabulary ({self.text_config.vocab_size})"
                )
