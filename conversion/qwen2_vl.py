"""Qwen2-VL checkpoints (`Qwen/Qwen2-VL-2B-Instruct`, `-7B-Instruct`) -> ours, and back.

The Hub's config.json is flat (the language model's fields at the top level, legacy `rope_scaling` with
`mrope_section`, a minimal `vision_config`); transformers' own parser reads it, and we map the result. The
2B model ties its output layer to the embeddings and stores no `lm_head.weight`; the 7B stores one.
"""

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from vlm_patterns.modeling import Qwen2VLPatternConfig, Qwen2VLPatternForConditionalGeneration
from vlm_patterns.processing import Qwen2VLPatternImageProcessor, Qwen2VLPatternProcessor
from vlm_patterns.processing.image_ops import resample_code
from vlm_patterns.processing.processing_qwen2_vl import QWEN2_VL_CHAT_TEMPLATE

from .chat_templates import choose_chat_template
from .checkpoint_io import (
    DEFAULT_SHARD_BYTES,
    read_json,
    source_processor_config,
    weight_files,
)
from .key_mapping import KeyMap
from .pipeline import (
    meta_model,
    open_ours,
    open_source,
    source_dtype,
    source_generation_config,
    source_tensors,
    write_converted,
    write_exported,
)
from .text_models import decoder_fields, transformers_text_config

# Hub layout -> ours. Also accepted: transformers 5.x's in-memory names, and the doubled `model.language_model.model.`
# that transformers 5.10-5.23 wrote by mistake.
QWEN2_VL_RULES = [
    (r"model\.language_model\.model\.(.*)", r"model.language_model.\1"),
    (r"model\.language_model\.(.*)", r"model.language_model.\1"),
    (r"model\.visual\.(.*)", r"model.visual.\1"),
    (r"visual\.(.*)", r"model.visual.\1"),
    (r"model\.(.*)", r"model.language_model.\1"),
    (r"lm_head\.weight", r"lm_head.weight"),
    (r".*\.rotary_emb\.inv_freq", None),
]

# Ours -> the Hub layout.
EXPORT_RULES = [
    (r"model\.language_model\.(.*)", r"model.\1"),
    (r"model\.visual\.(.*)", r"visual.\1"),
    (r"lm_head\.weight", r"lm_head.weight"),
]

PROCESSOR_KEYS = ["patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "rescale_factor",
                  "do_rescale", "do_normalize", "resample"]  # fmt: skip


def config_from_hub(hub_config: dict) -> Qwen2VLPatternConfig:
    """Our config from a Qwen2-VL config.json (flat Hub format or transformers' nested one)."""
    from transformers import Qwen2VLConfig

    hf = Qwen2VLConfig.from_dict(hub_config)
    text = decoder_fields(hf.text_config)
    if not text["mrope_section"]:
        raise ValueError("This Qwen2-VL config has no mrope_section (rope_scaling / rope_parameters)")
    vision = hf.vision_config
    tie = bool(hub_config.get("tie_word_embeddings", getattr(hf.text_config, "tie_word_embeddings", False)))
    return Qwen2VLPatternConfig(
        vision_config=dict(
            depth=vision.depth,
            embed_dim=vision.embed_dim,
            num_heads=vision.num_heads,
            mlp_ratio=float(vision.mlp_ratio),
            hidden_act=vision.hidden_act,
            in_channels=vision.in_channels,
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            spatial_merge_size=vision.spatial_merge_size,
            out_hidden_size=vision.hidden_size,
            rope_theta=float((vision.rope_parameters or {}).get("rope_theta", 10000.0)),
        ),  # fmt: skip
        text_config=text,
        image_token_id=hf.image_token_id,
        video_token_id=hf.video_token_id,
        vision_start_token_id=hf.vision_start_token_id,
        vision_end_token_id=hf.vision_end_token_id,
        tie_word_embeddings=tie,
    )


def config_to_hub(config: Qwen2VLPatternConfig):
    """transformers' Qwen2VLConfig with our architecture."""
    from transformers import Qwen2VLConfig

    vision = config.vision_config
    if vision.num_position_embeddings:
        raise ValueError(
            f"This Qwen2-VL has learned vision positions (num_position_embeddings={vision.num_position_embeddings}, "
            "as Qwen3-VL adds them); Qwen2-VL's Hub layout has no place for them, so it cannot be exported"
        )
    hf = Qwen2VLConfig(
        text_config=transformers_text_config(config.text_config, "qwen2_vl_text", config.tie_word_embeddings).to_dict(),
        vision_config=dict(
            depth=vision.depth,
            embed_dim=vision.embed_dim,
            num_heads=vision.num_heads,
            mlp_ratio=int(vision.mlp_ratio) if float(vision.mlp_ratio).is_integer() else vision.mlp_ratio,
            hidden_act=vision.hidden_act,
            in_channels=vision.in_channels,
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            spatial_merge_size=vision.spatial_merge_size,
            hidden_size=vision.out_hidden_size,
            rope_parameters={"rope_type": "axial", "rope_theta": vision.rope_theta},
        ),  # fmt: skip
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    hf.architectures = ["Qwen2VLForConditionalGeneration"]
    hf.dtype = config.dtype
    return hf


def _pixel_budget(processor_config: dict) -> tuple[int, int]:
    size = processor_config.get("size") or {}
    low = processor_config.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
    high = processor_config.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
    return int(low), int(high)


def image_processor_from_source(folder: Path) -> Qwen2VLPatternImageProcessor:
    """Our image processor with the source's pixel budgets (images and, if present, video frames)."""
    image_config = source_processor_config(folder, "image_processor")
    options = {k: image_config[k] for k in PROCESSOR_KEYS if k in image_config}
    options["min_pixels"], options["max_pixels"] = _pixel_budget(image_config)
    video_config = source_processor_config(folder, "video_processor", required=False)
    if video_config:
        options["video_min_pixels"], options["video_max_pixels"] = _pixel_budget(video_config)
    return Qwen2VLPatternImageProcessor(**options)


def _chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").exists():
        return read_json(folder / "chat_template.json")["chat_template"]
    return read_json(folder / "tokenizer_config.json").get("chat_template")


def convert_qwen2_vl(
    source: str | Path,
    output: str | Path,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Convert a Qwen2-VL checkpoint (folder or Hub id, Hub layout) into ours at `output`."""
    folder, hub_config = open_source(source, output, overwrite, "qwen2_vl", "Qwen2-VL")
    config = config_from_hub(hub_config)
    config.dtype = source_dtype(dtype, hub_config)
    model = meta_model(Qwen2VLPatternForConditionalGeneration, config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = Qwen2VLPatternProcessor(
        image_processor=image_processor_from_source(folder),
        tokenizer=tokenizer,
        chat_template=choose_chat_template(
            _chat_template(folder), QWEN2_VL_CHAT_TEMPLATE, tokenizer.special_tokens_map
        ),
    )
    tensors = KeyMap(QWEN2_VL_RULES).apply(source_tensors(weight_files(folder), "converting Qwen2-VL shards"))
    generation_config = source_generation_config(folder)
    return write_converted(
        output, overwrite, [folder], tensors, model, processor, generation_config, dtype, max_shard_bytes
    )


def export_qwen2_vl(
    ours: str | Path, output: str | Path, *, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> Path:
    """Write our Qwen2-VL checkpoint in the Hub's layout (transformers, vLLM and SGLang load it); bit-exact tensors."""
    folder = open_ours(ours, output, overwrite)
    config = Qwen2VLPatternConfig.from_pretrained(folder)
    hf_config = config_to_hub(config)
    processor = Qwen2VLPatternProcessor.from_pretrained(folder)
    ip = processor.image_processor
    resample = resample_code(ip.resample)
    common = dict(
        patch_size=ip.patch_size, temporal_patch_size=ip.temporal_patch_size, merge_size=ip.merge_size,
        image_mean=ip.image_mean, image_std=ip.image_std, rescale_factor=ip.rescale_factor, do_rescale=ip.do_rescale,
        do_normalize=ip.do_normalize, do_resize=True, do_convert_rgb=True, resample=resample,
    )  # fmt: skip
    image_json = dict(common, image_processor_type="Qwen2VLImageProcessor", min_pixels=ip.min_pixels, max_pixels=ip.max_pixels,
                      size={"shortest_edge": ip.min_pixels, "longest_edge": ip.max_pixels})  # fmt: skip
    video_json = dict(common, video_processor_type="Qwen2VLVideoProcessor", min_pixels=ip.video_min_pixels,
                      max_pixels=ip.video_max_pixels, size={"shortest_edge": ip.video_min_pixels, "longest_edge": ip.video_max_pixels})  # fmt: skip

    def write_files(staging: Path) -> None:
        hf_config.save_pretrained(staging)
        (staging / "preprocessor_config.json").write_text(json.dumps(image_json, indent=2))
        (staging / "video_preprocessor_config.json").write_text(json.dumps(video_json, indent=2))
        processor.tokenizer.save_pretrained(staging)
        (staging / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}, indent=2))

    return write_exported(folder, output, overwrite, KeyMap(EXPORT_RULES), max_shard_bytes, write_files)
