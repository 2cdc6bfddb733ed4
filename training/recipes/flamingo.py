"""Flamingo at training-from-scratch size: 16 latents per image, read through a gated block before every layer."""

import torch

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


def encoder_tokens(model, inputs: dict) -> list[torch.Tensor]:
    """The ViT's features as the resampler receives them, one (tokens, width) tensor per image
    (`vlm-patterns pretrain-vision`)."""
    images = inputs["pixel_values"]  # (I, 3, S, S), or (B, I, 3, S, S) as the model takes them
    (features,) = model.model.vision_model(images.flatten(0, 1) if images.dim() == 5 else images, [-1])  # (I, 1+P, Dv)
    if model.config.vision_feature_select_strategy == "default":
        features = features[:, 1:]
    return list(features)


def encoder_token_places(model, inputs: dict) -> list[torch.Tensor]:
    """Where each of `encoder_tokens`' tokens lies: (tokens, 2) column and row, as fractions of the input's side;
    NaN for the class token, which the resampler also reads."""
    from ..pretrain_vision import vit_places

    images = inputs["pixel_values"]
    return vit_places(model, images.shape[0] * images.shape[1] if images.dim() == 5 else len(images))


def vision_embeddings(model):
    """The ViT's patch and position embeddings."""
    return model.model.vision_model.embeddings


def start_positions_as_places(model, image_processor) -> None:
    """`--positions-as-places`: the ViT's learned positions set to its patches' places (training/vit_positions.py)."""
    from ..vit_positions import start_clip_positions_as_places

    start_clip_positions_as_places(vision_embeddings(model), image_processor)
