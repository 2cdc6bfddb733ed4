"""Flamingo at training-from-scratch size: 16 latents per image, read through a gated block before every layer."""

from vlm_patterns.modeling import FlamingoPatternConfig
from vlm_patterns.processing import FlamingoPatternImageProcessor, FlamingoPatternProcessor

from . import VISION, text_config

TOKENS = dict(bos="<s>", eos="</s>", pad="<pad>")
NUM_LATENTS = 16


def config(tokenizer, text: dict) -> FlamingoPatternConfig:
    return FlamingoPatternConfig(
        vision_config=VISION, text_config=text_config(tokenizer, text), num_latents=NUM_LATENTS, resampler_depth=2,
        resampler_num_heads=4, resampler_head_dim=24, resampler_mlp_ratio=2,
        cross_attn_layer_ids=list(range(text["num_hidden_layers"])),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), media_reset_token_id=None,
        tie_word_embeddings=False,
    )  # fmt: skip


def processor(tokenizer) -> FlamingoPatternProcessor:
    side = VISION["image_size"]
    image_processor = FlamingoPatternImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, do_pad=True, do_center_crop=True
    )
    return FlamingoPatternProcessor(
        image_processor=image_processor, tokenizer=tokenizer, visual_tokens_per_image=NUM_LATENTS
    )
