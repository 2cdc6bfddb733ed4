"""Our converted Qwen2-VL against transformers' Qwen2VLForConditionalGeneration on the same weights.

transformers' Qwen2VLProcessor needs torchvision to be built, so the reference inputs come from
`Qwen2VLImageProcessorPil` and the tokenizer, expanded as that processor documents (conversion/verify.py).
"""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2VLForConditionalGeneration

from tests.conftest import QWEN2_VL_VARIANTS
from vlm_patterns.conversion.tiny import photo_like_image
from vlm_patterns.conversion.verify import pixel_agreement_for, pixels_agree, qwen2_vl_reference_inputs, verify_qwen2_vl

ATOL = 1e-4


def load(qwen2_vl_pair, variant):
    source, converted = qwen2_vl_pair(variant)
    reference = Qwen2VLForConditionalGeneration.from_pretrained(source).eval()
    ours = AutoModelForImageTextToText.from_pretrained(converted).eval()
    return source, reference, ours, AutoProcessor.from_pretrained(converted)


def chat(processor, *items, question="What is in the picture?"):
    content = [{"type": kind} for kind in items] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def assert_same_outputs(reference, ours, inputs, new_tokens=10):
    ours_inputs = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        reference_logits = reference(**inputs).logits
        our_logits = ours(**ours_inputs).logits
    real = inputs["attention_mask"].bool()
    assert (reference_logits - our_logits).abs()[real].max().item() <= ATOL
    options = dict(max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(reference.generate(**inputs, **options), ours.generate(**ours_inputs, **options))


@pytest.mark.parametrize("variant", list(QWEN2_VL_VARIANTS))
def test_converter_verification_passes(qwen2_vl_pair, variant):
    source, converted = qwen2_vl_pair(variant)
    report = verify_qwen2_vl(source, converted)
    assert report.passed, report.summary()


def test_several_images_of_different_aspect_ratios_in_one_prompt(qwen2_vl_pair):
    source, reference, ours, processor = load(qwen2_vl_pair, "hub-tied")
    images = [photo_like_image(200, 120, 1), photo_like_image(60, 300, 2), photo_like_image(500, 500, 3)]
    prompt = chat(processor, "image", "image", "image", question="Compare the three pictures.")
    inputs = processor(images=images, text=prompt, return_mm_token_type_ids=True)
    expected = qwen2_vl_reference_inputs(source, images, prompt)
    assert torch.equal(expected["input_ids"], inputs["input_ids"])
    assert torch.equal(expected["mm_token_type_ids"], inputs["mm_token_type_ids"])
    assert pixels_agree(
        *pixel_agreement_for(expected["pixel_values"], inputs["pixel_values"], processor.image_processor.image_std)
    )
    grids = inputs["image_grid_thw"].tolist()
    assert len({tuple(g) for g in grids}) == 3  # three different native grids
    assert_same_outputs(reference, ours, inputs)


@pytest.mark.parametrize("variant", list(QWEN2_VL_VARIANTS))
def test_left_padded_batch_with_different_image_counts(qwen2_vl_pair, variant):
    _, reference, ours, processor = load(qwen2_vl_pair, variant)
    images = [[photo_like_image(100, 80, 4)], [photo_like_image(90, 160, 5), photo_like_image(300, 90, 6)]]
    prompts = [
        chat(processor, "image", question="Hi"),
        chat(processor, "image", "image", question="What differs between them?"),
    ]
    inputs = processor(images=images, text=prompts, return_mm_token_type_ids=True)
    assert inputs["attention_mask"][0, 0] == 0  # left padding
    assert_same_outputs(reference, ours, inputs)


def test_video_frames(qwen2_vl_pair):
    _, reference, ours, processor = load(qwen2_vl_pair, "hub-tied")
    frames = [photo_like_image(112, 84, seed) for seed in range(5)]  # 5 frames: padded to 6 by repeating the last
    prompt = chat(processor, "video", question="What happens?")
    inputs = processor(videos=frames, text=prompt, return_mm_token_type_ids=True, max_pixels=28 * 28 * 12)
    assert inputs["video_grid_thw"].tolist() == [[3, 6, 8]]  # (5 + 1 repeated) / 2 frames x 84/14 x 112/14 patches
    assert_same_outputs(reference, ours, inputs)
