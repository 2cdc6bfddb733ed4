"""Config of the Flamingo (cross-attention) pattern. Defaults reproduce `HuggingFaceM4/idefics-9b`.

The two public Flamingo reproductions differ only in fields of this config:

| field                         | IDEFICS                   | OpenFlamingo              |
|-------------------------------|---------------------------|---------------------------|
| vision_feature_select_strategy| full (keeps CLIP's class) | default (patches only)    |
| resampler_qk_norm / act       | True / relu               | False / gelu              |
| cross_attn_layer_ids          | i % 4 == 0                | (i + 1) % n == 0          |
| cross_attn heads / head_dim   | the LM's                  | 8 / 64                    |
| cross_attn norm / mlp / act   | rmsnorm / gated / silu    | layernorm / plain / gelu  |
| cross_attn_qk_norm            | True (RMSNorm per head)   | False                     |
| media_reset_token_id          | </s> (tokens after it see no image) | None            |
"""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_backbones import TextDecoderConfig, VisionTowerConfig

# IDEFICS-9b: a LAION ViT-H/14 at 224 px and LLaMA-7B with two extra tokens (<fake_token_around_image>, <image>).
IDEFICS_9B_VISION = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    hidden_act="gelu",
)
IDEFICS_9B_TEXT = dict(vocab_size=32002, max_position_embeddings=2048, norm_eps=1e-6, pad_token_id=0)


@strict
class FlamingoPatternConfig(PreTrainedConfig):
    """A frozen CLIP-style ViT and a frozen decoder, joined by a Perceiver Resampler and gated cross-attention.

    vision_feature_select_strategy: `full` feeds the resampler every token of the ViT's last layer (class token
        included), `default` drops the class token.
    use_resampler: without it the cross-attention reads the ViT tokens directly.
    num_latents: visual tokens per image (64: Flamingo; 96 reproduces InternVL's learnable queries).
    resampler_mlp_ratio: the resampler MLP's width as a multiple of the vision width.
    cross_attn_layer_ids: decoder layers that get a gated cross-attention block *before* them. Default: every
        fourth layer from 0 (IDEFICS); OpenFlamingo's `(i + 1) % n == 0` is `[n - 1, 2n - 1, ...]`.
    cross_attn_num_heads / cross_attn_head_dim / cross_attn_intermediate_size: default to the decoder's.
    gate_shape: `scalar` (one tanh gate per branch) or `vector` (one per hidden channel).
    image_token_id: the `<image>` token that marks where an image sits in the text.
    media_reset_token_id: tokens after this one (IDEFICS: `</s>`) see no image until the next `<image>`.
    """

    model_type = "flamingo_pattern"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(VisionTowerConfig, init_kwargs=IDEFICS_9B_VISION),
        "text_config": SubConfigSpec(TextDecoderConfig, init_kwargs=IDEFICS_9B_TEXT),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    vision_feature_select_strategy: Literal["full", "default"] = "full"

    use_resampler: bool = True
    num_latents: int = 64
    resampler_depth: int = 6
    resampler_num_heads: int = 16
    resampler_head_dim: int = 96
    resampler_qk_norm: bool = True
    resampler_hidden_act: str = "relu"
    resampler_mlp_ratio: int = 4
    resampler_norm_eps: float = 1e-5

    cross_attn_layer_ids: list[int] | None = None
    cross_attn_num_heads: int | None = None
    cross_attn_head_dim: int | None = None
    cross_attn_norm_type: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    cross_attn_norm_eps: float = 1e-6
    cross_attn_qk_norm: bool = True
    cross_attn_mlp_type: Literal["gated", "plain"] = "gated"
    cross_attn_intermediate_size: int | None = None
    cross_attn_hidden_act: str = "silu"
    gate_shape: Literal["scalar", "vector"] = "scalar"

    image_token_id: int = 32001
    media_reset_token_id: int | None = 2
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)  # builds the sub-configs
        text = self.text_config
        if self.cross_attn_layer_ids is None:
            self.cross_attn_layer_ids = list(range(0, text.num_hidden_layers, 4))
        self.cross_attn_layer_ids = sorted(self.cross_attn_layer_ids)
        if self.cross_attn_num_heads is None:
            self.cross_attn_num_heads = text.num_attention_heads
        if self.cross_attn_head_dim is None:
            self.cross_attn_head_dim = text.head_dim
        if self.cross_attn_intermediate_size is None:
            self.cross_attn_intermediate_size = text.intermediate_size

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per image, whatever the image: the latents, or the ViT tokens kept without a resampler."""
        if self.use_resampler:
            return self.num_latents
        return self.vision_config.num_patches + (self.vision_feature_select_strategy == "full")

    def validate_flamingo(self):
        layers = self.text_config.num_hidden_layers
        ids = self.cross_attn_layer_ids or []
        if any(not 0 <= i < layers for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"cross_attn_layer_ids {ids} must be distinct decoder layers in [0, {layers})")
        for name in ("image_token_id", "media_reset_token_id"):
            token = getattr(self, name)
            if token is not None and not 0 <= token < self.text_config.vocab_size:
                raise ValueError(f"{name} {token} is outside the vocabulary (size {self.text_config.vocab_size})")
        if self.use_resampler and min(self.num_latents, self.resampler_depth, self.resampler_num_heads) < 1:
            raise ValueError("num_latents, resampler_depth and resampler_num_heads must be positive")
