"""LLaVA at training-from-scratch size: a fixed 64 x 64 input, 64 patch tokens projected into the LM."""

import torch

from vlm_patterns.modeling import LlavaPatternConfig
from vlm_patterns.processing import LlavaPatternImageProcessor, LlavaPatternProcessor

from . import VISION, text_config

TOKENS = dict(bos="<s>", eos="</s>", pad="<pad>")


def config(tokenizer, text: dict) -> LlavaPatternConfig:
    return LlavaPatternConfig(
        vision_config=VISION, text_config=text_config(tokenizer, text), vision_feature_layer=-1,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
    )  # fmt: skip


def processor(tokenizer) -> LlavaPatternProcessor:
    side = VISION["image_size"]
    # Pad to a square first (LLaVA-1.5's way), so no shape is cropped away; then one fixed 64 x 64 input.
    image_processor = LlavaPatternImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, do_pad=True
    )
    return LlavaPatternProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=VISION["patch_size"],
        vision_feature_select_strategy="default",
    )  # fmt: skip


def encoder_tokens(model, inputs: dict) -> list[torch.Tensor]:
    """The ViT's patch features as the projector receives them, one (tokens, width) tensor per image in raster
    order (`vlm-patterns pretrain-vision`)."""
    config = model.config
    features = torch.cat(model.model.vision_tower(inputs["pixel_values"], config.feature_layers), dim=-1)
    if config.vision_feature_select_strategy == "default":
        features = features[:, 1:]  # the class token is not handed on either
    return list(features)


def encoder_token_places(model, inputs: dict) -> list[torch.Tensor]:
    """Where each of `encoder_tokens`' tokens lies: (tokens, 2) column and row, as fractions of the input's side."""
    from ..pretrain_vision import vit_places

    return vit_places(model, len(inputs["pixel_values"]))


def vision_embeddings(model):
    """The ViT's patch and position embeddings."""
    return model.model.vision_tower.embeddings


def start_positions_as_places(model, image_processor) -> None:
    """`--positions-as-places`: the ViT's learned positions set to its patches' places (training/vit_positions.py)."""
    from ..vit_positions import start_clip_positions_as_places

    start_clip_positions_as_places(vision_embeddings(model), image_processor)
