"""The Flamingo pattern's defining properties, its processor, training helpers and errors, on tiny models."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vlm_patterns.conversion.text_models import transformers_text_config
from vlm_patterns.conversion.tiny import build_idefics_tokenizer, photo_like_image
from vlm_patterns.modeling import FlamingoPatternConfig, FlamingoPatternForConditionalGeneration
from vlm_patterns.modeling.flamingo_visibility import ImageState, track_images
from vlm_patterns.processing import FlamingoPatternImageProcessor, FlamingoPatternProcessor

IMAGE, RESET = 99, 2


def tiny_config(**overrides) -> FlamingoPatternConfig:
    fields = dict(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8,
        ),
        text_config=dict(
            vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=64, pad_token_id=0,
        ),
        num_latents=8, resampler_depth=2, resampler_num_heads=2, resampler_head_dim=16, cross_attn_layer_ids=[0, 2],
        image_token_id=IMAGE, media_reset_token_id=RESET,
    )  # fmt: skip
    fields.update(overrides)
    return FlamingoPatternConfig(**fields)


def tiny_model(open_gates: bool = True, seed: int = 0, **overrides) -> FlamingoPatternForConditionalGeneration:
    torch.manual_seed(seed)
    model = FlamingoPatternForConditionalGeneration(tiny_config(**overrides)).eval()
    if open_gates:
        with torch.no_grad():
            for block in model.model.gated_cross_attn_layers:
                block.alpha_cross_attn.fill_(0.9)
                block.alpha_dense.fill_(-0.7)
    return model


def pixels(images: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randn(1, images, 3, size, size, generator=torch.Generator().manual_seed(seed))


def cross_attention_outputs(model, input_ids, pixel_values) -> torch.Tensor:
    """The first gated block's cross-attention output per token (before its gate), (B, T, D)."""
    captured = []
    block = model.model.gated_cross_attn_layers[0]
    hook = block.cross_attn.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, pixel_values=pixel_values)
    finally:
        hook.remove()
    return captured[0]


def test_closed_gates_give_the_bare_language_model():
    """A new model (gates at 0) is exactly its language model: checked against transformers' Llama."""
    model = tiny_model(open_gates=False)
    assert all(
        b.alpha_cross_attn.count_nonzero() == 0 and b.alpha_dense.count_nonzero() == 0
        for b in model.model.gated_cross_attn_layers
    )
    text = model.config.text_config
    llama = LlamaForCausalLM(transformers_text_config(text, "llama", tie_word_embeddings=False)).eval()
    state = {k.replace("model.language_model.", "model."): v for k, v in model.state_dict().items()
             if k.startswith("model.language_model.") or k == "lm_head.weight"}  # fmt: skip
    llama.load_state_dict(state, strict=True)
    assert isinstance(llama.config, LlamaConfig)
    input_ids = torch.tensor([[1, 5, IMAGE, 7, 8, 9, IMAGE, 10, 11]])
    with torch.no_grad():
        ours = model(input_ids=input_ids, pixel_values=pixels(2, seed=1)).logits
        reference = llama(input_ids=input_ids).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_text_before_the_first_image_ignores_the_pixels():
    model = tiny_model()
    input_ids = torch.tensor([[1, 5, 6, 7, IMAGE, 8, 9, 10]])
    with torch.no_grad():
        a = model(input_ids=input_ids, pixel_values=pixels(1, seed=1)).logits
        b = model(input_ids=input_ids, pixel_values=pixels(1, seed=2)).logits
    assert torch.equal(a[:, :4], b[:, :4])
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3  # and the pixels do matter from the image on


def test_tokens_before_any_image_get_no_visual_contribution():
    """Zeroed, not a uniform average over all images (the IDEFICS bug transformers#26428): what the first block
    adds to those tokens is its feed-forward branch alone."""
    model = tiny_model()
    block = model.model.gated_cross_attn_layers[0]
    captured = []
    hook = block.register_forward_hook(lambda module, args, out: captured.append((args[0], out)))
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 6, IMAGE, 8]]), pixel_values=pixels(1, seed=3))
        hook.remove()
        block_in, block_out = captured[0]
        dense = torch.tanh(block.alpha_dense) * block.mlp(block.post_attention_layernorm(block_in))
    from_attention = block_out - block_in - dense
    assert from_attention[0, :3].abs().max() < 1e-6  # float rounding of (x + a + b) - x - b only
    assert from_attention[0, 3:].abs().max() > 1e-2


def test_a_token_after_image_two_does_not_see_image_one():
    model = tiny_model()
    input_ids = torch.tensor([[1, IMAGE, 5, 6, IMAGE, 7, 8]])
    first, second = pixels(2, seed=4), pixels(2, seed=4).clone()
    second[:, 0] = pixels(1, seed=5)[:, 0]  # change image 1 only
    a = cross_attention_outputs(model, input_ids, first)
    b = cross_attention_outputs(model, input_ids, second)
    assert torch.equal(a[:, 4:], b[:, 4:])  # from the second <image> on: only image 2 is read
    assert (a[:, 1:4] - b[:, 1:4]).abs().min() > 0  # between the images: image 1 is read


@pytest.mark.parametrize(
    ("image_size", "num_latents"), [(32, 8), (64, 8), (48, 96)], ids=["16-patches", "64-patches", "internvl-96"]
)
def test_visual_tokens_are_the_latents_whatever_the_image(image_size, num_latents):
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8)  # fmt: skip
    model = tiny_model(vision_config=vision, num_latents=num_latents)
    features = model.get_image_features(pixels(3, seed=6, size=image_size))
    assert features.shape == (1, 3, num_latents, 32)
    assert model.config.num_visual_tokens == num_latents


def test_image_rule_continues_across_calls_and_resets_after_the_end_token():
    ids = torch.tensor([[1, IMAGE, 5, RESET, 6, IMAGE, 7, IMAGE, 8, RESET, 9]])
    expected = [-1, 0, 0, 0, -1, 1, 1, 2, 2, 2, -1]
    state = ImageState.start(1, torch.tensor([3]), "cpu")
    whole, _ = track_images(ids, IMAGE, RESET, state)
    assert whole[0].tolist() == expected
    pieces, state = [], ImageState.start(1, torch.tensor([3]), "cpu")
    for chunk in (ids[:, :3], ids[:, 3:4], ids[:, 4:8], ids[:, 8:]):  # prefill in pieces, then token by token
        index, state = track_images(chunk, IMAGE, RESET, state)
        pieces += index[0].tolist()
    assert pieces == expected
    no_reset, _ = track_images(ids, IMAGE, None, ImageState.start(1, torch.tensor([3]), "cpu"))
    assert no_reset[0].tolist() == [-1, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2]  # OpenFlamingo: no reset


def test_generated_image_tokens_beyond_the_images_read_as_text():
    state = ImageState.start(1, torch.tensor([1]), "cpu")
    index, state = track_images(torch.tensor([[IMAGE, 5, IMAGE, 6]]), IMAGE, RESET, state)
    assert index[0].tolist() == [0, 0, 0, 0]


def test_variants_are_config_fields():
    """IDEFICS and OpenFlamingo differ by fields, and both run: OpenFlamingo's LayerNorm + GELU blocks with
    8 x 64 heads, blocks at (i + 1) % n == 0, patch tokens only, no reset token."""
    open_flamingo = tiny_model(
        vision_feature_select_strategy="default", resampler_qk_norm=False, resampler_hidden_act="gelu",
        cross_attn_layer_ids=[1, 3], cross_attn_num_heads=8, cross_attn_head_dim=8, cross_attn_norm_type="layernorm",
        cross_attn_norm_eps=1e-5, cross_attn_qk_norm=False, cross_attn_mlp_type="plain", cross_attn_hidden_act="gelu",
        cross_attn_intermediate_size=256, media_reset_token_id=None,
    )  # fmt: skip
    block = open_flamingo.model.gated_cross_attn_layers[0]
    assert isinstance(block.input_layernorm, torch.nn.LayerNorm) and not hasattr(block.mlp, "gate_proj")
    assert block.cross_attn.q_proj.out_features == 64 and not hasattr(block.cross_attn, "q_layer_norm")
    assert open_flamingo.model.block_before_layer == {1: 0, 3: 1}
    with torch.no_grad():
        out = open_flamingo(input_ids=torch.tensor([[1, IMAGE, 5, RESET, 6]]), pixel_values=pixels(1, seed=7))
    assert torch.isfinite(out.logits).all()


def test_cache_holds_the_image_keys_and_values():
    """Decode steps read the images' keys/values from the cache: the vision tower runs once."""
    model = tiny_model()
    calls = []
    hook = model.model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    input_ids = torch.tensor([[1, IMAGE, 5, 6]])
    generated = model.generate(input_ids=input_ids, pixel_values=pixels(1, seed=8), max_new_tokens=5, do_sample=False)
    hook.remove()
    assert len(calls) == 1 and generated.shape[1] == 9
    with torch.no_grad():  # the cached continuation equals recomputing everything
        full = model(input_ids=generated, pixel_values=pixels(1, seed=8)).logits
    assert torch.equal(full[0, 3:-1].argmax(-1), generated[0, 4:])


def test_static_cache_generates_the_same_tokens():
    """The image entries must not turn a static cache dynamic (its text layers then need fixed-length masks)."""
    model = tiny_model()
    input_ids = torch.tensor([[1, IMAGE, 5, 6, 2, 7, IMAGE, 8]])
    options = dict(input_ids=input_ids, pixel_values=pixels(2, seed=10), max_new_tokens=8, do_sample=False)
    expected = model.generate(**options)
    assert torch.equal(model.generate(**options, cache_implementation="static"), expected)


def test_generated_image_tokens_read_as_text_with_and_without_cache():
    """A model may generate `<image>` itself; that token has no image. Without a cache each step re-reads the
    prompt and the continuation, which must not trip the prompt's token/image count check."""
    model = tiny_model()
    with torch.no_grad():  # make <image> the likeliest next token
        model.lm_head.weight[IMAGE] += 5 * model.lm_head.weight.abs().max()
    options = dict(input_ids=torch.tensor([[1, IMAGE, 5, 6]]), pixel_values=pixels(1, seed=8), max_new_tokens=6)
    cached = model.generate(**options, do_sample=False)
    assert (cached[0, 4:] == IMAGE).sum() >= 2
    assert torch.equal(model.generate(**options, do_sample=False, use_cache=False), cached)


def test_beam_search_and_several_sequences_follow_the_images():
    model = tiny_model()
    input_ids = torch.tensor([[1, IMAGE, 5, 6], [1, 7, IMAGE, 8]])
    options = dict(input_ids=input_ids, pixel_values=pixels(1, seed=11).expand(2, -1, -1, -1, -1), max_new_tokens=5)
    beams = model.generate(**options, num_beams=3, do_sample=False)
    for row in range(2):  # each row alone: beams are reordered together with the images' keys and values
        alone = model.generate(
            **{
                **options,
                "input_ids": input_ids[row : row + 1],
                "pixel_values": options["pixel_values"][row : row + 1],
            },
            num_beams=3,
            do_sample=False,
        )
        assert torch.equal(alone[0], beams[row])  # fmt: skip
    samples = model.generate(**options, do_sample=True, num_return_sequences=2, top_k=5)
    assert samples.shape == (4, 9)


def test_freeze_backbones_trains_only_the_new_parts():
    model = tiny_model().train()
    trainable = model.freeze_backbones()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("model.perceiver_resampler.", "model.gated_cross_attn_layers.")) for n in names)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    input_ids = torch.tensor([[1, IMAGE, 5, 6, 7]])
    loss = model(input_ids=input_ids, pixel_values=pixels(1, seed=9), labels=input_ids).loss
    loss.backward()
    assert model.model.gated_cross_attn_layers[0].alpha_cross_attn.grad.abs().item() > 0
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad is None
    embeddings_too = tiny_model().freeze_backbones(train_embeddings=True)
    assert embeddings_too == trainable + 100 * 64


def test_gates_start_closed_in_a_new_model():
    model = FlamingoPatternForConditionalGeneration(tiny_config())
    assert all(torch.count_nonzero(b.alpha_cross_attn) == 0 for b in model.model.gated_cross_attn_layers)


@pytest.mark.parametrize(
    ("input_ids", "pixel_values", "message"),
    [
        ([[1, IMAGE, 5]], None, "no pixel_values"),
        ([[1, IMAGE, 5, IMAGE]], pixels(1, seed=0), "<image> tokens per row"),
        ([[1, 5, 6]], pixels(1, seed=0), "<image> tokens per row"),
        ([[1, IMAGE, 5]], torch.randn(1, 3, 32, 32), "pixel_values must have shape"),
        ([[1, IMAGE] + [5] * 70], pixels(1, seed=0), "max_position_embeddings"),
    ],
    ids=["image-token-without-pixels", "more-tokens-than-images", "more-images-than-tokens", "4d-pixels", "too-long"],
)
def test_clear_errors(input_ids, pixel_values, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model(input_ids=torch.tensor(input_ids), pixel_values=pixel_values)


def test_inputs_embeds_need_an_explicit_image_attention():
    model = tiny_model()
    embeds = model.get_input_embeddings()(torch.tensor([[1, IMAGE, 5]]))
    with pytest.raises(ValueError, match="image_attention_mask"):
        model(inputs_embeds=embeds, pixel_values=pixels(1, seed=0))
    explicit = torch.tensor([[[0], [1], [1]]])
    with torch.no_grad():
        from_embeds = model(inputs_embeds=embeds, pixel_values=pixels(1, seed=0), image_attention_mask=explicit).logits
        from_ids = model(input_ids=torch.tensor([[1, IMAGE, 5]]), pixel_values=pixels(1, seed=0)).logits
    torch.testing.assert_close(from_embeds, from_ids)


# ---------------------------------------------------------------------------------------------------------
# Processor


@pytest.fixture(scope="module")
def idefics_processor():
    tokenizer = build_idefics_tokenizer(end_of_utterance=True)
    return FlamingoPatternProcessor(
        image_processor=FlamingoPatternImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer, fake_image_token="<fake_token_around_image>", bos_as_text=True,
    )  # fmt: skip


def test_fake_tokens_wrap_each_run_of_images(idefics_processor):
    """As IdeficsProcessor does with its (text, image, ...) lists: text pieces lose their outer spaces, adjacent
    images share fake tokens, and images separated by (blank) text get their own."""
    fake = "<fake_token_around_image>"
    expand = idefics_processor.expand_text
    assert expand("User: <image><image>Which? <image>Done ") == (
        f"User:{fake}<image>{fake}<image>{fake}Which?{fake}<image>{fake}Done"
    )
    assert expand("<image> <image>") == f"{fake}<image>{fake}{fake}<image>{fake}"


def test_pixel_values_are_padded_per_row_with_a_mask(idefics_processor):
    rows = [[photo_like_image(50, 40, 1), photo_like_image(40, 50, 2)], [], [photo_like_image(64, 64, 3)]]
    out = idefics_processor(images=rows, text=["<image>a<image>b", "no image", "<image>c"])
    assert out["pixel_values"].shape == (3, 2, 3, 32, 32)
    assert out["image_mask"].tolist() == [[True, True], [False, False], [True, False]]
    assert out["pixel_values"][1].abs().sum() == 0 and out["pixel_values"][2, 1].abs().sum() == 0
    flat = idefics_processor(images=rows[0] + rows[2], text=["<image>a<image>b", "no image", "<image>c"])
    assert torch.equal(flat["pixel_values"], out["pixel_values"])
    bos = idefics_processor.tokenizer.bos_token_id
    first_real = out["attention_mask"].argmax(-1)
    assert all(out["input_ids"][i, first_real[i]] == bos for i in range(3))  # left-padded, <s> first
    assert out["attention_mask"][:, -1].all()


def test_image_count_mismatches_are_refused(idefics_processor):
    image = photo_like_image(40, 40, 1)
    with pytest.raises(ValueError, match="1 <image> tokens but 2 images"):
        idefics_processor(images=[image, image], text="<image>one")
    with pytest.raises(ValueError, match="Prompt 1 has 0"):
        idefics_processor(images=[[image], [image]], text=["<image>a", "b"])


def test_few_shot_prompt_and_inputs(idefics_processor):
    examples = [(photo_like_image(40, 40, i), f"Output: shape {i}.") for i in range(2)]
    prompt = idefics_processor.few_shot_prompt([t for _, t in examples], "Output:")
    assert prompt == "<image>Output: shape 0.\n<image>Output: shape 1.\n<image>Output:"
    out = idefics_processor.few_shot(examples, photo_like_image(40, 40, 9), "Output:")
    assert out["pixel_values"].shape == (1, 3, 3, 32, 32)
    chunked = FlamingoPatternProcessor(
        image_processor=idefics_processor.image_processor, tokenizer=build_open_flamingo_tokenizer(),
        end_of_chunk_token="<|endofchunk|>",
    )  # fmt: skip
    assert chunked.few_shot_prompt(["A cat."], "") == "<image>A cat.<|endofchunk|><image>"


def build_open_flamingo_tokenizer():
    from vlm_patterns.conversion.tiny import build_tokenizer

    tokenizer = build_tokenizer(special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"], "pad_token": "<PAD>"})
    return tokenizer


def test_chat_template_places_images_and_end_of_utterance():
    from vlm_patterns.conversion.idefics import END_OF_UTTERANCE
    from vlm_patterns.processing.processing_flamingo import flamingo_chat_template

    tokenizer = build_idefics_tokenizer(end_of_utterance=True)
    processor = FlamingoPatternProcessor(
        image_processor=FlamingoPatternImageProcessor(), tokenizer=tokenizer,
        fake_image_token="<fake_token_around_image>", bos_as_text=True,
        chat_template=flamingo_chat_template(END_OF_UTTERANCE),
    )  # fmt: skip
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
        {"role": "user", "content": "And now?"},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == (
        "User: What is this?<image><end_of_utterance>\nAssistant: A dog.<end_of_utterance>\n"
        "User: And now?<end_of_utterance>\nAssistant:"
    )


def test_processor_save_and_load_round_trip(idefics_processor, tmp_path):
    idefics_processor.save_pretrained(tmp_path)
    loaded = FlamingoPatternProcessor.from_pretrained(tmp_path)
    assert (loaded.fake_image_token, loaded.bos_as_text, loaded.end_of_chunk_token) == (
        "<fake_token_around_image>", True, None)  # fmt: skip
    assert loaded.image_processor.size == {"height": 32, "width": 32}
    image = photo_like_image(40, 30, 4)
    a = idefics_processor(images=image, text="<image>hi")
    b = loaded(images=image, text="<image>hi")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
