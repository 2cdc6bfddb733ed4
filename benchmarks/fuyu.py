"""Fuyu: our model and processor vs transformers' FuyuForCausalLM and Fuyu image processors, on the same weight
tensors and inputs; and the conversion's peak memory against the largest shard it reads."""

import math
import subprocess
import sys
from pathlib import Path

import torch
from harness import Report, add_fast_path_rows, ours_sharing_weights, paired_median_seconds

from vlm_patterns.conversion.fuyu import FUYU_RULES, config_from_hub, split_interleaved_qkv
from vlm_patterns.conversion.tiny import build_fuyu_tokenizer, photo_like_image
from vlm_patterns.modeling import FuyuPatternForConditionalGeneration
from vlm_patterns.processing import FuyuPatternImageProcessor, FuyuPatternProcessor

# The published shape benchmarks/gpu.sh measures.
GPU_PRESET = "fuyu-8b"
PRESETS = {
    "cpu": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8, vocab_size=32000),
    "fuyu-8b": dict(
        hidden_size=4096, intermediate_size=16384, num_hidden_layers=36, num_attention_heads=64, vocab_size=262144
    ),
}


def build_models(preset: str, device: str, dtype: torch.dtype, tokenizer):
    from transformers import FuyuConfig, FuyuForCausalLM

    text = dict(
        PRESETS[preset], hidden_act="relu2", max_position_embeddings=16384, layer_norm_eps=1e-5, qk_layernorm=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5},
    )  # fmt: skip
    config = FuyuConfig(text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("|SPEAKER|"))
    torch.manual_seed(0)
    with torch.device(device):
        reference = FuyuForCausalLM(config).to(dtype).eval()
    ours_config = config_from_hub(config.to_dict(), tokenizer.convert_tokens_to_ids("|NEWLINE|"))
    from vlm_patterns.conversion.key_mapping import KeyMap

    heads = ours_config.text_config.num_attention_heads
    rules = KeyMap(FUYU_RULES, splits=[split_interleaved_qkv(heads)])
    return reference, ours_sharing_weights(reference, FuyuPatternForConditionalGeneration, ours_config, rules, device)


def reference_image_part(image_processor, image) -> torch.Tensor:
    """transformers' image side of FuyuProcessor: resize, pad and normalise, then crop to whole patches and cut."""
    out = image_processor(image, return_tensors="np" if image_processor.backend == "pil" else "pt")
    height, width = int(out["image_unpadded_heights"][0][0]), int(out["image_unpadded_widths"][0][0])
    rows, cols = math.ceil(height / 30), math.ceil(width / 30)
    canvas = out["images"][0][0][:, : rows * 30, : cols * 30]
    return torch.as_tensor(image_processor.patchify_image(canvas[None]))


def benchmark_processor(report: Report, repeats: int) -> None:
    from transformers import FuyuImageProcessorPil
    from transformers.utils import is_torchvision_available

    image = photo_like_image(1920, 1080, seed=11)
    ours = FuyuPatternImageProcessor()
    pil = FuyuImageProcessorPil()
    ours_s, pil_s = paired_median_seconds(
        lambda: ours(image), lambda: reference_image_part(pil, image), repeats=repeats, block=5
    )
    report.add("image processor vs PIL backend, 1080x1920 photo", "ms/image", ours_s * 1e3, pil_s * 1e3, False, 2.0)
    if is_torchvision_available():
        from transformers import FuyuImageProcessor

        fast = FuyuImageProcessor()
        ours_s, fast_s = paired_median_seconds(
            lambda: ours(image), lambda: reference_image_part(fast, image), repeats=repeats, block=5
        )
        report.add("image processor vs torchvision backend", "ms/image", ours_s * 1e3, fast_s * 1e3, False, 2.0)
    else:
        report.notes.append(
            "transformers' torchvision backend is not measured here: torchvision does not import beside this torch "
            "(run this script in an environment with torchvision to add that row)."
        )


def run_processor(repeats: int) -> Report:
    report = Report("fuyu", "image processor only", "cpu", "float32")
    benchmark_processor(report, repeats=max(repeats, 10))
    return report


def run(preset: str, device: str, dtype: torch.dtype, new_tokens: int, repeats: int) -> Report:
    report = Report("fuyu", preset, device, str(dtype).removeprefix("torch."))
    tokenizer = build_fuyu_tokenizer()
    reference, ours = build_models(preset, device, dtype, tokenizer)
    processor = FuyuPatternProcessor(image_processor=FuyuPatternImageProcessor(), tokenizer=tokenizer)
    benchmark_processor(report, repeats=max(repeats, 10))

    inputs = processor(images=photo_like_image(1280, 720, seed=11), text="Generate a coco-style caption.\n").to(device)
    inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    prompt_tokens = inputs["input_ids"].shape[1]

    def generate(model, n, cache=None):
        options = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation=cache)
        return lambda: model.generate(**inputs, **options)

    def decode_rate(cache=None) -> list[float]:
        one = paired_median_seconds(generate(ours, 1, cache), generate(reference, 1, cache), device, repeats)
        many = paired_median_seconds(
            generate(ours, new_tokens + 1, cache), generate(reference, new_tokens + 1, cache), device, repeats
        )
        return [new_tokens / (m - o) for m, o in zip(many, one, strict=True)]

    with torch.inference_mode():
        prefill = paired_median_seconds(
            lambda: ours(**inputs, use_cache=True, logits_to_keep=1),
            lambda: reference(**inputs, use_cache=True, logits_to_keep=1),
            device,
            repeats,
        )
        decode = decode_rate()
        decode_static = decode_rate("static")
    report.add(
        f"prefill, {prompt_tokens} tokens of a 1280x720 image + prompt",
        "ms",
        prefill[0] * 1e3,
        prefill[1] * 1e3,
        False,
        1.0,
    )
    report.add(f"decode, {new_tokens} tokens, default (dynamic) cache", "tok/s", decode[0], decode[1], True, 1.0)
    report.add(f"decode, {new_tokens} tokens, static cache", "tok/s", decode_static[0], decode_static[1], True, 1.0)
    add_fast_path_rows(report, ours, reference, inputs, inputs, new_tokens, repeats, device, decode_target=1.0)
    if device == "cpu":
        peak, shard = conversion_memory()
        report.add(
            "conversion peak RSS above the start, vs the largest source shard", "MB", peak / 1e6, shard / 1e6, False
        )
        report.notes.append(
            "Conversion streams shard by shard: the peak stays near one shard whatever the model size; transformers' "
            "own Fuyu converter builds the whole model and loads the whole checkpoint (about 56 GB for fuyu-8b)."
        )
    return report


def conversion_memory() -> tuple[int, int]:
    """Convert a 6-shard Fuyu checkpoint in a fresh process; (peak RSS increase, largest shard) in bytes."""
    import tempfile

    from vlm_patterns.conversion.checkpoint_io import ShardWriter, iter_shard
    from vlm_patterns.conversion.tiny import build_tiny_fuyu

    with tempfile.TemporaryDirectory() as scratch:
        source = build_tiny_fuyu(Path(scratch) / "fuyu", hidden_size=1024, layers=8, num_heads=16)
        state = dict(iter_shard(source / "model.safetensors"))
        (source / "model.safetensors").unlink()
        writer = ShardWriter(source, max_shard_bytes=sum(t.numel() * 4 for t in state.values()) // 6 + 1)
        for key, tensor in state.items():
            writer.add(key, tensor)
        writer.finish()
        del state
        largest = max(p.stat().st_size for p in source.glob("*.safetensors"))
        script = (
            "import sys\nfrom conversion.fuyu import convert_fuyu\n"
            "def status(f):\n    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(f + ':'))\n"
            "open('/proc/self/clear_refs', 'w').write('5')\nbefore = status('VmRSS')\n"
            f"convert_fuyu({str(source)!r}, {str(Path(scratch) / 'out')!r}, max_shard_bytes={largest})\n"
            "print(status('VmHWM') - before)\n"
        )
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        return int(result.stdout.strip().splitlines()[-1]), largest
