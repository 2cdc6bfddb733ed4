"""Fuyu at training-from-scratch size: raw 16 x 16 patches through one Linear, no vision encoder."""

from vlm_patterns.modeling import FuyuPatternConfig
from vlm_patterns.processing import FuyuPatternImageProcessor, FuyuPatternProcessor

from ..synthetic_vqa import MAX_SIDE
from . import text_config

TOKENS = dict(bos="<s>", eos="|ENDOFTEXT|", pad="<pad>")
PROCESSOR_PLACES_BOS = True  # the tokenizer must not add it again
# No `encoder_tokens`: nothing to train alone before the task (`vlm-patterns pretrain-vision`).
NO_ENCODER = "its patches go through one Linear into the language model (that is its pattern)"


def config(tokenizer, text: dict) -> FuyuPatternConfig:
    ids = tokenizer.convert_tokens_to_ids
    return FuyuPatternConfig(
        text_config=text_config(tokenizer, text), patch_size=16, image_token_id=ids("|SPEAKER|"),
        image_newline_token_id=ids("|NEWLINE|"), tie_word_embeddings=False,
    )  # fmt: skip


def processor(tokenizer) -> FuyuPatternProcessor:
    image_processor = FuyuPatternImageProcessor(size={"height": MAX_SIDE, "width": MAX_SIDE}, patch_size=16)
    return FuyuPatternProcessor(image_processor=image_processor, tokenizer=tokenizer)
