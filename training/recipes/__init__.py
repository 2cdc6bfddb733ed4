"""The four families at training-from-scratch size, with their processors, on the synthetic task.

Each small model keeps its pattern's defining shape (LLaVA: a fixed 64 x 64 input, 64 patch tokens projected into
the LM; Qwen2-VL: native resolution, 28 x 28 pixels per visual token; Fuyu: raw 16 x 16 patches through one Linear;
Flamingo: 16 latents per image read through gated cross-attention) and a language model of the same size, so
that differences in accuracy come from how each pattern sees the image. Each family's recipe is a module of this
package named after it (`recipes/llava.py`, ...): `TOKENS` (its BOS, EOS and padding tokens),
`config(tokenizer, text)` (`text`: the shared language model's size, from `text_size`) and `processor(tokenizer)`.
"""

import importlib
import pkgutil
from types import ModuleType

HEAD_DIM = 32


def text_size(width: int = 128, layers: int = 3) -> dict:
    """One language model size for all four (Llama settings; Qwen2's QKV bias and M-RoPE for Qwen2-VL): heads of
    32 dimensions, an MLP twice as wide as the model."""
    if width <= 0 or width % HEAD_DIM or layers <= 0:
        raise ValueError(f"the language model's width must be a positive multiple of {HEAD_DIM} and its layers "
                         f"positive, not width {width} and {layers} layers")  # fmt: skip
    return dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=width // HEAD_DIM, max_position_embeddings=512, norm_eps=1e-6)  # fmt: skip


# The size the shipped checkpoints were trained at.
TEXT = text_size()
# The learned positions Qwen2-VL and Fuyu are given (modeling/resampled_positions.py): an 8 x 8 table, resampled to
# each image (up to 12 x 12 Qwen2-VL patches, 10 x 10 Fuyu patches here).
PLACE_GRID = 8
# One vision width for the two families with a ViT of their own design here (Qwen2-VL's tower has its own names).
VISION = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, image_size=64,
              patch_size=8, hidden_act="gelu")  # fmt: skip


def text_config(tokenizer, text: dict, **overrides) -> dict:
    """The shared language model of size `text`, with the tokenizer's vocabulary and special tokens."""
    return dict(text, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, initializer_range=0.05, **overrides)  # fmt: skip


def recipe_names() -> list[str]:
    return sorted(module.name for module in pkgutil.iter_modules(__path__))


def recipe(family: str) -> ModuleType:
    """The recipe module of a family."""
    if family not in recipe_names():
        raise ValueError(f"Unknown family {family!r}; choose from {', '.join(recipe_names())}")
    return importlib.import_module(f"{__name__}.{family}")


def build_config(family: str, tokenizer, text: dict | None = None):
    return recipe(family).config(tokenizer, text or TEXT)


def build_processor(family: str, tokenizer=None):
    from ..vqa_tokenizer import build_vqa_tokenizer

    return recipe(family).processor(tokenizer or build_vqa_tokenizer(family))


def build_model(family: str, tokenizer, seed: int = 0, text: dict | None = None):
    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(build_config(family, tokenizer, text))
