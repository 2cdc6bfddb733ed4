"""Flamingo: our model vs transformers' IdeficsForVisionText2Text on the same weight tensors and inputs, plus
the per-step cost of the cross-attention itself (ours reads the images' keys/values from the cache; IDEFICS
projects the visual tokens again in every block at every step)."""

import torch
from harness import Report, add_fast_path_rows, ours_sharing_weights, paired_median_seconds

from vlm_patterns.conversion.idefics import concatenate_vocabulary, config_from_idefics, idefics_rules
from vlm_patterns.conversion.key_mapping import KeyMap
from vlm_patterns.conversion.tiny import build_idefics_tokenizer, photo_like_image
from vlm_patterns.modeling import FlamingoPatternForConditionalGeneration
from vlm_patterns.processing import FlamingoPatternImageProcessor, FlamingoPatternProcessor

# IDEFICS shapes: `cpu` fits a 2-core machine; `idefics-9b` is the published model (random weights).
# The published shape benchmarks/gpu.sh measures.
GPU_PRESET = "idefics-9b"
PRESETS = {
    "cpu": dict(
        text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                  cross_layer_interval=2),
        vision=dict(embed_dim=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=224,
                    patch_size=14),
        perceiver=dict(resampler_n_latents=64, resampler_depth=2, resampler_n_heads=8, resampler_head_dim=32),
    ),
    "idefics-9b": dict(
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  cross_layer_interval=4),
        vision=dict(embed_dim=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                    image_size=224, patch_size=14),
        perceiver=dict(resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16, resampler_head_dim=96),
    ),
}  # fmt: skip

PROMPT = (
    "User:<image>What is in this picture?\nAssistant: A few coloured shapes on a gradient.\n"
    "User:<image>And in this one?\nAssistant: Two circles and a square.\n"
    "User:<image>Describe this last picture in detail.\nAssistant:"
)


def build_models(preset: str, device: str, dtype: torch.dtype, tokenizer):
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    shapes = PRESETS[preset]
    config = IdeficsConfig(
        **shapes["text"], vocab_size=32000, additional_vocab_size=2,
        max_position_embeddings=2048, rms_norm_eps=1e-6, qk_layer_norms=True, use_resampler=True,
        alpha_initializer="ones", pad_token_id=0, bos_token_id=1, eos_token_id=2,
        vision_config=dict(**shapes["vision"], hidden_act="gelu"),
        perceiver_config=dict(use_resampler=True, qk_layer_norms_perceiver=True, **shapes["perceiver"]),
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        reference = IdeficsForVisionText2Text(config).to(dtype).eval()
    # LLaMA's 32000 + 2 rows, driven by a small test tokenizer: its <image> id is what the prompts contain.
    ours_config = config_from_idefics(config.to_dict(), tokenizer.convert_tokens_to_ids("<image>"))
    rules = KeyMap(idefics_rules(decoupled=True), gathers=concatenate_vocabulary())
    return reference, ours_sharing_weights(
        reference, FlamingoPatternForConditionalGeneration, ours_config, rules, device
    )


def cross_attention_step(reference, ours, inputs, device: str, repeats: int) -> tuple[float, float]:
    """Seconds for the cross-attention of every gated block at one decode step (one new token per row)."""
    with torch.inference_mode():
        out = ours(**inputs, use_cache=True)
        visual = out.image_hidden_states.flatten(1, 2)  # (B, I * N, Dv)
    D = ours.config.text_config.hidden_size
    hidden = torch.randn(visual.shape[0], 1, D, device=device, dtype=visual.dtype)
    num_images, n = inputs["pixel_values"].shape[1], ours.config.num_visual_tokens
    sees = torch.zeros(visual.shape[0], 1, num_images, dtype=torch.bool, device=device)
    sees[..., -1] = True
    bias = torch.where(sees, 0.0, torch.finfo(visual.dtype).min).to(visual.dtype).repeat_interleave(n, -1)[:, None]
    entries = out.cache.layers[ours.config.text_config.num_hidden_layers + 1 :]

    def ours_step():
        for block, entry in zip(ours.model.gated_cross_attn_layers, entries, strict=True):
            block.cross_attn(hidden, entry.keys, entry.values, bias)

    def reference_step():
        for block in reference.model.gated_cross_attn_layers:
            block.cross_attn(hidden_states=hidden, key_value_states=visual, attention_mask=bias)

    with torch.inference_mode():
        return paired_median_seconds(ours_step, reference_step, device, repeats=max(repeats, 20))


def run(preset: str, device: str, dtype: torch.dtype, new_tokens: int, repeats: int) -> Report:
    report = Report("flamingo", preset, device, str(dtype).removeprefix("torch."))
    tokenizer = build_idefics_tokenizer()
    reference, ours = build_models(preset, device, dtype, tokenizer)
    side = ours.config.vision_config.image_size
    processor = FlamingoPatternProcessor(
        image_processor=FlamingoPatternImageProcessor(size={"height": side, "width": side}),
        tokenizer=tokenizer, fake_image_token="<fake_token_around_image>", bos_as_text=True,
    )  # fmt: skip
    images = [photo_like_image(640, 480, seed=i) for i in range(3)]
    inputs = processor(images=images, text=PROMPT).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    reference_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    # IDEFICS reads which image each token sees from an explicit mask; ours derives it from the <image> tokens.
    reference_inputs["image_attention_mask"] = explicit_image_attention(ours, inputs)
    prompt_tokens = inputs["input_ids"].shape[1]

    def generate(model, model_inputs, n):
        options = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return lambda: model.generate(**model_inputs, **options)

    def decode_rate() -> list[float]:
        one = paired_median_seconds(
            generate(ours, inputs, 1), generate(reference, reference_inputs, 1), device, repeats
        )
        many = paired_median_seconds(
            generate(ours, inputs, new_tokens + 1), generate(reference, reference_inputs, new_tokens + 1), device, repeats
        )  # fmt: skip
        return [new_tokens / (m - o) for m, o in zip(many, one, strict=True)]

    with torch.inference_mode():
        prefill = paired_median_seconds(
            lambda: ours(**inputs, use_cache=True, logits_to_keep=1),
            lambda: reference(**reference_inputs, use_cache=True, logits_to_keep=1),
            device,
            repeats,
        )
        decode = decode_rate()
    cross = cross_attention_step(reference, ours, inputs, device, repeats)
    report.add(f"prefill, 3 images + {prompt_tokens} tokens", "ms", prefill[0] * 1e3, prefill[1] * 1e3, False, 1.0)
    report.add(f"decode, {new_tokens} tokens, default (dynamic) cache", "tok/s", decode[0], decode[1], True, 1.0)
    add_fast_path_rows(
        report, ours, reference, inputs, reference_inputs, new_tokens, repeats, device, decode_target=1.0
    )
    blocks = len(ours.model.gated_cross_attn_layers)
    report.add(
        f"cross-attention per decode step ({blocks} blocks, 3 x {ours.config.num_visual_tokens} visual tokens)",
        "ms/step",
        cross[0] * 1e3,
        cross[1] * 1e3,
        False,
        1.0,
    )
    report.notes.append(
        "Cross-attention per step: ours reads each block's image keys/values from the cache; IDEFICS projects "
        "(and q/k-normalises) the visual tokens again in every block at every step."
    )
    return report


def explicit_image_attention(ours, inputs) -> torch.Tensor:
    """IdeficsProcessor's image_attention_mask for these ids (B, T, I), from our rule (proven equal in tests)."""
    from vlm_patterns.modeling.flamingo_visibility import ImageState, image_attention, track_images

    config = ours.config
    state = ImageState.start(inputs["input_ids"].shape[0], inputs["image_mask"].sum(-1), inputs["input_ids"].device)
    index, _ = track_images(inputs["input_ids"], config.image_token_id, config.media_reset_token_id, state)
    return image_attention(index, inputs["pixel_values"].shape[1]).long()


def run_processor(repeats: int) -> Report:
    """The image processor is LLaVA's with a square resize; see the llava processor table."""
    from transformers import IdeficsImageProcessorPil

    report = Report("flamingo", "image processor only", "cpu", "float32")
    image = photo_like_image(1920, 1080, seed=11)
    ours, pil = FlamingoPatternImageProcessor(), IdeficsImageProcessorPil()
    ours_s, pil_s = paired_median_seconds(lambda: ours(image), lambda: pil(image), repeats=max(repeats, 10), block=5)
    report.add("image processor vs PIL backend, 1080x1920 photo", "ms/image", ours_s * 1e3, pil_s * 1e3, False, 4.0)
    return report
