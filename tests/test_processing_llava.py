"""Image loading errors, LLaVA image processing against transformers' PIL backend, placeholder expansion."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil

from vlm_patterns.conversion.tiny import build_tokenizer, example_image, photo_like_image
from vlm_patterns.conversion.verify import pixel_agreement, pixels_agree
from vlm_patterns.processing import ImageInputError, LlavaPatternImageProcessor, LlavaPatternProcessor, load_image
from vlm_patterns.processing.processing_llava import LLAVA_CHAT_TEMPLATE

STD = LlavaPatternImageProcessor().image_std


# ----------------------------------------------------------------------------------------------------------
# Loading


def test_missing_empty_and_corrupt_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No image file"):
        load_image(tmp_path / "missing.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageInputError, match="empty"):
        load_image(empty)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 3)
    with pytest.raises(ImageInputError, match="not a readable image"):
        load_image(corrupt)
    truncated = tmp_path / "truncated.png"
    example_image(64, 64).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(ImageInputError, match="not a readable image"):
        load_image(truncated)
    with pytest.raises(ImageInputError, match="empty"):
        load_image(b"")


def test_zero_pixel_extreme_aspect_and_oversized_images_raise():
    with pytest.raises(ImageInputError, match="no pixels"):
        load_image(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ImageInputError, match="no pixels"):
        load_image(PIL.Image.new("RGB", (0, 5)))
    with pytest.raises(ImageInputError, match="aspect ratio"):
        load_image(np.zeros((2, 1000, 3), np.uint8), max_aspect_ratio=200)
    with pytest.raises(ImageInputError, match="above the limit"):
        load_image(PIL.Image.new("RGB", (100, 100)), max_pixels=9_999)
    with pytest.raises(ImageInputError, match="Unsupported image type"):
        load_image(42)
    with pytest.raises(ImageInputError, match="must be"):
        load_image(np.zeros((5, 5, 2), np.uint8))


def test_modes_convert_like_transformers():
    from transformers.image_transforms import convert_to_rgb

    rng = np.random.default_rng(0)
    rgba = PIL.Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA")
    gray = PIL.Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8), "L")
    palette = example_image(30, 20).convert("P")
    for image in (rgba, gray, palette):
        assert np.array_equal(load_image(image), convert_to_rgb(image, return_numpy=True))
    # Arrays and tensors: channels first or last, uint8 or float in [0, 1].
    hwc = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(load_image(hwc), hwc)
    assert np.array_equal(load_image(torch.from_numpy(hwc).permute(2, 0, 1)), hwc)
    assert np.array_equal(load_image(hwc.astype(np.float32) / 255), hwc)


# ----------------------------------------------------------------------------------------------------------
# Pixels


CLIP_336 = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
SIZES = [(336, 336), (1080, 1920), (1920, 1080), (101, 57), (20, 300), (12, 12), (731, 977)]


@pytest.mark.parametrize("size", SIZES)
def test_pixels_agree_with_transformers_pil_backend(size):
    height, width = size
    image = photo_like_image(width, height, seed=height + width)
    reference = CLIPImageProcessorPil(**CLIP_336)(image, return_tensors="pt")["pixel_values"]
    fast = LlavaPatternImageProcessor()(image)["pixel_values"]
    assert fast.shape == reference.shape == (1, 3, 336, 336)
    assert pixels_agree(*pixel_agreement(reference, fast, STD))
    # The PIL resize backend reproduces transformers' PIL backend up to float32 rounding.
    exact = LlavaPatternImageProcessor(resize_backend="pil")(image)["pixel_values"]
    assert (exact - reference).abs().max().item() < 1e-5


@pytest.mark.parametrize("size", [(200, 120), (90, 160), (64, 64)])
def test_pad_to_square_matches_original_llava(size):
    width, height = size
    image = photo_like_image(width, height, seed=7)
    reference = LlavaImageProcessorPil(**CLIP_336, do_pad=True)(image, return_tensors="pt")["pixel_values"]
    ours = LlavaPatternImageProcessor(do_pad=True)(image)["pixel_values"]
    assert pixels_agree(*pixel_agreement(reference, ours, STD))
    exact = LlavaPatternImageProcessor(do_pad=True, resize_backend="pil")(image)["pixel_values"]
    assert (exact - reference).abs().max().item() < 1e-5


def test_per_call_options_do_not_change_the_processor():
    processor = LlavaPatternImageProcessor()
    image = example_image(50, 40)
    small = processor(image, crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32})["pixel_values"]
    assert small.shape == (1, 3, 32, 32)
    assert processor(image)["pixel_values"].shape == (1, 3, 336, 336)
    with pytest.raises(TypeError, match="Unknown image processor options"):
        processor(image, not_an_option=True)


# ----------------------------------------------------------------------------------------------------------
# The processor


@pytest.fixture(scope="module")
def processor():
    return LlavaPatternProcessor(
        image_processor=LlavaPatternImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=build_tokenizer(),
        patch_size=8,
    )


def test_each_image_placeholder_expands_to_the_feature_count(processor):
    assert processor.image_seq_length == 16  # (32 / 8)^2 patches, class token dropped
    inputs = processor(
        images=[example_image(), example_image(seed=1)], text="USER: <image> and <image>\nSame? ASSISTANT:"
    )
    assert (inputs["input_ids"] == processor.image_token_id).sum() == 32
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    full = LlavaPatternProcessor(
        processor.image_processor, processor.tokenizer, patch_size=8, vision_feature_select_strategy="full"
    )
    assert full.image_seq_length == 17


def test_placeholder_and_image_counts_must_agree(processor):
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        processor(images=[example_image(), example_image()], text="USER: <image> hi ASSISTANT:")
    with pytest.raises(ValueError, match="placeholders but 0 images"):
        processor(text="USER: <image> hi ASSISTANT:")
    with pytest.raises(ValueError, match="Prompt 0 has 2"):
        processor(images=[[example_image()], [example_image(), example_image()]], text=["<image> <image>", "<image>"])


def test_batches_pad_on_the_requested_side(processor):
    prompts = ["USER: <image>\nhi ASSISTANT:", "USER: <image>\nWhat is in the image, in detail? ASSISTANT:"]
    images = [example_image(), example_image(seed=2)]
    left = processor(images=images, text=prompts, padding_side="left")
    right = processor(images=images, text=prompts, padding_side="right")
    assert left["attention_mask"][0, 0] == 0 and left["attention_mask"][0, -1] == 1
    assert right["attention_mask"][0, 0] == 1 and right["attention_mask"][0, -1] == 0
    assert torch.equal(left["input_ids"][1], right["input_ids"][1])


def test_chat_template_formats_llava_conversations(processor):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "And its colour?"},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "You are helpful. USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: And its colour? ASSISTANT:"
    assert processor.chat_template == LLAVA_CHAT_TEMPLATE
