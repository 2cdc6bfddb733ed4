"""The projection pattern's own properties, and generation behaviour, on a converted tiny LLaVA."""

import threading

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, AutoProcessor, TextIteratorStreamer

from vlm_patterns.conversion.tiny import photo_like_image


@pytest.fixture(scope="module")
def llava(llava_pair):
    _, converted = llava_pair("layer-2-default")
    return AutoModelForImageTextToText.from_pretrained(converted).eval(), AutoProcessor.from_pretrained(converted)


def prompt(question: str, images: int = 1) -> str:
    return "USER: " + "<image>\n" * images + question + " ASSISTANT:"


def test_image_features_replace_exactly_the_placeholders(llava):
    """The defining property: text embeddings stay, placeholder embeddings become projected ViT features."""
    model, processor = llava
    inputs = processor(images=photo_like_image(80, 60), text=prompt("What is it?"))
    captured = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, args: captured.update(embeds=args[0]))
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    placeholders = inputs["input_ids"][0] == model.config.image_token_id
    text_embeds = model.get_input_embeddings()(inputs["input_ids"])[0]
    features = model.get_image_features(inputs["pixel_values"])[0]
    assert torch.equal(captured["embeds"][0, ~placeholders], text_embeds[~placeholders])
    assert torch.equal(captured["embeds"][0, placeholders], features)
    assert features.shape[0] == model.config.image_seq_length == processor.image_seq_length


def test_vision_tower_stops_at_the_selected_layer(llava):
    model, processor = llava
    calls = []
    hooks = [
        layer.register_forward_hook(lambda *a: calls.append(1)) for layer in model.model.vision_tower.encoder.layers
    ]
    model.get_image_features(processor.image_processor(photo_like_image(40, 40))["pixel_values"])
    for hook in hooks:
        hook.remove()
    # Layer -2 of a 3-layer tower is the output of layer 2: the last layer is never run.
    assert len(calls) == model.config.vision_config.num_hidden_layers - 1


def test_placeholder_feature_count_mismatch_raises(llava):
    model, processor = llava
    inputs = processor(images=photo_like_image(50, 50), text=prompt("Hi"))
    ids = inputs["input_ids"].clone()
    first = (ids[0] == model.config.image_token_id).nonzero()[0, 0]
    ids[0, first] = processor.tokenizer.convert_tokens_to_ids("A")
    with pytest.raises(ValueError, match="image placeholder tokens but the images give"):
        model(input_ids=ids, pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="image placeholder tokens but the images give"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"].repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=inputs["input_ids"])


def test_wrong_pixel_shape_and_too_long_prompts_raise(llava):
    model, processor = llava
    inputs = processor(images=photo_like_image(50, 50), text=prompt("Hi"))
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][0])
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(input_ids=inputs["input_ids"], pixel_values=F.interpolate(inputs["pixel_values"], size=(16, 16)))
    too_long = torch.ones(1, model.config.text_config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=too_long)


def test_inputs_embeds_give_the_same_logits_as_input_ids(llava):
    model, processor = llava
    inputs = processor(images=photo_like_image(70, 50), text=prompt("Describe it."))
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        from_ids = model(**inputs).logits
        from_embeds = model(
            inputs_embeds=embeds, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"]
        ).logits
    assert torch.allclose(from_ids, from_embeds, atol=1e-6)


def test_loss_ignores_image_positions(llava):
    model, processor = llava
    inputs = processor(images=photo_like_image(70, 50), text=prompt("Describe it.") + " A red circle.")
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        placeholders = labels == model.config.image_token_id
        scrambled = labels.masked_fill(placeholders, 7)  # targets at image positions must not matter
        assert torch.equal(out.loss, model(**inputs, labels=scrambled).loss)
    targets = labels.masked_fill(placeholders, -100)[:, 1:]
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_loss_trains_the_projector(llava):
    model, processor = llava
    inputs = processor(images=photo_like_image(70, 50), text=prompt("Describe it.") + " A red circle.")
    model.zero_grad()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_cache_on_and_off_give_the_same_tokens(llava):
    model, processor = llava
    inputs = processor(images=photo_like_image(90, 70, seed=2), text=prompt("What is in the image?"))
    cached = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_padded_batch_equals_one_by_one(llava):
    model, processor = llava
    images = [photo_like_image(60, 60, seed=1), photo_like_image(100, 40, seed=2), photo_like_image(40, 90, seed=3)]
    prompts = [prompt("Hi"), prompt("Which shapes are there, and where?"), prompt("Colour?")]
    batch = processor(images=images, text=prompts, padding_side="left")
    batched = model.generate(**batch, max_new_tokens=10, do_sample=False)[:, batch["input_ids"].shape[1] :]
    for i, (image, text) in enumerate(zip(images, prompts, strict=True)):
        single = processor(images=image, text=text)
        alone = model.generate(**single, max_new_tokens=10, do_sample=False)[:, single["input_ids"].shape[1] :]
        assert torch.equal(batched[i], alone[0]), i


def test_streaming_yields_the_generated_text(llava):
    model, processor = llava
    inputs = processor(images=photo_like_image(90, 70), text=prompt("Describe it."))
    expected = model.generate(**inputs, max_new_tokens=15, do_sample=False)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(
        target=model.generate, kwargs=dict(**inputs, max_new_tokens=15, do_sample=False, streamer=streamer)
    )
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == processor.decode(expected[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_sampling_options_pass_through(llava):
    model, processor = llava
    inputs = processor(images=photo_like_image(90, 70), text=prompt("Describe it."))
    sample = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.9)
    torch.manual_seed(0)
    first = model.generate(**inputs, **sample)
    torch.manual_seed(0)
    assert torch.equal(first, model.generate(**inputs, **sample))
    greedy = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    draws = []
    for seed in range(4):
        torch.manual_seed(seed)
        draws.append(model.generate(**inputs, **sample))
    assert any(not torch.equal(draw, greedy) for draw in draws)  # temperature 1.5 does change the tokens


def test_eager_and_sdpa_agree(llava):
    model, processor = llava
    inputs = processor(images=photo_like_image(90, 70), text=prompt("Describe it."))
    with torch.no_grad():
        sdpa = model(**inputs).logits
        model.set_attn_implementation("eager")
        assert model.config.text_config._attn_implementation == "eager"
        assert model.config.vision_config._attn_implementation == "eager"
        eager = model(**inputs).logits
        model.set_attn_implementation("sdpa")
    assert torch.allclose(sdpa, eager, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(llava):
    model, processor = llava
    inputs = processor(images=photo_like_image(70, 50), text=prompt("Describe it.") + " A red circle.")
    model.train()
    try:
        model.zero_grad()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        plain = model.model.multi_modal_projector.linear_1.weight.grad.clone()
        model.activation_checkpointing_enable()
        assert all(layer.gradient_checkpointing for layer in model.model.language_model.layers)
        model.zero_grad()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        assert torch.allclose(plain, model.model.multi_modal_projector.linear_1.weight.grad, atol=1e-6)
    finally:
        model.activation_checkpointing_disable()
        model.zero_grad()
        model.eval()
