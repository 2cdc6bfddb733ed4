"""Our converted LLaVA against transformers' LlavaForConditionalGeneration + LlavaProcessor on the same weights."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from tests.conftest import LLAVA_VARIANTS
from vlm_patterns.conversion.tiny import photo_like_image
from vlm_patterns.conversion.verify import pixel_agreement, pixels_agree

ATOL = 1e-4


def load_pair(llava_pair, variant):
    source, converted = llava_pair(variant)
    reference = LlavaForConditionalGeneration.from_pretrained(source).eval()
    ours = AutoModelForImageTextToText.from_pretrained(converted).eval()
    return reference, AutoProcessor.from_pretrained(source), ours, AutoProcessor.from_pretrained(converted)


@pytest.mark.parametrize("variant", list(LLAVA_VARIANTS))
def test_single_prompt_parity(llava_pair, variant):
    reference, reference_processor, ours, processor = load_pair(llava_pair, variant)
    image = photo_like_image(123, 77, seed=3)
    prompt = "USER: <image>\nWhat is in the image? ASSISTANT:"
    ref_inputs = reference_processor(images=image, text=prompt, return_tensors="pt")
    inputs = processor(images=image, text=prompt)

    assert torch.equal(ref_inputs["input_ids"], inputs["input_ids"])
    assert pixels_agree(
        *pixel_agreement(ref_inputs["pixel_values"], inputs["pixel_values"], processor.image_processor.image_std)
    )
    with torch.no_grad():
        diff = (reference(**inputs).logits - ours(**inputs).logits).abs().max().item()
    assert diff <= ATOL
    generate = dict(max_new_tokens=12, do_sample=False)
    assert torch.equal(reference.generate(**inputs, **generate), ours.generate(**inputs, **generate))


@pytest.mark.parametrize("variant", ["layer-2-default", "layers-list-tied"])
def test_padded_batch_with_several_images_parity(llava_pair, variant):
    reference, reference_processor, ours, processor = load_pair(llava_pair, variant)
    images = [[photo_like_image(64, 64, seed=4)], [photo_like_image(90, 40, seed=5), photo_like_image(30, 100, seed=6)]]
    prompts = [
        "USER: <image>\nWhat colour is the circle? ASSISTANT:",
        "USER: <image>\nand <image>\nCompare the two pictures, briefly please. ASSISTANT:",
    ]
    ref_inputs = reference_processor(
        images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt"
    )
    inputs = processor(images=images, text=prompts, padding_side="left")
    assert torch.equal(ref_inputs["input_ids"], inputs["input_ids"])
    assert torch.equal(ref_inputs["attention_mask"], inputs["attention_mask"])
    assert inputs["attention_mask"][0, 0] == 0  # the shorter prompt really is padded

    # Fed the same tensors (positions counted over real tokens, as generate does), the logits agree.
    position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref_logits = reference(**inputs, position_ids=position_ids).logits
        our_logits = ours(**inputs, position_ids=position_ids).logits
    real = inputs["attention_mask"].bool()
    assert (ref_logits - our_logits).abs()[real].max().item() <= ATOL
    generate = dict(max_new_tokens=10, do_sample=False)
    assert torch.equal(reference.generate(**inputs, **generate), ours.generate(**inputs, **generate))


def test_chat_template_prompt_parity(llava_pair):
    reference, reference_processor, ours, processor = load_pair(llava_pair, "layer-2-default")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == reference_processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nDescribe the picture. ASSISTANT:"
