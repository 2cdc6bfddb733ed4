"""Processors and models refuse what they cannot use, before any work and with a message naming the problem:
prompts that are not text or give no tokens, misspelt options, masks of the wrong shape, pixels that are not the
processor's floats, token ids outside the vocabulary, grids and image masks that do not match, and generation
past the context (which stops at the last position instead of failing there)."""

from pathlib import Path

import pytest
import torch

import vlm_patterns  # noqa: F401  (registers the Auto classes)
from vlm_patterns.families import FAMILIES as REGISTRY  # noqa: E402

CHECKPOINTS = Path(__file__).resolve().parents[1] / "training" / "checkpoints"
FAMILIES = list(REGISTRY)  # the registry's families
EXAMPLE = Path(__file__).resolve().parents[1] / "spaces" / "examples" / "color-0.png"


def image_inputs(family: str, processor, question: str = "What color is the square?") -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = str(EXAMPLE) if family == "fuyu" else [[str(EXAMPLE)]]
    inputs = dict(processor(images=images, text=prompt))
    for key in ("image_patch_grid", "image_sizes", "image_scale_factors"):
        inputs.pop(key, None)
    return inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_must_be_text_that_gives_tokens(shipped, family):
    _, processor = shipped[family]
    for text in (123, {"question": "what"}, ["fine", 7]):
        with pytest.raises(TypeError, match="string"):
            processor(text=text)
    if family != "fuyu":  # Fuyu's stream always holds BOS and the begin-of-answer token
        with pytest.raises(ValueError, match="Prompt 0 is empty"):
            processor(text="", add_special_tokens=False) if family != "qwen2_vl" else processor(text="")


@pytest.mark.parametrize("family", FAMILIES)
def test_misspelt_options_are_errors(shipped, family):
    _, processor = shipped[family]
    images = str(EXAMPLE) if family == "fuyu" else [[str(EXAMPLE)]]
    text = "<image> hi" if family != "qwen2_vl" else "<|vision_start|><|image_pad|><|vision_end|> hi"
    with pytest.raises(TypeError, match="max_pixel"):
        processor(images=images, text=text, max_pixel=28 * 28 * 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_mask_must_match_the_ids(shipped, family):
    model, processor = shipped[family]
    inputs = image_inputs(family, processor)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    five_longer = torch.cat([torch.ones(1, 5, dtype=mask.dtype), mask], 1)
    for bad in (five_longer, mask[0], mask.expand(2, -1)):  # longer, 1-D, a batch of 2 for a batch of 1
        with pytest.raises(ValueError, match=r"attention_mask has shape .* must be \(batch, cached \+ new tokens\)"):
            model(**{**inputs, "attention_mask": bad})
    assert ids.shape == mask.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_pixels_must_be_the_processors_floats(shipped, family):
    model, processor = shipped[family]
    inputs = image_inputs(family, processor)
    pixels = inputs["pixel_values"]
    for dtype in (torch.uint8, torch.int64):
        with pytest.raises(TypeError, match="must be floating point"):
            model(**{**inputs, "pixel_values": pixels.to(dtype)})
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(**{**inputs, "pixel_values": torch.full_like(pixels, float("nan"))})


@pytest.mark.parametrize("family", FAMILIES)
def test_token_ids_outside_the_vocabulary_are_named(shipped, family):
    model, _ = shipped[family]
    vocabulary = model.config.text_config.vocab_size
    with pytest.raises(ValueError, match=f"Token id {vocabulary + 7} is outside .* vocabulary of {vocabulary} ids"):
        model(input_ids=torch.tensor([[1, 2, vocabulary + 7]]))
    with pytest.raises(ValueError, match="Token id -1"):
        model(input_ids=torch.tensor([[1, -1]]))


def test_qwen2_vl_grids_and_flamingo_image_masks_are_checked(shipped):
    model, processor = shipped["qwen2_vl"]
    inputs = image_inputs("qwen2_vl", processor)
    grid = inputs["image_grid_thw"]
    with pytest.raises(ValueError, match="must be positive"):
        model(**{**inputs, "image_grid_thw": grid * torch.tensor([1, -1, -1])})
    with pytest.raises(ValueError, match="multiples of 2"):
        model(**{**inputs, "image_grid_thw": grid + torch.tensor([0, 1, 0])})

    model, processor = shipped["flamingo"]
    inputs = image_inputs("flamingo", processor)
    with pytest.raises(ValueError, match=r"image_mask has shape \(1, 3\); it must be \(batch, images\) = \(1, 1\)"):
        model(**{**inputs, "image_mask": torch.ones(1, 3, dtype=torch.bool)})


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_stops_at_the_context_instead_of_failing_there(shipped, family, caplog):
    model, processor = shipped[family]
    limit = model.config.text_config.max_position_embeddings
    token = processor.tokenizer("red", add_special_tokens=False)["input_ids"][0]
    ids = torch.full((1, limit - 4), token)
    # min_new_tokens keeps the answer from ending early on its own (a trained model may well say EOS at once)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=50, min_new_tokens=4,
                         do_sample=False)  # fmt: skip
    assert out.shape[1] == limit  # the 4 tokens that fit, returned
    with pytest.raises(ValueError, match=f"context holds {limit}"):
        model.generate(input_ids=torch.full((1, limit), token), max_new_tokens=5)
