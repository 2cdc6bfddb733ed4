"""LLaVA: our model and processor vs transformers' LlavaForConditionalGeneration and CLIP image processors.

Both models hold the very same weight tensors (ours is loaded from the reference's state dict through the
converter's key map, sharing storage), get the same inputs, and are timed alternately in one process.
"""

import torch
from harness import Report, add_fast_path_rows, ours_sharing_weights, paired_median_seconds, peak_memory_increase

from vlm_patterns.conversion.llava import LLAVA_HF_RULES, build_processor, config_from_llava_hf
from vlm_patterns.conversion.tiny import build_tokenizer, photo_like_image
from vlm_patterns.modeling import LlavaPatternForConditionalGeneration
from vlm_patterns.processing import LlavaPatternImageProcessor

# (vision tower, language model) shapes. `cpu` is small enough for a 2-core machine; the others are the
# published shapes (random weights: speed does not depend on the values).
# The published shape benchmarks/gpu.sh measures.
GPU_PRESET = "llava-1.5-7b"
PRESETS = {
    "cpu": dict(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=336, patch_size=14),
        text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, vocab_size=32064),
    ),
    "llava-1.5-7b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064),
    ),
    "llava-1.5-13b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14),
        text=dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, vocab_size=32064),
    ),
}  # fmt: skip


def build_models(preset: str, device: str, dtype: torch.dtype, tokenizer):
    """The reference with random weights, and ours holding the same tensors."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    shapes = PRESETS[preset]
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**shapes["vision"]),
        text_config=LlamaConfig(**shapes["text"], max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id),
        image_token_index=image_token_id,
        image_seq_length=(shapes["vision"]["image_size"] // shapes["vision"]["patch_size"]) ** 2,
    )
    torch.manual_seed(0)
    with torch.device(device):
        reference = LlavaForConditionalGeneration(config).to(dtype).eval()
    ours_config = config_from_llava_hf(config.to_dict())
    return reference, ours_sharing_weights(
        reference, LlavaPatternForConditionalGeneration, ours_config, LLAVA_HF_RULES, device
    )


def benchmark_processor(report: Report, image_size: int, repeats: int) -> None:
    """One 1080x1920 photo through ours and transformers' CLIP processors (2 threads, as set by the caller)."""
    from transformers import CLIPImageProcessorPil
    from transformers.utils import is_torchvision_available

    image = photo_like_image(1920, 1080, seed=11)
    size = dict(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    ours = LlavaPatternImageProcessor(**size)
    pil = CLIPImageProcessorPil(**size)
    ours_s, pil_s = paired_median_seconds(
        lambda: ours(image), lambda: pil(image, return_tensors="pt"), repeats=repeats, block=5
    )
    report.add("image processor vs PIL backend, 1080x1920 photo", "ms/image", ours_s * 1e3, pil_s * 1e3, False, 4.0)
    if is_torchvision_available():
        from transformers import CLIPImageProcessor

        fast = CLIPImageProcessor(**size)
        ours_s, fast_s = paired_median_seconds(
            lambda: ours(image), lambda: fast(image, return_tensors="pt"), repeats=repeats, block=5
        )
        report.add("image processor vs torchvision backend", "ms/image", ours_s * 1e3, fast_s * 1e3, False, 1.0)
    else:
        report.notes.append(
            "transformers' torchvision backend is not measured here: torchvision does not import beside this torch "
            "(run this script in an environment with torchvision to add that row)."
        )


def run_processor(repeats: int) -> Report:
    report = Report("llava", "image processor only", "cpu", "float32")
    benchmark_processor(report, 336, repeats=max(repeats, 10))
    return report


def run(preset: str, device: str, dtype: torch.dtype, new_tokens: int, repeats: int) -> Report:
    report = Report("llava", preset, device, str(dtype).removeprefix("torch."))
    tokenizer = build_tokenizer()
    reference, ours = build_models(preset, device, dtype, tokenizer)
    image_size = ours.config.vision_config.image_size
    processor = build_processor(
        ours.config,
        tokenizer,
        LlavaPatternImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
    )
    benchmark_processor(report, image_size, repeats=max(repeats, 10))

    question = "Describe everything you can see in this picture, the objects and their colours and positions."
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=photo_like_image(1920, 1080, seed=11), text=prompt).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    prompt_tokens = inputs["input_ids"].shape[1]

    def forward(model):
        return lambda: model(**inputs, use_cache=True, logits_to_keep=1)

    def generate(model, n, cache=None):
        options = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation=cache)
        return lambda: model.generate(**inputs, **options)

    def decode_rate(cache=None) -> list[float]:
        """Tokens per second after the first, from the time difference of generating 1 and 1 + N tokens."""
        one = paired_median_seconds(generate(ours, 1, cache), generate(reference, 1, cache), device, repeats)
        many = paired_median_seconds(
            generate(ours, new_tokens + 1, cache), generate(reference, new_tokens + 1, cache), device, repeats
        )
        return [new_tokens / (m - o) for m, o in zip(many, one, strict=True)]

    with torch.inference_mode():
        prefill = paired_median_seconds(forward(ours), forward(reference), device, repeats)
        decode = decode_rate()
        decode_static = decode_rate("static")

    report.add(f"prefill, {prompt_tokens} tokens incl. image", "ms", prefill[0] * 1e3, prefill[1] * 1e3, False, 1.0)
    report.add(f"decode, {new_tokens} tokens, default (dynamic) cache", "tok/s", decode[0], decode[1], True, 1.0)
    report.add(f"decode, {new_tokens} tokens, static cache", "tok/s", decode_static[0], decode_static[1], True, 1.0)
    add_fast_path_rows(report, ours, reference, inputs, inputs, new_tokens, repeats, device, decode_target=1.0)
    memory = [memory_in_fresh_process(which, preset, device, dtype, new_tokens) for which in ("ours", "reference")]
    unit = "MB CUDA allocated" if device.startswith("cuda") else "MB RSS"
    report.add(
        f"peak memory of generate ({new_tokens} tokens) above the weights",
        unit,
        memory[0] / 1e6,
        memory[1] / 1e6,
        False,
    )
    return report


def memory_in_fresh_process(which: str, preset: str, device: str, dtype: torch.dtype, new_tokens: int) -> int:
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("run.py")
    dtype_name = str(dtype).removeprefix("torch.")
    command = [sys.executable, str(script), "llava", "--preset", preset, "--device", device, "--dtype", dtype_name,
               "--threads", str(torch.get_num_threads()), "--new-tokens", str(new_tokens), "--measure-memory", which]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def measure_memory(which: str, preset: str, device: str, dtype: torch.dtype, new_tokens: int) -> int:
    """Peak memory of one generate call above the loaded weights; run in a fresh process per model."""
    tokenizer = build_tokenizer()
    reference, ours = build_models(preset, device, dtype, tokenizer)
    model = ours if which == "ours" else reference
    image_size = ours.config.vision_config.image_size
    processor = build_processor(
        ours.config,
        tokenizer,
        LlavaPatternImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
    )
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=photo_like_image(1920, 1080, seed=11), text=prompt).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.inference_mode():
        return peak_memory_increase(
            lambda: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False),
            device,
        )
