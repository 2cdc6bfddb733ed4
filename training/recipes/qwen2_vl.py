"""Qwen2-VL at training-from-scratch size: native resolution, 28 x 28 pixels per visual token, and the learned
positions its successor Qwen3-VL adds to the patches.

Qwen2-VL's ViT places patches by 2D rotary positions alone, and its language model reads a token's column from the
slowest rotary pairs only (M-RoPE gives width the last sections): 0.003 radians per column at this size. Trained so,
the model answered "is the circle left of the square?" at chance in every run (the README's left/right bullet). Its
rotary phases steer attention; where a token lies has to be in what it hands on. Qwen3-VL adds learned positions, a
square table resampled to each image's grid, to the patch embeddings; with them, started as places, the same model
learned the question (the README measures it).
"""

import torch

from vlm_patterns.modeling import Qwen2VLPatternConfig
from vlm_patterns.processing import Qwen2VLPatternImageProcessor, Qwen2VLPatternProcessor

from ..synthetic_vqa import MAX_SIDE
from . import PLACE_GRID, text_config

TOKENS = dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>")  # Qwen2-VL adds no BOS


def config(tokenizer, text: dict) -> Qwen2VLPatternConfig:
    ids = tokenizer.convert_tokens_to_ids
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    return Qwen2VLPatternConfig(
        vision_config=dict(depth=3, embed_dim=96, num_heads=4, mlp_ratio=2.0, hidden_act="gelu",
                           out_hidden_size=text["hidden_size"], num_position_embeddings=PLACE_GRID**2),
        text_config=text_config(tokenizer, text, qkv_bias=True, rope_theta=10000.0,
                                mrope_section=[head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )  # fmt: skip


def processor(tokenizer) -> Qwen2VLPatternProcessor:
    # Native resolution: a 160 x 120 image becomes 6 x 4 = 24 visual tokens, a 64 x 64 one 4.
    image_processor = Qwen2VLPatternImageProcessor(min_pixels=56 * 56, max_pixels=MAX_SIDE * MAX_SIDE)
    return Qwen2VLPatternProcessor(image_processor=image_processor, tokenizer=tokenizer)


def encoder_tokens(model, inputs: dict) -> list[torch.Tensor]:
    """The ViT blocks' output, before the PatchMerger (the connector, trained with the task): one (patches, width)
    tensor per image, in the processor's merge-window order (`vlm-patterns pretrain-vision`)."""
    visual, patches = model.model.visual, inputs["pixel_values"]
    layout = visual.layout(patches, inputs["image_grid_thw"])
    hidden_states = visual.embed(patches, layout)
    for block in visual.blocks:
        hidden_states = block(hidden_states, layout.rotary, layout.lengths)
    return list(hidden_states.split(layout.lengths))


def encoder_token_places(model, inputs: dict) -> list[torch.Tensor]:
    """Where each of `encoder_tokens`' patches lies: (patches, 2) column and row, as fractions of its image's
    sides, in the processor's merge-window order (each m x m window of patches in turn, windows in raster order)."""
    from ..pretrain_vision import raster_places

    m = model.config.vision_config.spatial_merge_size
    places = []
    for t, h, w in inputs["image_grid_thw"].tolist():
        grid = raster_places(w, h).view(h // m, m, w // m, m, 2).permute(0, 2, 1, 3, 4)  # windows, then within
        places.append(grid.reshape(h * w, 2).repeat(t, 1))
    return places


@torch.no_grad()
def start_positions_as_places(model, image_processor) -> None:
    """`--positions-as-places`: the ViT's learned positions set to its patches' places, a table added first to a
    checkpoint without one (training/vit_positions.py)."""
    from ..vit_positions import start_resampled_positions_as_places, task_pixels

    visual = model.model.visual
    if visual.pos_embed is None:
        visual.add_learned_positions(PLACE_GRID**2)
    patches = visual.patch_embed(task_pixels(image_processor))  # (N, D): every picture's patches
    start_resampled_positions_as_places(visual.pos_embed, patches)
