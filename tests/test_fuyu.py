"""Fuyu: parity with transformers' FuyuForCausalLM, the early-fusion properties, processing and coordinates."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, FuyuForCausalLM

from tests.conftest import FUYU_VARIANTS
from vlm_patterns.conversion.tiny import photo_like_image
from vlm_patterns.conversion.verify import fuyu_reference_inputs, pixel_agreement_for, pixels_agree, verify_fuyu

ATOL = 1e-4
PROMPT = "Generate a coco-style caption.\n"


def load(fuyu_pair, variant="small-canvas"):
    source, converted = fuyu_pair(variant)
    reference = FuyuForCausalLM.from_pretrained(source).eval()
    ours = AutoModelForImageTextToText.from_pretrained(converted).eval()
    return source, reference, ours, AutoProcessor.from_pretrained(converted)


def model_inputs(inputs):
    return {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def assert_same_outputs(reference, ours, inputs, new_tokens=8):
    with torch.no_grad():
        diff = (reference(**model_inputs(inputs)).logits - ours(**inputs).logits).abs()
    assert diff[inputs["attention_mask"].bool()].max().item() <= ATOL
    options = dict(max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(reference.generate(**model_inputs(inputs), **options), ours.generate(**inputs, **options))


@pytest.mark.parametrize("variant", list(FUYU_VARIANTS))
def test_converter_verification_passes(fuyu_pair, variant):
    source, converted = fuyu_pair(variant)
    report = verify_fuyu(source, converted)
    assert report.passed, report.summary()


@pytest.mark.parametrize(
    ("width", "height"),
    [(25, 20), (131, 97), (180, 120), (500, 300), (90, 400)],
    ids=["smaller-than-a-patch", "odd", "exactly-the-canvas", "larger-than-the-canvas", "tall"],
)
def test_images_of_several_sizes(fuyu_pair, width, height):
    source, reference, ours, processor = load(fuyu_pair)
    image = photo_like_image(width, height, seed=width)
    inputs = processor(images=image, text=PROMPT)
    expected = fuyu_reference_inputs(source, [image], [PROMPT])
    assert torch.equal(expected["input_ids"], inputs["input_ids"])
    assert pixels_agree(*pixel_agreement_for(expected["pixel_values"], inputs["pixel_values"], 0.5))
    rows, cols = inputs["image_patch_grid"][0].tolist()
    canvas = processor.image_processor.size
    assert rows * 30 <= canvas["height"] + 29 and cols * 30 <= canvas["width"] + 29
    assert_same_outputs(reference, ours, inputs)


def test_grayscale_and_rgba_images(fuyu_pair):
    source, reference, ours, processor = load(fuyu_pair)
    rgb = photo_like_image(70, 50, seed=3)
    gray = rgb.convert("L")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(PIL.Image.fromarray(np.linspace(0, 255, 70 * 50).reshape(50, 70).astype(np.uint8)))
    for image, as_rgb in ((gray, gray.convert("RGB")), (rgba, None)):
        inputs = processor(images=image, text=PROMPT)
        if as_rgb is not None:  # transformers' Fuyu processors do not convert grayscale: give the reference RGB
            expected = fuyu_reference_inputs(source, [as_rgb], [PROMPT])
            assert pixels_agree(*pixel_agreement_for(expected["pixel_values"], inputs["pixel_values"], 0.5))
        assert_same_outputs(reference, ours, inputs)


def test_left_padded_batch_equals_one_by_one(fuyu_pair):
    source, reference, ours, processor = load(fuyu_pair)
    images = [photo_like_image(40, 40, 1), photo_like_image(170, 110, 2)]
    prompts = ["Hi.\n", "Describe the picture in a few words.\n"]
    inputs = processor(images=images, text=prompts)
    expected = fuyu_reference_inputs(source, images, prompts)
    assert torch.equal(expected["input_ids"], inputs["input_ids"])
    assert torch.equal(expected["attention_mask"], inputs["attention_mask"])
    assert_same_outputs(reference, ours, inputs)
    batched = ours.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        single = processor(images=image, text=prompt)
        assert torch.equal(
            batched[i], ours.generate(**single, max_new_tokens=8, do_sample=False)[0, single["input_ids"].shape[1] :]
        )


def test_early_fusion_has_no_vision_encoder(fuyu_pair):
    """The pattern: one Linear maps raw patches into the decoder, whose first layer sees them beside the words."""
    _, _, ours, processor = load(fuyu_pair)
    vision = {name for name, _ in ours.named_parameters() if not name.startswith(("model.language_model.", "lm_head"))}
    assert vision == {"model.vision_embed_tokens.weight", "model.vision_embed_tokens.bias"}
    inputs = processor(images=photo_like_image(60, 60, 4), text=PROMPT)
    captured = {}
    hook = ours.model.language_model.layers[0].register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    with torch.no_grad():
        ours(**inputs)
    hook.remove()
    placeholders = inputs["input_ids"][0] == ours.config.image_token_id
    expected = ours.model.vision_embed_tokens(inputs["pixel_values"])
    assert torch.equal(captured["x"][0, placeholders], expected)


def test_a_thin_strip_larger_than_the_canvas_keeps_one_pixel_across(fuyu_pair):
    """Scaled down to fit, a 4000 x 10 strip would round to 0 rows; it becomes one row of patches instead."""
    _, _, ours, processor = load(fuyu_pair)
    inputs = processor(images=PIL.Image.new("RGB", (4000, 10), "red"), text=PROMPT)
    canvas_width = processor.image_processor.size["width"]
    assert inputs["image_patch_grid"].tolist() == [[1, -(-canvas_width // 30)]]
    with torch.no_grad():
        assert torch.isfinite(ours(**inputs).logits).all()


def test_stream_layout(fuyu_pair):
    _, _, _, processor = load(fuyu_pair)
    inputs = processor(images=photo_like_image(65, 35, 5), text=PROMPT)  # 2 rows x 3 columns of patches
    ids = inputs["input_ids"][0].tolist()
    speaker, newline = processor.image_token_id, processor.image_newline_token_id
    assert ids[:8] == [speaker] * 3 + [newline] + [speaker] * 3 + [newline]
    assert ids[8] == processor.tokenizer.bos_token_id and ids[-1] == processor.answer_token_id


def test_cache_on_and_off_and_mismatches(fuyu_pair):
    _, _, ours, processor = load(fuyu_pair)
    inputs = processor(images=photo_like_image(100, 80, 6), text=PROMPT)
    options = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(**inputs, **options), ours.generate(**inputs, use_cache=False, **options))
    with pytest.raises(ValueError, match="placeholder tokens but the images give"):
        ours(input_ids=inputs["input_ids"][:, 1:], pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="patches of 2700 values"):
        ours(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:, :100])
    with pytest.raises(ValueError, match="at most one image per prompt"):
        processor(images=[[photo_like_image(30, 30), photo_like_image(30, 30)]], text=[PROMPT])


def test_loss_ignores_image_positions(fuyu_pair):
    _, _, ours, processor = load(fuyu_pair)
    inputs = processor(images=photo_like_image(60, 60, 7), text=PROMPT)
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        loss = ours(**inputs, labels=labels).loss
        scrambled = labels.masked_fill(labels == ours.config.image_token_id, 5)
        assert torch.equal(loss, ours(**inputs, labels=scrambled).loss)


# ----------------------------------------------------------------------------------------------------------
# Coordinates


@pytest.mark.parametrize(("width", "height"), [(160, 100), (900, 600)], ids=["no-resize", "resized"])
def test_box_and_point_round_trip(fuyu_pair, width, height):
    _, _, _, processor = load(fuyu_pair)
    image = photo_like_image(width, height, 8)
    prompt = "Where is it? <box>20, 40, 80, 120</box> and <point>60, 30</point>\n"
    inputs = processor(images=image, text=prompt)
    scale = float(inputs["image_scale_factors"][0])
    ids = inputs["input_ids"][0].tolist()
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    start = tokens.index("<0x00>")
    assert tokens[start : start + 6] == ["<0x00>", *(str(round(v / 2 * scale)) for v in (20, 40, 80, 120)), "<0x01>"]
    answer = ids[ids.index(processor.tokenizer.bos_token_id) + 1 : -1]
    text = processor.decode_coordinates(answer, scale)
    boxes = [int(v) for v in text.split("<box>")[1].split("</box>")[0].split(", ")]
    point = [int(v) for v in text.split("<point>")[1].split("</point>")[0].split(", ")]
    tolerance = 1 / scale + 1  # one coordinate token is two of the model's pixels
    assert np.abs(np.array(boxes) - [20, 40, 80, 120]).max() <= tolerance
    assert np.abs(np.array(point) - [60, 30]).max() <= tolerance
    assert text.startswith("Where is it?")


def test_answers_are_decoded_after_the_answer_token(fuyu_pair):
    _, _, ours, processor = load(fuyu_pair)
    inputs = processor(images=photo_like_image(60, 60, 9), text=PROMPT)
    generated = ours.generate(**inputs, max_new_tokens=6, do_sample=False)
    answer = processor.post_process_image_text_to_text(generated)[0]
    assert answer == processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    boxes = processor.post_process_box_coordinates(generated, inputs["image_scale_factors"])
    assert len(boxes) == 1 and isinstance(boxes[0], str)


def test_learned_positions_read_each_patchs_place_from_the_placeholder_rows(fuyu_pair):
    """`num_position_embeddings` adds a learned table to the projected patches, resampled to each image's grid. The
    places come from the placeholder rows alone, on a left-padded batch of two sizes; the positions added are the
    table resampled as transformers' own helper resamples Qwen3-VL's (bilinear, corners aligned, raster order)."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    from vlm_patterns.modeling.modeling_fuyu import image_patch_places

    _, converted = fuyu_pair("small-canvas")
    processor = AutoProcessor.from_pretrained(converted)
    inputs = processor(images=[photo_like_image(40, 40, 1), photo_like_image(170, 110, 2)],
                       text=["Hi.\n", "Describe the picture in a few words.\n"])  # fmt: skip
    mask = inputs["input_ids"] == processor.image_token_id
    places, sizes = image_patch_places(inputs["input_ids"], processor.image_token_id, processor.image_newline_token_id)
    grids = inputs["image_patch_grid"]  # (rows, columns) per image
    for i, (rows, columns) in enumerate(grids.tolist()):
        raster = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij"), -1)
        assert torch.equal(places[i][mask[i]], raster.reshape(-1, 2))
        assert (sizes[i][mask[i]] == torch.tensor([rows, columns])).all()

    model = AutoModelForImageTextToText.from_pretrained(converted).eval()
    model.model.add_learned_positions(16)
    with torch.no_grad():
        model.model.vision_pos_embed.weight.copy_(torch.randn(16, model.config.text_config.hidden_size))
        added = model.model.patch_positions(inputs["input_ids"])[mask]
    grid_thw = torch.cat([torch.ones(len(grids), 1, dtype=torch.long), grids], 1)
    indices, weights = get_vision_interpolation_indices_and_weights(grid_thw, 4, "bilinear", align_corners=True)
    expected = (model.model.vision_pos_embed(indices) * weights[..., None]).sum(1)
    assert torch.allclose(added, expected, atol=1e-6)
    captured = {}
    hook = model.model.language_model.layers[0].register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    projected = model.model.vision_embed_tokens(inputs["pixel_values"])
    assert torch.allclose(captured["x"][mask], projected + expected, atol=1e-5)
    assert torch.equal(captured["x"][~mask], model.get_input_embeddings()(inputs["input_ids"])[~mask])
