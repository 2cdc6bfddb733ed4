"""Fuyu checkpoints (`adept/fuyu-8b`) -> ours, and back.

The Hub's config.json is flat (Persimmon's fields at the top). The decoder's attention stores q, k and v in one
`query_key_value` matrix, interleaved per head ([q_h, k_h, v_h] for each head h); we split it into our q_proj /
k_proj / v_proj while streaming, and interleave it again on export. Everything else is a rename. Streaming
keeps the peak near one shard (transformers' own converter holds the model twice: ~56 GB for fuyu-8b).
"""

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from vlm_patterns.modeling import FuyuPatternConfig, FuyuPatternForConditionalGeneration
from vlm_patterns.processing import FuyuPatternImageProcessor, FuyuPatternProcessor
from vlm_patterns.processing.image_ops import resample_code

from .checkpoint_io import (
    DEFAULT_SHARD_BYTES,
    source_processor_config,
    weight_files,
)
from .key_mapping import Gather, KeyMap, Split
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

LAYER = r"model\.language_model\.layers\.(\d+)"

# Hub layout -> ours; transformers 5.x's in-memory names (`model.language_model.*`) are accepted too.
FUYU_RULES = [
    (r"(?:model\.)?vision_embed_tokens\.(weight|bias)", r"model.vision_embed_tokens.\1"),
    (r"(?:language_model\.model|model\.language_model)\.embed_tokens\.weight", r"model.language_model.embed_tokens.weight"),
    (r"(?:language_model\.model|model\.language_model)\.final_layernorm\.(weight|bias)", r"model.language_model.norm.\1"),
    (r"(?:language_model\.model|model\.language_model)\.layers\.(\d+)\.self_attn\.query_key_value\.(weight|bias)",
     r"model.language_model.layers.\1.self_attn.query_key_value.\2"),
    (r"(?:language_model\.model|model\.language_model)\.layers\.(\d+)\.self_attn\.dense\.(weight|bias)",
     r"model.language_model.layers.\1.self_attn.o_proj.\2"),
    (r"(?:language_model\.model|model\.language_model)\.layers\.(\d+)\.self_attn\.(q_layernorm|k_layernorm)\.(weight|bias)",
     r"model.language_model.layers.\1.self_attn.\2.\3"),
    (r"(?:language_model\.model|model\.language_model)\.layers\.(\d+)\.mlp\.dense_h_to_4h\.(weight|bias)",
     r"model.language_model.layers.\1.mlp.up_proj.\2"),
    (r"(?:language_model\.model|model\.language_model)\.layers\.(\d+)\.mlp\.dense_4h_to_h\.(weight|bias)",
     r"model.language_model.layers.\1.mlp.down_proj.\2"),
    (r"(?:language_model\.model|model\.language_model)\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.(weight|bias)",
     r"model.language_model.layers.\1.\2.\3"),
    (r"(?:language_model\.)?lm_head\.weight", r"lm_head.weight"),
    (r".*\.rotary_emb\.inv_freq", None),
]  # fmt: skip

# Ours -> the Hub layout; q, k and v come back together as parts of one fused tensor.
EXPORT_RULES = [
    (r"model\.vision_embed_tokens\.(weight|bias)", r"vision_embed_tokens.\1"),
    (r"model\.language_model\.embed_tokens\.weight", r"language_model.model.embed_tokens.weight"),
    (r"model\.language_model\.norm\.(weight|bias)", r"language_model.model.final_layernorm.\1"),
    (LAYER + r"\.self_attn\.q_proj\.(weight|bias)", r"language_model.model.layers.\1.self_attn.query_key_value.\2#0"),
    (LAYER + r"\.self_attn\.k_proj\.(weight|bias)", r"language_model.model.layers.\1.self_attn.query_key_value.\2#1"),
    (LAYER + r"\.self_attn\.v_proj\.(weight|bias)", r"language_model.model.layers.\1.self_attn.query_key_value.\2#2"),
    (LAYER + r"\.self_attn\.o_proj\.(weight|bias)", r"language_model.model.layers.\1.self_attn.dense.\2"),
    (
        LAYER + r"\.self_attn\.(q_layernorm|k_layernorm)\.(weight|bias)",
        r"language_model.model.layers.\1.self_attn.\2.\3",
    ),
    (LAYER + r"\.mlp\.up_proj\.(weight|bias)", r"language_model.model.layers.\1.mlp.dense_h_to_4h.\2"),
    (LAYER + r"\.mlp\.down_proj\.(weight|bias)", r"language_model.model.layers.\1.mlp.dense_4h_to_h.\2"),
    (LAYER + r"\.(input_layernorm|post_attention_layernorm)\.(weight|bias)", r"language_model.model.layers.\1.\2.\3"),
    (r"lm_head\.weight", r"language_model.lm_head.weight"),
]


def split_interleaved_qkv(num_heads: int) -> Split:
    """One fused `query_key_value` tensor ([q_h, k_h, v_h] per head) -> q_proj, k_proj, v_proj."""

    def split(key: str, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        base = key.rsplit(".query_key_value.", 1)[0]
        kind = key.rsplit(".", 1)[1]  # weight or bias
        per_head = fused.view(num_heads, 3, -1, *fused.shape[1:])  # (H, 3, d[, D])
        return {f"{base}.{name}_proj.{kind}": per_head[:, i].reshape(-1, *fused.shape[1:]).contiguous()
                for i, name in enumerate("qkv")}  # fmt: skip

    return Split(r".*\.self_attn\.query_key_value\.(weight|bias)", split)


def interleave_qkv(num_heads: int) -> Gather:
    """q, k, v -> the fused per-head interleaved tensor, exactly as the checkpoint stores it."""

    def combine(parts: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = (p.view(num_heads, -1, *p.shape[1:]) for p in parts)  # (H, d[, D])
        return torch.stack([q, k, v], dim=1).reshape(-1, *parts[0].shape[1:])

    return Gather(r".*\.self_attn\.query_key_value\.(weight|bias)", 3, combine)


def config_from_hub(hub_config: dict, image_newline_token_id: int = 71019) -> FuyuPatternConfig:
    """Our config from adept/fuyu-8b's config.json (parsed by transformers' FuyuConfig, flat or nested); the
    newline token is not in that file, so it comes from the tokenizer."""
    from transformers import FuyuConfig

    hf = FuyuConfig.from_dict(hub_config)
    text = hf.text_config
    rope = dict(text.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise NotImplementedError(f"RoPE scaling {rope['rope_type']!r} is not implemented by the shared decoder")
    if text.model_type != "persimmon":
        raise NotImplementedError(
            f"Fuyu's language model is {text.model_type!r}; the shared decoder implements Persimmon here"
        )
    return FuyuPatternConfig(
        text_config=dict(
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=text.num_attention_heads,
            max_position_embeddings=text.max_position_embeddings,
            norm_type="layernorm",
            norm_eps=text.layer_norm_eps,
            mlp_type="plain",
            hidden_act=text.hidden_act,
            qkv_bias=True,
            output_bias=True,
            mlp_bias=True,
            qk_norm=bool(text.qk_layernorm),
            rope_theta=float(rope.get("rope_theta", 25000.0)),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", 0.5)),
            pad_token_id=text.pad_token_id,
            bos_token_id=text.bos_token_id,
            eos_token_id=text.eos_token_id,
        ),  # fmt: skip
        patch_size=hf.patch_size,
        num_channels=hf.num_channels,
        image_token_id=hf.image_token_id,
        image_newline_token_id=image_newline_token_id,
        tie_word_embeddings=bool(hub_config.get("tie_word_embeddings", False)),
    )


def config_to_hub(config: FuyuPatternConfig) -> dict:
    """A flat config.json in adept/fuyu-8b's format."""
    if config.num_position_embeddings:
        raise ValueError(
            f"This Fuyu adds learned positions to its patches (num_position_embeddings={config.num_position_embeddings}); "
            "Fuyu's Hub layout has no place for them, so it cannot be exported"
        )
    text = config.text_config
    if (
        text.norm_type != "layernorm"
        or text.mlp_type != "plain"
        or not (text.qkv_bias and text.output_bias and text.mlp_bias)
    ):
        raise NotImplementedError("Only a Persimmon language model exports to Fuyu's layout")
    return dict(
        architectures=["FuyuForCausalLM"], model_type="fuyu", vocab_size=text.vocab_size, hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads, hidden_act=text.hidden_act,
        max_position_embeddings=text.max_position_embeddings, layer_norm_eps=text.norm_eps, qk_layernorm=text.qk_norm,
        rope_theta=text.rope_theta, partial_rotary_factor=text.partial_rotary_factor, patch_size=config.patch_size,
        num_channels=config.num_channels, image_size=config.patch_size * 10, image_token_id=config.image_token_id,
        tie_word_embeddings=config.tie_word_embeddings, pad_token_id=text.pad_token_id, bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id, torch_dtype=str(config.dtype).removeprefix("torch.") if config.dtype else None,
    )  # fmt: skip


def image_processor_from_source(folder: Path) -> FuyuPatternImageProcessor:
    source = source_processor_config(folder, "image_processor")
    keys = [
        "size",
        "patch_size",
        "resample",
        "padding_value",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
    ]
    return FuyuPatternImageProcessor(**{k: source[k] for k in keys if k in source})


def convert_fuyu(
    source: str | Path,
    output: str | Path,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Convert a Fuyu checkpoint (folder or Hub id, in adept/fuyu-8b's layout) into ours at `output`."""
    folder, hub_config = open_source(source, output, overwrite, "fuyu", "Fuyu")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = config_from_hub(hub_config, tokenizer.convert_tokens_to_ids("|NEWLINE|"))
    config.dtype = source_dtype(dtype, hub_config)
    model = meta_model(FuyuPatternForConditionalGeneration, config)
    processor = FuyuPatternProcessor(image_processor=image_processor_from_source(folder), tokenizer=tokenizer)
    key_map = KeyMap(FUYU_RULES, splits=[split_interleaved_qkv(config.text_config.num_attention_heads)])
    tensors = key_map.apply(source_tensors(weight_files(folder), "converting Fuyu shards"))
    generation_config = source_generation_config(folder)
    return write_converted(
        output, overwrite, [folder], tensors, model, processor, generation_config, dtype, max_shard_bytes
    )


def export_fuyu(
    ours: str | Path, output: str | Path, *, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> Path:
    """Write our Fuyu checkpoint in adept/fuyu-8b's layout (fused QKV again); tensors are bit-identical."""
    folder = open_ours(ours, output, overwrite)
    config = FuyuPatternConfig.from_pretrained(folder)
    hub_config = config_to_hub(config)
    processor = FuyuPatternProcessor.from_pretrained(folder)
    ip = processor.image_processor
    image_json = dict(
        image_processor_type="FuyuImageProcessor", size=ip.size, patch_size={"height": ip.patch_size, "width": ip.patch_size},
        resample=resample_code(ip.resample), padding_value=float(ip.padding_value),
        padding_mode="constant", do_resize=True, do_pad=True, do_rescale=ip.do_rescale, rescale_factor=ip.rescale_factor,
        do_normalize=ip.do_normalize, image_mean=ip.image_mean, image_std=ip.image_std,
    )  # fmt: skip
    key_map = KeyMap(EXPORT_RULES, gathers=[interleave_qkv(config.text_config.num_attention_heads)])

    def write_files(staging: Path) -> None:
        (staging / "config.json").write_text(
            json.dumps({k: v for k, v in hub_config.items() if v is not None}, indent=2)
        )
        (staging / "preprocessor_config.json").write_text(json.dumps(image_json, indent=2))
        processor.tokenizer.save_pretrained(staging)

    return write_exported(folder, output, overwrite, key_map, max_shard_bytes, write_files)
