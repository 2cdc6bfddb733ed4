"""Qwen2-VL: our model and processor vs transformers' Qwen2VLForConditionalGeneration and Qwen2VLImageProcessorPil,
on the same weight tensors and the same inputs, in one process."""

import torch
from harness import Report, add_fast_path_rows, ours_sharing_weights, paired_median_seconds, peak_memory_increase

from vlm_patterns.conversion.qwen2_vl import QWEN2_VL_RULES, config_from_hub
from vlm_patterns.conversion.tiny import build_qwen_tokenizer, photo_like_image
from vlm_patterns.modeling import Qwen2VLPatternForConditionalGeneration
from vlm_patterns.processing import Qwen2VLPatternImageProcessor, Qwen2VLPatternProcessor

BUDGET = 28 * 28 * 1280  # max_pixels: at most 1280 visual tokens per image

# The published shape benchmarks/gpu.sh measures.
GPU_PRESET = "qwen2-vl-2b"
PRESETS = {
    "cpu": dict(
        vision=dict(depth=4, embed_dim=256, num_heads=4, mlp_ratio=4, hidden_size=512),
        text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                  vocab_size=151936, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}),
        tie=True, max_pixels=28 * 28 * 256,
    ),
    "qwen2-vl-2b": dict(
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536),
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  vocab_size=151936, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        tie=True, max_pixels=BUDGET,
    ),
    "qwen2-vl-7b": dict(
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=3584),
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                  vocab_size=152064, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        tie=False, max_pixels=BUDGET,
    ),
}  # fmt: skip


def build_models(preset: str, device: str, dtype: torch.dtype, tokenizer):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    shapes = PRESETS[preset]
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}  # fmt: skip
    text = dict(
        shapes["text"], tie_word_embeddings=shapes["tie"], eos_token_id=tokenizer.eos_token_id, bos_token_id=None
    )
    config = Qwen2VLConfig(text_config=text, vision_config=shapes["vision"], tie_word_embeddings=shapes["tie"], **ids)
    torch.manual_seed(0)
    with torch.device(device):
        reference = Qwen2VLForConditionalGeneration(config).to(dtype).eval()
    ours_config = config_from_hub(config.to_dict())
    return reference, ours_sharing_weights(
        reference, Qwen2VLPatternForConditionalGeneration, ours_config, QWEN2_VL_RULES, device
    )


def make_processor(tokenizer, max_pixels: int) -> Qwen2VLPatternProcessor:
    return Qwen2VLPatternProcessor(
        image_processor=Qwen2VLPatternImageProcessor(max_pixels=max_pixels), tokenizer=tokenizer
    )


def benchmark_processor(report: Report, repeats: int) -> None:
    from transformers import Qwen2VLImageProcessorPil
    from transformers.utils import is_torchvision_available

    image = photo_like_image(1920, 1080, seed=11)
    ours = Qwen2VLPatternImageProcessor(max_pixels=BUDGET)
    pil = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": BUDGET})
    ours_s, pil_s = paired_median_seconds(
        lambda: ours(image), lambda: pil(image, return_tensors="pt"), repeats=repeats, block=5
    )
    report.add(
        "image processor vs PIL backend, 1080x1920 photo, 1280-token budget",
        "ms/image",
        ours_s * 1e3,
        pil_s * 1e3,
        False,
        4.0,
    )
    if is_torchvision_available():
        from transformers import Qwen2VLImageProcessor

        fast = Qwen2VLImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": BUDGET})
        ours_s, fast_s = paired_median_seconds(
            lambda: ours(image), lambda: fast(image, return_tensors="pt"), repeats=repeats, block=5
        )
        report.add("image processor vs torchvision backend", "ms/image", ours_s * 1e3, fast_s * 1e3, False, 1.0)
    else:
        report.notes.append(
            "transformers' torchvision backend is not measured here: torchvision does not import beside this torch "
            "(run this script in an environment with torchvision to add that row)."
        )


def prompt_inputs(processor, device, dtype, images):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "Describe the pictures in detail."}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=images, text=prompt, return_mm_token_type_ids=True).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def run_processor(repeats: int) -> Report:
    report = Report("qwen2_vl", "image processor only", "cpu", "float32")
    benchmark_processor(report, repeats=max(repeats, 10))
    return report


def run(preset: str, device: str, dtype: torch.dtype, new_tokens: int, repeats: int) -> Report:
    report = Report("qwen2_vl", preset, device, str(dtype).removeprefix("torch."))
    tokenizer = build_qwen_tokenizer()
    reference, ours = build_models(preset, device, dtype, tokenizer)
    processor = make_processor(tokenizer, PRESETS[preset]["max_pixels"])
    benchmark_processor(report, repeats=max(repeats, 10))

    inputs = prompt_inputs(processor, device, dtype, [photo_like_image(1920, 1080, seed=11)])
    ours_inputs = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}  # we read the placeholders instead
    prompt_tokens = inputs["input_ids"].shape[1]

    def generate(model, model_inputs, n, cache=None):
        options = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation=cache)
        return lambda: model.generate(**model_inputs, **options)

    def decode_rate(cache=None) -> list[float]:
        one = paired_median_seconds(
            generate(ours, ours_inputs, 1, cache), generate(reference, inputs, 1, cache), device, repeats
        )
        many = paired_median_seconds(
            generate(ours, ours_inputs, new_tokens + 1, cache),
            generate(reference, inputs, new_tokens + 1, cache),
            device,
            repeats,
        )
        return [new_tokens / (m - o) for m, o in zip(many, one, strict=True)]

    with torch.inference_mode():
        prefill = paired_median_seconds(
            lambda: ours(**ours_inputs, use_cache=True, logits_to_keep=1),
            lambda: reference(**inputs, use_cache=True, logits_to_keep=1),
            device,
            repeats,
        )
        decode = decode_rate()
        decode_static = decode_rate("static")
    visual = processor.image_processor.tokens_per_grid(inputs["image_grid_thw"][0])
    report.add(
        f"prefill, {prompt_tokens} tokens ({visual} visual)", "ms", prefill[0] * 1e3, prefill[1] * 1e3, False, 1.0
    )
    report.add(f"decode, {new_tokens} tokens, default (dynamic) cache", "tok/s", decode[0], decode[1], True, 1.0)
    report.add(f"decode, {new_tokens} tokens, static cache", "tok/s", decode_static[0], decode_static[1], True, 1.0)
    add_fast_path_rows(report, ours, reference, ours_inputs, inputs, new_tokens, repeats, device, decode_target=1.0)

    memory = [memory_in_fresh_process(which, preset, device, dtype) for which in ("ours", "reference")]
    unit = "MB CUDA allocated" if device.startswith("cuda") else "MB RSS"
    report.add(
        "peak memory of the vision tower, 4 images of different sizes", unit, memory[0] / 1e6, memory[1] / 1e6, False
    )
    return report


def memory_in_fresh_process(which: str, preset: str, device: str, dtype: torch.dtype) -> int:
    import subprocess
    import sys
    from pathlib import Path

    command = [sys.executable, str(Path(__file__).with_name("run.py")), "qwen2_vl", "--preset", preset, "--device", device,
               "--dtype", str(dtype).removeprefix("torch."), "--threads", str(torch.get_num_threads()), "--measure-memory", which]  # fmt: skip
    return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])


def measure_memory(which: str, preset: str, device: str, dtype: torch.dtype, new_tokens: int) -> int:
    """Peak memory of encoding a 4-image batch with the vision tower; run in a fresh process per model."""
    tokenizer = build_qwen_tokenizer()
    reference, ours = build_models(preset, device, dtype, tokenizer)
    processor = make_processor(tokenizer, PRESETS[preset]["max_pixels"])
    sizes = [(1920, 1080), (1080, 1920), (1280, 720), (800, 800)]
    images = processor.image_processor([photo_like_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]).to(device)
    pixels, grids = images["pixel_values"].to(dtype), images["image_grid_thw"]
    with torch.inference_mode():
        if which == "ours":
            return peak_memory_increase(lambda: ours.model.get_image_features(pixels, grids), device)
        return peak_memory_increase(lambda: reference.model.get_image_features(pixels, grids), device)
