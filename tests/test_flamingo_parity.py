"""Flamingo pattern vs transformers' IdeficsForVisionText2Text + IdeficsProcessor on converted tiny checkpoints
whose gates are open (random non-zero alphas), so the cross-attention path really shapes the logits."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, IdeficsForVisionText2Text

from tests.conftest import IDEFICS_VARIANTS
from vlm_patterns.conversion.tiny import photo_like_image
from vlm_patterns.conversion.verify import idefics_reference_inputs, pixel_agreement_for, pixels_agree, verify_idefics
from vlm_patterns.modeling.flamingo_visibility import ImageState, image_attention, track_images

ATOL = 1e-4


def load(idefics_pair, variant="scalar-qk-norm"):
    source, converted = idefics_pair(variant)
    reference = IdeficsForVisionText2Text.from_pretrained(source).eval()
    ours = AutoModelForImageTextToText.from_pretrained(converted).eval()
    return source, reference, ours, AutoProcessor.from_pretrained(converted)


def images(count: int, seed: int = 0) -> list:
    return [photo_like_image(60 + 17 * i, 40 + 9 * i, seed=seed + i) for i in range(count)]


def reference_view(inputs: dict, reference_inputs: dict) -> dict:
    """What the reference reads: our tensors (same ids, pixels), plus its own processor's image attention mask."""
    view = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    view["pixel_values"] = inputs["pixel_values"] if "pixel_values" in inputs else reference_inputs["pixel_values"]
    view["image_attention_mask"] = reference_inputs["image_attention_mask"]
    return view


def derived_attention(ours, inputs) -> torch.Tensor:
    """Our model's rule (which image each token sees) as a (B, T, I) mask, from the token ids alone."""
    config = ours.config
    B = inputs["input_ids"].shape[0]
    num_images = inputs["pixel_values"].shape[1] if "pixel_values" in inputs else 0
    available = inputs["image_mask"].sum(-1) if "image_mask" in inputs else torch.zeros(B, dtype=torch.long)
    state = ImageState.start(B, available, "cpu")
    index, _ = track_images(inputs["input_ids"], config.image_token_id, config.media_reset_token_id, state)
    return image_attention(index, num_images)


def check_against_reference(source, reference, ours, processor, rows: list[list], prompts: list[str], new_tokens=6):
    inputs = processor(images=rows if any(rows) else None, text=prompts)
    expected = idefics_reference_inputs(source, rows, prompts)
    # Processors: identical ids and mask; pixels within the resize bound; the same image attention.
    assert torch.equal(expected["input_ids"], inputs["input_ids"])
    assert torch.equal(expected["attention_mask"], inputs["attention_mask"])
    if any(rows):
        std = processor.image_processor.image_std
        assert pixels_agree(*pixel_agreement_for(expected["pixel_values"], inputs["pixel_values"], std))
        assert torch.equal(expected["image_attention_mask"].bool(), derived_attention(ours, inputs))
    else:
        assert not expected["image_attention_mask"].any()
    # Models on the same tensors: logits of every real token, then greedy continuations.
    view = reference_view(inputs, expected)
    with torch.no_grad():
        diff = (reference(**view).logits - ours(**inputs).logits).abs()
    assert diff[inputs["attention_mask"].bool()].max().item() <= ATOL
    options = dict(max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(reference.generate(**view, **options), ours.generate(**inputs, **options))


@pytest.mark.parametrize("variant", list(IDEFICS_VARIANTS))
def test_converter_verification_passes(idefics_pair, variant):
    source, converted = idefics_pair(variant)
    report = verify_idefics(source, converted, images=images(2))
    assert report.passed, report.summary()


@pytest.mark.parametrize(
    "prompt",
    [
        "User: Tell me a story about a dog.\nAssistant:",
        "User:<image>Describe the picture.\nAssistant:",
        "<image>A photo of a cat.\n<image>A red circle.\n<image>",
        "User:<image><image>Which one is left?\nAssistant: The first.</s>Read the word.<image>Assistant:",
    ],
    ids=["no-image", "one-image", "three-few-shot", "consecutive-images-and-reset"],
)
@pytest.mark.parametrize("variant", list(IDEFICS_VARIANTS))
def test_interleaved_prompts_match_the_reference(idefics_pair, variant, prompt):
    source, reference, ours, processor = load(idefics_pair, variant)
    row = images(prompt.count("<image>"), seed=len(prompt))
    check_against_reference(source, reference, ours, processor, [row], [prompt])


def test_padded_batch_with_different_image_counts(idefics_pair):
    source, reference, ours, processor = load(idefics_pair)
    prompts = [
        "User:<image>What is this?\nAssistant: A dog.\nUser:<image>And this?\nAssistant:",
        "User: Say something.\nAssistant:",
        "<image>A short caption:",
    ]
    rows = [images(2, seed=3), [], images(1, seed=9)]
    check_against_reference(source, reference, ours, processor, rows, prompts)


def test_right_padding_matches_the_reference(idefics_pair):
    source, reference, ours, processor = load(idefics_pair, "vector-instruct")
    prompts = ["<image>Hi.", "User:<image>Describe both pictures in detail.<image>\nAssistant:"]
    rows = [images(1, seed=5), images(2, seed=6)]
    inputs = processor(images=rows, text=prompts, padding_side="right")
    expected = idefics_reference_inputs(source, rows, prompts, padding_side="right")
    assert torch.equal(expected["input_ids"], inputs["input_ids"])
    assert torch.equal(expected["image_attention_mask"].bool(), derived_attention(ours, inputs))
    with torch.no_grad():
        diff = (reference(**reference_view(inputs, expected)).logits - ours(**inputs).logits).abs()
    assert diff[inputs["attention_mask"].bool()].max().item() <= ATOL


def test_idefics_processor_outputs_drive_our_model(idefics_pair):
    """transformers' own IdeficsProcessor output (with its image_attention_mask) works as our input too."""
    source, reference, ours, _ = load(idefics_pair)
    rows = [images(2, seed=11), images(1, seed=12)]
    prompts = ["User:<image>A<image>B\nAssistant:", "<image>Caption:"]
    expected = idefics_reference_inputs(source, rows, prompts)
    with torch.no_grad():
        diff = (reference(**expected).logits - ours(**expected).logits).abs()
    assert diff[expected["attention_mask"].bool()].max().item() <= ATOL
    options = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(reference.generate(**expected, **options), ours.generate(**expected, **options))


@pytest.mark.parametrize("variant", ["scalar-qk-norm", "no-resampler"])
def test_cache_on_and_off_agree(idefics_pair, variant):
    _, _, ours, processor = load(idefics_pair, variant)
    prompts = ["User:<image>What is it?\nAssistant:", "<image>One.\n<image>Two.</s>Text after the end:"]
    inputs = processor(images=[images(1, seed=1), images(2, seed=2)], text=prompts)
    options = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(**inputs, **options), ours.generate(**inputs, use_cache=False, **options))


def test_batched_generation_equals_one_by_one(idefics_pair):
    _, _, ours, processor = load(idefics_pair)
    prompts = [
        "User:<image>Describe it.\nAssistant:",
        "User: No picture here, just a question?\nAssistant:",
        "<image>A.\n<image>B.\n<image>",
    ]
    rows = [images(1, seed=21), [], images(3, seed=22)]
    options = dict(max_new_tokens=6, do_sample=False)
    batch = processor(images=rows, text=prompts)
    batched = ours.generate(**batch, **options)[:, -6:]
    for i, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        alone = processor(images=[row] if row else None, text=[prompt])
        assert torch.equal(ours.generate(**alone, **options)[0, -6:], batched[i]), f"row {i}"
