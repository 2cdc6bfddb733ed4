"""The four families at training-from-scratch size, with their processors, on the synthetic task.

Each small model keeps its pattern's defining shape (LLaVA: a fixed 64 x 64 input, 64 patch tokens projected into
the LM; Qwen2-VL: native resolution, 28 x 28 pixels per visual token; Fuyu: raw 16 x 16 patches through one Linear;
Flamingo: 16 latents per image read through gated cross-attention) and a language model of the same size, so
that differences in accuracy come from how each pattern sees the image.
"""

from dataclasses import dataclass

from modeling import (
    FlamingoPatternConfig,
    FlamingoPatternForConditionalGeneration,
    FuyuPatternConfig,
    FuyuPatternForConditionalGeneration,
    LlavaPatternConfig,
    LlavaPatternForConditionalGeneration,
    Qwen2VLPatternConfig,
    Qwen2VLPatternForConditionalGeneration,
)
from processing import (
    FlamingoPatternImageProcessor,
    FlamingoPatternProcessor,
    FuyuPatternImageProcessor,
    FuyuPatternProcessor,
    LlavaPatternImageProcessor,
    LlavaPatternProcessor,
    Qwen2VLPatternImageProcessor,
    Qwen2VLPatternProcessor,
)

from .synthetic_vqa import MAX_SIDE
from .vqa_tokenizer import build_vqa_tokenizer

FAMILIES = ("llava", "qwen2_vl", "fuyu", "flamingo")

# One language model size for all four (Llama settings; Qwen2's QKV bias and M-RoPE for Qwen2-VL).
TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=512, norm_eps=1e-6)  # fmt: skip
VISION = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, image_size=64,
              patch_size=8, hidden_act="gelu")  # fmt: skip


@dataclass
class Family:
    name: str
    model_class: type
    multi_image: bool  # whether its prompts may hold several images


SPECS = {
    "llava": Family("llava", LlavaPatternForConditionalGeneration, True),
    "qwen2_vl": Family("qwen2_vl", Qwen2VLPatternForConditionalGeneration, True),
    "fuyu": Family("fuyu", FuyuPatternForConditionalGeneration, False),
    "flamingo": Family("flamingo", FlamingoPatternForConditionalGeneration, True),
}


def _text(tokenizer, **overrides) -> dict:
    return dict(TEXT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, initializer_range=0.05, **overrides)  # fmt: skip


def build_config(family: str, tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    if family == "llava":
        return LlavaPatternConfig(
            vision_config=VISION, text_config=_text(tokenizer), vision_feature_layer=-1,
            image_token_id=ids("<image>"), tie_word_embeddings=False,
        )  # fmt: skip
    if family == "qwen2_vl":
        head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
        return Qwen2VLPatternConfig(
            vision_config=dict(depth=3, embed_dim=96, num_heads=4, mlp_ratio=2.0, hidden_act="gelu",
                               out_hidden_size=TEXT["hidden_size"]),
            text_config=_text(tokenizer, qkv_bias=True, rope_theta=10000.0,
                              mrope_section=[head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=False,
        )  # fmt: skip
    if family == "fuyu":
        return FuyuPatternConfig(
            text_config=_text(tokenizer), patch_size=16, image_token_id=ids("|SPEAKER|"),
            image_newline_token_id=ids("|NEWLINE|"), tie_word_embeddings=False,
        )  # fmt: skip
    if family == "flamingo":
        return FlamingoPatternConfig(
            vision_config=VISION, text_config=_text(tokenizer), num_latents=16, resampler_depth=2,
            resampler_num_heads=4, resampler_head_dim=24, resampler_mlp_ratio=2,
            cross_attn_layer_ids=list(range(TEXT["num_hidden_layers"])),
            image_token_id=ids("<image>"), media_reset_token_id=None, tie_word_embeddings=False,
        )  # fmt: skip
    raise ValueError(f"Unknown family {family!r}; choose from {', '.join(FAMILIES)}")


def build_processor(family: str, tokenizer=None):
    tokenizer = tokenizer or build_vqa_tokenizer(family)
    side = VISION["image_size"]
    if family == "llava":
        # Pad to a square first (LLaVA-1.5's way), so no shape is cropped away; then one fixed 64 x 64 input.
        image_processor = LlavaPatternImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}, do_pad=True
        )
        return LlavaPatternProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=VISION["patch_size"],
            vision_feature_select_strategy="default",
        )  # fmt: skip
    if family == "qwen2_vl":
        # Native resolution: a 160 x 120 image becomes 6 x 4 = 24 visual tokens, a 64 x 64 one 4.
        image_processor = Qwen2VLPatternImageProcessor(min_pixels=56 * 56, max_pixels=MAX_SIDE * MAX_SIDE)
        return Qwen2VLPatternProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if family == "fuyu":
        image_processor = FuyuPatternImageProcessor(size={"height": MAX_SIDE, "width": MAX_SIDE}, patch_size=16)
        return FuyuPatternProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if family == "flamingo":
        image_processor = FlamingoPatternImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}, do_pad=True, do_center_crop=True
        )
        return FlamingoPatternProcessor(image_processor=image_processor, tokenizer=tokenizer)
    raise ValueError(f"Unknown family {family!r}; choose from {', '.join(FAMILIES)}")


def build_model(family: str, tokenizer, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return SPECS[family].model_class(build_config(family, tokenizer))
