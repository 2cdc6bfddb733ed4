"""The native-resolution pattern's own properties: M-RoPE, block-diagonal vision attention, stateless generation."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2Config, Qwen2ForCausalLM

from vlm_patterns.conversion.tiny import photo_like_image
from vlm_patterns.modeling.modeling_qwen2_vl import get_rope_index
from vlm_patterns.processing import ImageInputError, Qwen2VLPatternImageProcessor
from vlm_patterns.processing.image_processing_qwen2_vl import smart_resize


@pytest.fixture(scope="module")
def qwen(qwen2_vl_pair):
    _, converted = qwen2_vl_pair("hub-tied")
    return AutoModelForImageTextToText.from_pretrained(converted).eval(), AutoProcessor.from_pretrained(converted)


def chat(processor, *items, question="What is in the picture?"):
    content = [{"type": kind} for kind in items] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def test_rope_index_worked_example():
    """The docstring's example: two text tokens, a 1 x 4 x 6 patch grid (1 x 2 x 3 merged tokens), one text token."""
    image = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    positions, deltas = get_rope_index(image, torch.zeros_like(image), torch.tensor([[1, 4, 6]]), None, None, 2)
    assert positions[:, 0].tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5],
        [0, 1, 2, 2, 2, 3, 3, 3, 5],
        [0, 1, 2, 3, 4, 2, 3, 4, 5],
    ]
    assert deltas.tolist() == [[-3]]
    # Left padding is skipped: the real tokens get the same positions, the pads 0.
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.bool), image], 1)
    mask = torch.tensor([[0, 0] + [1] * 9])
    positions_padded, _ = get_rope_index(padded, torch.zeros_like(padded), torch.tensor([[1, 4, 6]]), None, mask, 2)
    assert torch.equal(positions_padded[:, :, 2:], positions) and positions_padded[:, :, :2].eq(0).all()
    with pytest.raises(ValueError, match="more image placeholders than grids"):
        get_rope_index(image, torch.zeros_like(image), None, None, None, 2)
    with pytest.raises(ValueError, match="does not match its grid"):
        get_rope_index(image, torch.zeros_like(image), torch.tensor([[1, 4, 8]]), None, None, 2)


def test_text_after_a_long_video_starts_after_its_last_frame():
    """The text after a vision run resumes at p + max(t, h/m, w/m), as Qwen2-VL's release computes it. (transformers
    5.24 resumes at p + max(h/m, w/m), which overlaps a video with more temporal steps than rows or columns.)"""
    video = torch.tensor([[0, 0] + [1] * 16 + [0]], dtype=torch.bool)
    positions, _ = get_rope_index(torch.zeros_like(video), video, None, torch.tensor([[4, 4, 4]]), None, 2)
    assert positions[:, 0, 17].tolist() == [5, 3, 3]  # the last video token: time 2 + 3, row and column 2 + 1
    assert positions[:, 0, 18].tolist() == [6, 6, 6]  # the text after it: 2 + max(4, 2, 2)


def test_text_only_mrope_equals_plain_rope(qwen):
    """Without images the three position axes are equal, and M-RoPE is 1D RoPE: a plain Qwen2 with the same
    weights gives the same logits."""
    model, processor = qwen
    text = model.config.text_config
    qwen2 = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=text.num_key_value_heads,
            rms_norm_eps=text.norm_eps,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": text.rope_theta},
        )  # fmt: skip
    ).eval()
    state = {
        k.removeprefix("model.language_model."): v
        for k, v in model.state_dict().items()
        if k.startswith("model.language_model.")
    }
    qwen2.model.load_state_dict(state)
    qwen2.tie_weights()
    inputs = processor(text=chat(processor, question="Tell me a story about a red circle."))
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, qwen2(**inputs).logits, atol=1e-5)


def test_each_image_attends_only_to_itself(qwen):
    """Block-diagonal vision attention: an image's features do not change when other images share the batch."""
    model, processor = qwen
    images = [photo_like_image(120, 90, 1), photo_like_image(60, 200, 2), photo_like_image(120, 90, 3)]
    together = processor.image_processor(images)
    alone = processor.image_processor(images[1])
    with torch.no_grad():
        packed = model.get_image_features(together["pixel_values"], together["image_grid_thw"])
        single = model.get_image_features(alone["pixel_values"], alone["image_grid_thw"])
    counts = [processor.image_processor.tokens_per_grid(g) for g in together["image_grid_thw"]]
    assert torch.allclose(packed[counts[0] : counts[0] + counts[1]], single, atol=1e-5)


def test_generate_is_stateless(qwen):
    """Nothing is kept between calls: a call after other prompts gives what a fresh model gives."""
    model, processor = qwen
    first = processor(images=photo_like_image(150, 100, 7), text=chat(processor, "image"))
    other = processor(
        images=[photo_like_image(60, 60, 8)] * 2, text=chat(processor, "image", "image", question="Same?")
    )
    options = dict(max_new_tokens=8, do_sample=False)
    before = model.generate(**first, **options)
    model.generate(**other, **options)
    model.generate(**processor(text=chat(processor, question="Only text.")), **options)
    assert torch.equal(model.generate(**first, **options), before)
    assert not any(isinstance(v, torch.Tensor) and "rope" in k for k, v in vars(model.model).items())


def test_cache_on_and_off_and_manual_decoding_agree(qwen):
    model, processor = qwen
    inputs = processor(images=photo_like_image(150, 100, 9), text=chat(processor, "image"))
    cached = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(cached, model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False))
    # Outside generate: the prefill returns rope_deltas, which continue the positions from the cache.
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        tokens, cache, mask = [out.logits[:, -1].argmax(-1)], out.cache, inputs["attention_mask"]
        for _ in range(7):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = model(input_ids=tokens[-1][:, None], attention_mask=mask, cache=cache, rope_deltas=out.rope_deltas)
            tokens.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(torch.stack(tokens, 1), cached[:, inputs["input_ids"].shape[1] :])
    with pytest.raises(ValueError, match="rope_deltas"):
        model(input_ids=tokens[-1][:, None], cache=cache)


def test_count_mismatches_raise(qwen):
    model, processor = qwen
    inputs = processor(images=photo_like_image(100, 100, 1), text=chat(processor, "image"))
    ids = inputs["input_ids"]
    first = int((ids[0] == model.config.image_token_id).nonzero()[0])
    one_fewer = torch.cat([ids[:, :first], ids[:, first + 1 :]], 1)
    with pytest.raises(ValueError, match="image placeholder tokens but the images give"):
        model(input_ids=one_fewer, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="grid_thw describes"):
        model(**{**inputs, "image_grid_thw": inputs["image_grid_thw"] * torch.tensor([[1, 2, 1]])})
    with pytest.raises(ValueError, match="no pixel values"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="1 <\\|image_pad\\|> placeholders but 2 images"):
        processor(images=[photo_like_image(50, 50)] * 2, text=chat(processor, "image"))


def test_loss_ignores_image_positions(qwen):
    model, processor = qwen
    inputs = processor(images=photo_like_image(100, 100, 1), text=chat(processor, "image") + "A red circle.")
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
        scrambled = labels.masked_fill(labels == model.config.image_token_id, 3)
        assert torch.equal(loss, model(**inputs, labels=scrambled).loss)


# ----------------------------------------------------------------------------------------------------------
# Processing


@pytest.mark.parametrize(
    ("height", "width"), [(1080, 1920), (28, 28), (10, 1000), (4000, 3000), (333, 517), (56, 5600)]
)
def test_smart_resize_matches_transformers(height, width):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    for budget in [(56 * 56, 28 * 28 * 1280), (28 * 28 * 4, 28 * 28 * 64)]:
        assert smart_resize(height, width, 28, *budget) == reference(height, width, 28, *budget)


def test_images_beyond_the_budget_are_resized_within_it():
    processor = Qwen2VLPatternImageProcessor(max_pixels=28 * 28 * 256)
    out = processor(photo_like_image(1920, 1080, 1))
    ((t, h, w),) = out["image_grid_thw"].tolist()
    assert t == 1 and h * w * 14 * 14 <= 28 * 28 * 256 and processor.tokens_per_grid([t, h, w]) <= 256
    bigger = processor(photo_like_image(1920, 1080, 1), max_pixels=28 * 28 * 1024)["image_grid_thw"]
    assert bigger.prod() > out["image_grid_thw"].prod()  # per-call budgets apply
    assert processor.max_pixels == 28 * 28 * 256  # and do not stick


def test_bad_images_raise_clear_errors(tmp_path):
    processor = Qwen2VLPatternImageProcessor()
    with pytest.raises(ValueError, match="aspect ratio 250 is above 200"):
        processor(photo_like_image(2500, 10))
    with pytest.raises(ImageInputError, match="no pixels"):
        processor(torch.zeros(3, 0, 5, dtype=torch.uint8))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ImageInputError, match="not a readable image"):
        processor(str(corrupt))


def test_video_frames_fill_temporal_slots_in_order():
    """Frame 2k goes to the first temporal half of each patch, frame 2k + 1 to the second."""
    processor = Qwen2VLPatternImageProcessor(do_normalize=False, do_rescale=False)
    frames = [torch.full((3, 56, 56), value, dtype=torch.uint8) for value in (10, 20, 30, 40)]
    out = processor(videos=frames, min_pixels=56 * 56, max_pixels=56 * 56)
    patches = out["pixel_values_videos"].view(-1, 3, 2, 14 * 14)  # (patches, C, T, P*P)
    assert out["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert patches[:16, :, 0].eq(10).all() and patches[:16, :, 1].eq(20).all()
    assert patches[16:, :, 0].eq(30).all() and patches[16:, :, 1].eq(40).all()


def test_learned_positions_resample_as_qwen3_vl():
    """`num_position_embeddings` is Qwen3-VL's learned positions: the same table, resampled to grids smaller and
    larger than its side, of several frames, gives each patch what transformers' Qwen3-VL vision model adds to it."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    from vlm_patterns.modeling.configuration_qwen2_vl import Qwen2VLVisionTowerConfig
    from vlm_patterns.modeling.qwen2_vl_vision import Qwen2VLVisionTower

    shape = dict(depth=1, num_heads=2, out_hidden_size=16, patch_size=14, num_position_embeddings=16)
    reference = Qwen3VLVisionModel(
        Qwen3VLVisionConfig(hidden_size=32, intermediate_size=64, deepstack_visual_indexes=[], **shape)
    ).eval()
    reference.config._attn_implementation = "sdpa"
    tower = Qwen2VLVisionTower(Qwen2VLVisionTowerConfig(embed_dim=32, **shape)).eval()
    with torch.no_grad():
        tower.pos_embed.weight.copy_(torch.randn(16, 32))
        reference.pos_embed.weight.copy_(tower.pos_embed.weight)
        tower.patch_embed.proj.weight.zero_()  # the embeddings are then the positions alone
    reference.patch_embed.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    added = []
    reference.blocks[0].register_forward_pre_hook(lambda module, args: added.append(args[0]))
    grids = torch.tensor([[1, 4, 6], [2, 2, 2], [1, 10, 4], [1, 4, 4]])  # the last: the table's own size
    pixels = torch.randn(int(grids.prod(-1).sum()), tower.config.patch_dim)
    with torch.no_grad():
        reference(pixels, grid_thw=grids)
        ours = tower.embed(pixels, tower.layout(pixels, grids))
    assert torch.allclose(ours, added[0], atol=1e-6)
    corners = ours[-16:].view(2, 2, 2, 2, 32).permute(0, 2, 1, 3, 4).reshape(16, 32)  # raster order
    assert torch.allclose(corners, tower.pos_embed.weight)  # a grid the table's size reads it as it is
    with pytest.raises(StrictDataclassError, match="num_position_embeddings must be 0"):
        Qwen2VLVisionTowerConfig(num_position_embeddings=12)
