"""Fuyu at training-from-scratch size: raw 16 x 16 patches through one Linear, no vision encoder, and learned
positions added to the projected patches, as Mono-InternVL (also without an encoder) adds them.

Fuyu-8B gives a patch's place to its decoder only through the patch's order in the stream (rows closed by newline
tokens) and the decoder's 1D rotary phases. Trained so, the model answered "is the circle left of the square?" at
chance in every run (the README's left/right bullet); with the place added to the patches, as a fixed table, it
learned the question, and the recipe's learned table starts as that table.
"""

import torch

from vlm_patterns.modeling import FuyuPatternConfig
from vlm_patterns.processing import FuyuPatternImageProcessor, FuyuPatternProcessor

from ..synthetic_vqa import MAX_SIDE
from . import PLACE_GRID, text_config

TOKENS = dict(bos="<s>", eos="|ENDOFTEXT|", pad="<pad>")
PROCESSOR_PLACES_BOS = True  # the tokenizer must not add it again
# No `encoder_tokens`: nothing to train alone before the task (`vlm-patterns pretrain-vision`).
NO_ENCODER = "its patches go through one Linear into the language model (that is its pattern)"


def config(tokenizer, text: dict) -> FuyuPatternConfig:
    ids = tokenizer.convert_tokens_to_ids
    return FuyuPatternConfig(
        text_config=text_config(tokenizer, text), patch_size=16, image_token_id=ids("|SPEAKER|"),
        image_newline_token_id=ids("|NEWLINE|"), num_position_embeddings=PLACE_GRID**2, tie_word_embeddings=False,
    )  # fmt: skip


def processor(tokenizer) -> FuyuPatternProcessor:
    image_processor = FuyuPatternImageProcessor(size={"height": MAX_SIDE, "width": MAX_SIDE}, patch_size=16)
    return FuyuPatternProcessor(image_processor=image_processor, tokenizer=tokenizer)


@torch.no_grad()
def start_positions_as_places(model, image_processor) -> None:
    """`--positions-as-places`: the learned patch positions set to the patches' places, a table added first to a
    checkpoint without one (training/vit_positions.py)."""
    from ..vit_positions import start_resampled_positions_as_places, task_pixels

    fuyu = model.model
    if fuyu.vision_pos_embed is None:
        fuyu.add_learned_positions(PLACE_GRID**2)
    start_resampled_positions_as_places(fuyu.vision_pos_embed, fuyu.get_image_features(task_pixels(image_processor)))
