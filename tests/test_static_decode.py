"""The static decode path (`generate(..., static_decode=True)`) gives transformers' greedy tokens for every family:
batch 1 and left-padded batches, with and without images, on checkpoints converted from the public layouts and on
the shipped ones; its sampling filters are transformers'; its buffers are reused by shape."""

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TextIteratorStreamer,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlm_patterns.conversion.tiny import photo_like_image
from vlm_patterns.inference import NOT_MODEL_INPUTS, build_inputs
from vlm_patterns.modeling.static_generation import DecoderPool, Sampling, bucket_length

GREEDY = dict(max_new_tokens=12, do_sample=False)


def converted(request, family: str):
    fixture = {"llava": "llava_pair", "qwen2_vl": "qwen2_vl_pair", "fuyu": "fuyu_pair", "flamingo": "idefics_pair"}
    _, folder = request.getfixturevalue(fixture[family])()
    return AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def model_inputs(processor, images, prompt) -> dict:
    return {k: v for k, v in dict(build_inputs(processor, images, prompt)).items() if k not in NOT_MODEL_INPUTS}


def same_tokens(model, inputs, **options) -> torch.Tensor:
    with torch.inference_mode():
        expected = model.generate(**inputs, **options)
        ours = model.generate(**inputs, **options, static_decode=True)
    assert torch.equal(expected, ours), (expected.tolist(), ours.tolist())
    return ours


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "fuyu", "flamingo"])
def test_greedy_tokens_match_generate_on_converted_checkpoints(request, family):
    model, processor = converted(request, family)
    image = photo_like_image(72, 56, seed=3)
    with_image = same_tokens(model, model_inputs(processor, [image], "Describe the picture."), **GREEDY)
    assert with_image.shape[1] > model_inputs(processor, [image], "Describe the picture.")["input_ids"].shape[1]
    same_tokens(model, model_inputs(processor, [], "Say something."), **GREEDY)
    # Exactly N tokens (EOS held back), the longer loop a benchmark runs.
    same_tokens(model, model_inputs(processor, [image], "Describe."), max_new_tokens=20, min_new_tokens=20)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "fuyu", "flamingo"])
def test_greedy_tokens_match_generate_on_left_padded_batches(request, family):
    model, processor = converted(request, family)
    questions = ["What is it?", "Where is the red thing in this picture, and what is beside it?"]
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in questions
    ]
    images = [photo_like_image(64, 48, seed=5), photo_like_image(40, 80, seed=6)]
    batch_images = images if family == "fuyu" else [[image] for image in images]
    inputs = dict(processor(images=batch_images, text=prompts, padding_side="left"))
    inputs = {k: v for k, v in inputs.items() if k not in NOT_MODEL_INPUTS}
    assert (inputs["attention_mask"] == 0).any(), "the batch must be padded"
    same_tokens(model, inputs, **GREEDY)


@pytest.mark.parametrize("step_mode", ["eager", "compiled"])
def test_rows_that_finish_early_pad_as_in_generate(request, step_mode):
    """The token one row generates third is made an EOS id: that row finishes and pads while the other goes on,
    as transformers' loop does; the greedy step chooses the tokens, pads and tracks finished rows itself."""
    model, processor = converted(request, "llava")
    images = [[photo_like_image(64, 48, seed=5)], [photo_like_image(40, 80, seed=6)]]
    prompts = ["<image>What is it?", "<image>Where is the red thing in this picture?"]
    inputs = {k: v for k, v in dict(processor(images=images, text=prompts, padding_side="left")).items()
              if k not in NOT_MODEL_INPUTS}  # fmt: skip
    prompt_length = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        free = model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    new = free[:, prompt_length:]
    eos = next(int(t) for t in new[0, 2:] if int(t) not in new[1].tolist() and int(t) not in new[0, :2].tolist())
    options = dict(max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    with torch.inference_mode():
        expected = model.generate(**inputs, **options)
        ours = model.generate(**inputs, **options, static_decode=True, step_mode=step_mode)
    assert torch.equal(expected, ours), (expected.tolist(), ours.tolist())
    assert (ours[0, prompt_length:] == 0).any() and not (ours[1, prompt_length:] == eos).any()


@pytest.mark.timeout(600)  # a compilation per shape: tens of seconds on a small CPU
@pytest.mark.parametrize("family", ["llava", "flamingo"])
def test_the_compiled_step_gives_the_same_tokens(request, family):
    """step_mode="compiled" (torch.compile of the decode step; the CPU option) on a left-padded batch with images:
    the tokens of transformers' generate, and a second request of the same shape reuses the compiled step. Batch 1
    too: there the step's one-row matrix products are compiled into inductor's own code, not BLAS calls."""
    model, processor = converted(request, family)
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in ["What is it?", "Where is the red thing in this picture?"]
    ]
    images = [[photo_like_image(64, 48, seed=5)], [photo_like_image(40, 80, seed=6)]]
    inputs = {k: v for k, v in dict(processor(images=images, text=prompts, padding_side="left")).items()
              if k not in NOT_MODEL_INPUTS}  # fmt: skip
    options = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    with torch.inference_mode():
        expected = model.generate(**inputs, **options)
        for _ in range(2):
            ours = model.generate(**inputs, **options, static_decode=True, step_mode="compiled")
            assert torch.equal(expected, ours), (expected.tolist(), ours.tolist())
    decoders = model.static_decoders().idle
    needed, limit = inputs["input_ids"].shape[1] + 16, model.config.text_config.max_position_embeddings
    assert [d.mode for d in decoders] == ["compiled"] and decoders[0].length == bucket_length(needed, limit, True)
    single = model_inputs(processor, [photo_like_image(72, 56, seed=3)], "Describe the picture.")
    with torch.inference_mode():
        expected = model.generate(**single, **options)
        ours = model.generate(**single, **options, static_decode=True, step_mode="compiled")
    assert torch.equal(expected, ours), (expected.tolist(), ours.tolist())
    with pytest.raises(ValueError, match="step_mode"):
        model.generate(**inputs, max_new_tokens=2, static_decode=True, step_mode="graph")  # CUDA only


@pytest.mark.timeout(600)  # a compilation, then one more with symbolic lengths: tens of seconds each
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "fuyu", "flamingo"])
def test_the_compiled_prompt_pass_gives_the_same_tokens(request, family):
    """compile_prompt=True (the model's forward compiled for the prompt pass) on a left-padded batch with images,
    then (LLaVA: one compilation more) on one prompt of another length, compiled again with symbolic lengths:
    transformers' tokens. Bad inputs are still refused, now by checks that run inside the compiled code."""
    model, processor = converted(request, family)
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in ["What is it?", "Where is the red thing in this picture?"]
    ]
    images = [[photo_like_image(64, 48, seed=5)], [photo_like_image(64, 48, seed=6)]]
    batch = {k: v for k, v in dict(processor(images=images, text=prompts, padding_side="left")).items()
             if k not in NOT_MODEL_INPUTS}  # fmt: skip
    requests = [batch]
    if family == "llava":  # another prompt length: compiled again, with symbolic lengths
        requests.append(model_inputs(processor, [photo_like_image(64, 48, seed=3)], "Describe it in a few words."))
    options = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.inference_mode():
        for inputs in requests:
            expected = model.generate(**inputs, **options)
            ours = model.generate(**inputs, **options, static_decode=True, compile_prompt=True)
            assert torch.equal(expected, ours), (expected.tolist(), ours.tolist())
        pixels = next(k for k in batch if k.startswith("pixel_values"))
        broken = {**batch, pixels: torch.full_like(batch[pixels], float("nan"))}
        with pytest.raises(RuntimeError, match="NaN or infinite"):
            model.generate(**broken, **options, static_decode=True, compile_prompt=True)
        too_large = batch["input_ids"].clone()
        too_large[0, -1] = model.config.text_config.vocab_size
        with pytest.raises(ValueError, match="outside this model's vocabulary"):
            model.generate(**{**batch, "input_ids": too_large}, **options, static_decode=True, compile_prompt=True)


@pytest.mark.timeout(600)
def test_flamingos_compiled_prompt_pass_zeroes_a_padding_image_as_the_eager_one_leaves_it_out(request):
    """Rows with two images and one: the second row's empty image slot is padding (`image_mask` False). Eager, it is
    not encoded; compiled, every slot is encoded and padding's visual tokens zeroed (no shape that depends on the
    mask's values, so no graph break around the encoder). Both give the same tokens."""
    model, processor = converted(request, "flamingo")
    prompts = [
        processor.apply_chat_template([{"role": "user", "content": [*[{"type": "image"}] * count,
                                                                    {"type": "text", "text": "What is it?"}]}],
                                      add_generation_prompt=True)
        for count in (2, 1)
    ]  # fmt: skip
    images = [[photo_like_image(64, 48, seed=5), photo_like_image(48, 64, seed=6)], [photo_like_image(64, 48, seed=7)]]
    batch = {k: v for k, v in dict(processor(images=images, text=prompts, padding_side="left")).items()
             if k not in NOT_MODEL_INPUTS}  # fmt: skip
    assert batch["image_mask"].tolist() == [[True, True], [True, False]]
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.inference_mode():
        expected = model.generate(**batch, **options)
        ours = model.generate(**batch, **options, static_decode=True, compile_prompt=True)
    assert torch.equal(expected, ours), (expected.tolist(), ours.tolist())


@pytest.mark.timeout(600)
def test_compiled_steps_of_two_models_are_kept_apart(shipped):
    """Two models whose decoders have buffers of the same shapes (Qwen2-VL's projections have biases, Fuyu's do
    not): each runs its own compiled step, never the other's."""
    options = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    for family in ("qwen2_vl", "fuyu"):
        model, processor = shipped[family]
        inputs = model_inputs(processor, [photo_like_image(60, 60, seed=2)], "What color is the circle?")
        with torch.inference_mode():
            expected = model.generate(**inputs, **options)
            ours = model.generate(**inputs, **options, static_decode=True, step_mode="compiled")
        assert torch.equal(expected, ours), (family, expected.tolist(), ours.tolist())


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "fuyu", "flamingo"])
def test_shipped_checkpoints_answer_the_same_through_both_paths(shipped, family):
    from vlm_patterns.training.synthetic_vqa import held_out_seed, make_example

    model, processor = shipped[family]
    for index in range(3):
        example = make_example(held_out_seed(index), kinds=("color", "shape", "position", "count"))
        same_tokens(model, model_inputs(processor, example.images[:1], example.question), max_new_tokens=8)


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("family", "table"), [("qwen2_vl", lambda m: m.model.visual.pos_embed),
                                               ("fuyu", lambda m: m.model.vision_pos_embed)])  # fmt: skip
def test_learned_positions_are_read_alike_by_the_compiled_prompt_pass(shipped, family, table):
    """The shipped Qwen2-VL and Fuyu add learned positions, resampled to each image, to their patches (the converted
    ones have none): the compiled prompt pass (Qwen2-VL's taps read on the host, Fuyu's places found on the device
    inside the graph) gives the eager tokens."""
    from vlm_patterns.training.synthetic_vqa import held_out_seed, make_example

    model, processor = shipped[family]
    assert table(model) is not None
    example = make_example(held_out_seed(0), kinds=("position",))
    inputs = model_inputs(processor, example.images[:1], example.question)
    options = dict(max_new_tokens=8, do_sample=False)
    with torch.inference_mode():
        expected = model.generate(**inputs, **options)
        ours = model.generate(**inputs, **options, static_decode=True, compile_prompt=True)
    assert torch.equal(expected, ours), (expected.tolist(), ours.tolist())


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "fuyu", "flamingo"])
def test_the_prompt_pass_runs_the_last_layer_for_the_last_token_only(shipped, family):
    """With one position's logits kept (generation's prompt pass), the last layer's MLP runs on one position per
    row and every earlier layer on all of them; the logits are the full pass's up to float rounding (matrix products
    of one row and of many round differently), and the cache holds every token's keys and values."""
    from vlm_patterns.training.evaluate import collate_prompts
    from vlm_patterns.training.synthetic_vqa import examples

    model, processor = shipped[family]
    batch = [vars(e) for e in examples("held_out", 4, seed=11, multi_image=family != "fuyu")]
    inputs = collate_prompts(processor, batch)
    layers = model.model.language_model.layers
    positions = {}
    hooks = [layer.mlp.register_forward_hook(lambda module, args, out, i=i: positions.__setitem__(i, args[0].shape[1]))
             for i, layer in enumerate(layers)]  # fmt: skip
    try:
        with torch.inference_mode():
            kept = model(**inputs, use_cache=True, logits_to_keep=1)
            trimmed = dict(positions)
            full = model(**inputs, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    length = inputs["input_ids"].shape[1]
    assert trimmed == {**{i: length for i in range(len(layers) - 1)}, len(layers) - 1: 1}
    assert positions == {i: length for i in range(len(layers))}  # the full pass, after
    assert kept.logits.shape[1] == 1
    torch.testing.assert_close(kept.logits[:, -1], full.logits[:, -1], rtol=0, atol=1e-5)
    assert torch.equal(kept.logits[:, -1].argmax(-1), full.logits[:, -1].argmax(-1))
    last = len(layers) - 1
    for cache in (kept.cache, full.cache):
        assert cache.layers[last].keys.shape[-2] == length
    assert torch.equal(kept.cache.layers[last].keys, full.cache.layers[last].keys)
    with torch.inference_mode():  # all hidden states asked for: every layer on every position
        with_states = model(**inputs, logits_to_keep=1, output_hidden_states=True)
    assert with_states.hidden_states[-1].shape[1] == length


def test_llava_static_tokens_match_transformers_own_class(llava_pair):
    from transformers import LlavaForConditionalGeneration

    source, folder = llava_pair()
    reference = LlavaForConditionalGeneration.from_pretrained(source).eval()
    ours = AutoModelForImageTextToText.from_pretrained(folder).eval()
    inputs = model_inputs(AutoProcessor.from_pretrained(folder), [photo_like_image(50, 70, seed=8)], "Describe.")
    with torch.inference_mode():
        assert torch.equal(
            reference.generate(**inputs, **GREEDY), ours.generate(**inputs, **GREEDY, static_decode=True)
        )


def test_the_filters_are_transformers_own():
    """Repetition penalty, temperature, top-k and top-p leave the same tokens with the same scores."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    history = torch.randint(0, 50, (3, 7))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, history, True)
    for temperature, top_k, top_p, penalty in [(0.7, 10, 0.9, 1.3), (1.5, None, 0.5, None), (1.0, 3, None, 0.8)]:
        processors = LogitsProcessorList()
        if penalty is not None:
            processors.append(RepetitionPenaltyLogitsProcessor(penalty))
        processors.append(TemperatureLogitsWarper(temperature))
        if top_k is not None:
            processors.append(TopKLogitsWarper(top_k))
        if top_p is not None:
            processors.append(TopPLogitsWarper(top_p))
        expected = processors(history, logits.clone())
        ours = Sampling(True, temperature, top_k, top_p, penalty).scores(logits.clone(), seen)
        assert torch.equal(torch.isinf(expected), torch.isinf(ours))
        finite = ~torch.isinf(expected)
        assert torch.allclose(expected[finite], ours[finite])


def test_sampling_is_seeded_and_follows_the_filtered_distribution():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampling = Sampling(True, 1.0, None, 0.8, None)  # top-p 0.8 keeps the first two tokens only
    filtered = sampling.scores(scores, None)
    draws = torch.stack([sampling.choose(filtered, torch.Generator().manual_seed(s)) for s in range(2000)])
    assert set(draws.unique().tolist()) == {0, 1}
    share = (draws == 0).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.05, share
    first = [sampling.choose(filtered, torch.Generator().manual_seed(7)).item() for _ in range(5)]
    assert len(set(first)) == 1


def test_seeded_sampling_repeats_and_streams(shipped):
    model, processor = shipped["llava"]
    inputs = model_inputs(processor, [photo_like_image(60, 60, seed=2)], "What color is the circle?")
    options = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=20, static_decode=True)
    with torch.inference_mode():
        one = model.generate(**inputs, **options, generator=torch.Generator().manual_seed(3))
        two = model.generate(**inputs, **options, generator=torch.Generator().manual_seed(3))
    assert torch.equal(one, two)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        tokens = model.generate(**inputs, max_new_tokens=10, static_decode=True, streamer=streamer)
    streamed = "".join(streamer)
    prompt_length = inputs["input_ids"].shape[1]
    assert streamed == processor.tokenizer.decode(tokens[0, prompt_length:], skip_special_tokens=True)


def test_stop_strings_stop_where_generate_stops(request):
    model, processor = converted(request, "qwen2_vl")  # a byte-level BPE vocabulary, as real checkpoints have
    inputs = model_inputs(processor, [photo_like_image(60, 60, seed=2)], "What color is the circle?")
    with torch.inference_mode():
        free = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, static_decode=True)
    text = processor.tokenizer.decode(free[0, inputs["input_ids"].shape[1] :])
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # a string that occurs mid-answer
    options = dict(max_new_tokens=8, min_new_tokens=8, stop_strings=[stop], tokenizer=processor.tokenizer)
    stopped = same_tokens(model, inputs, **options)
    assert stopped.shape[1] < free.shape[1], (text, stop)


def test_what_the_path_does_not_implement_is_refused_by_name(shipped):
    model, processor = shipped["llava"]
    inputs = model_inputs(processor, [], "Hello")
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(**inputs, max_new_tokens=4, num_beams=2, static_decode=True)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        model.generate(**inputs, max_new_tokens=4, no_repeat_ngram_size=2, static_decode=True)


def test_buffers_are_reused_by_shape_and_lengths_bucket_on_cuda():
    assert bucket_length(100, 4096, bucketed=False) == 100
    assert bucket_length(100, 4096, bucketed=True) == 256
    assert bucket_length(300, 4096, bucketed=True) == 512
    assert bucket_length(3000, 2048, bucketed=True) == 3000  # past the context: the caller has refused it already
    assert bucket_length(1500, 2048, bucketed=True) == 2048


def test_a_decoder_is_lent_to_one_request_at_a_time(shipped):
    model, _ = shipped["fuyu"]
    pool = DecoderPool(keep=2)
    first = pool.acquire(model, 1, 64, mode="eager")
    second = pool.acquire(model, 1, 64, mode="eager")
    assert first is not second  # both busy: each request has its own buffers
    pool.release(first)
    assert pool.acquire(model, 1, 64, mode="eager") is first  # idle again: reused, not reallocated
    assert pool.acquire(model, 2, 64, mode="eager") is not first


def test_a_generation_config_option_turns_the_path_on(request):
    """`static_decode` saved in generation_config.json makes plain `generate` calls take the static path."""
    import copy

    model, processor = converted(request, "fuyu")
    inputs = model_inputs(processor, [photo_like_image(40, 40, seed=1)], "Describe.")
    with torch.inference_mode():
        expected = model.generate(**inputs, **GREEDY)
        assert not model.static_decoders().idle
        model.generation_config = copy.deepcopy(model.generation_config)
        model.generation_config.static_decode = True
        assert torch.equal(model.generate(**inputs, **GREEDY), expected)
    assert model.static_decoders().idle  # the static path ran and returned its buffers to the pool
