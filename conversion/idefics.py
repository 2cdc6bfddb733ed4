"""IDEFICS checkpoints (`HuggingFaceM4/idefics-9b`, `-9b-instruct`, `-80b`) -> our Flamingo pattern, and back.

IDEFICS was trained with transformers' own code, so its names are nearly ours. Two things change:
- Decoupled vocabulary: IDEFICS keeps its added tokens (`<fake_token_around_image>`, `<image>`) in separate
  tensors (`embed_tokens.additional_embedding`, `lm_head.additional_fc`) so they can train while the rest is
  frozen. We store one embedding and one head, the extra rows appended (same logits: IDEFICS concatenates
  them too); export splits them again.
- The decoder's tensors move under `language_model.`; the gated blocks, resampler and ViT keep their names.
"""

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from vlm_patterns.modeling import FlamingoPatternConfig, FlamingoPatternForConditionalGeneration
from vlm_patterns.processing import FlamingoPatternImageProcessor, FlamingoPatternProcessor
from vlm_patterns.processing.image_ops import resample_code
from vlm_patterns.processing.processing_flamingo import flamingo_chat_template

from .checkpoint_io import (
    DEFAULT_SHARD_BYTES,
    weight_files,
)
from .key_mapping import Gather, KeyMap, Split
from .pipeline import (
    meta_model,
    open_ours,
    open_source,
    source_chat_template,
    source_dtype,
    source_generation_config,
    source_image_config,
    source_tensors,
    write_converted,
    write_exported,
)

FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE = "<fake_token_around_image>", "<image>", "<end_of_utterance>"

EMBED, HEAD = "model.language_model.embed_tokens.weight", "lm_head.weight"


def idefics_rules(decoupled: bool) -> list[tuple[str, str | None]]:
    """IDEFICS layout -> ours. With extra tokens the embedding and head arrive in two parts each (`#0`, `#1`)."""
    base, extra = (EMBED + "#0", EMBED + "#1") if decoupled else (EMBED, None)
    head, head_extra = (HEAD + "#0", HEAD + "#1") if decoupled else (HEAD, None)
    rules = [
        (r"model\.embed_tokens\.weight", base),
        (r"model\.embed_tokens\.additional_embedding\.weight", extra),
        (r"lm_head\.weight", head),
        (r"lm_head\.additional_fc\.weight", head_extra),
        (r"model\.(layers\..*|norm\.weight)", r"model.language_model.\1"),
        (r"model\.vision_model\.embeddings\.position_ids", None),
        (r"model\.(vision_model|perceiver_resampler|gated_cross_attn_layers)\.(.*)", r"model.\1.\2"),
        (r".*\.rotary_emb\.inv_freq", None),
    ]
    return [(pattern, target) for pattern, target in rules if target is not None or "additional" not in pattern]


def concatenate_vocabulary() -> list[Gather]:
    """The frozen rows and the added rows -> one tensor (added rows last, where their token ids point)."""
    return [
        Gather(pattern, 2, lambda parts: torch.cat(parts, dim=0))
        for pattern in (EMBED.replace(".", r"\."), HEAD.replace(".", r"\."))
    ]


EXPORT_RULES = [
    (r"model\.language_model\.embed_tokens\.weight", "model.embed_tokens.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"model\.language_model\.(layers\..*|norm\.weight)", r"model.\1"),
    (r"model\.(vision_model|perceiver_resampler|gated_cross_attn_layers)\.(.*)", r"model.\1.\2"),
]


def split_vocabulary(base_vocab: int) -> list[Split]:
    """Export: our single embedding and head -> IDEFICS's frozen part and `additional_*` part."""
    return [
        Split(r"model\.embed_tokens\.weight", lambda key, t: {
            key: t[:base_vocab].contiguous(), "model.embed_tokens.additional_embedding.weight": t[base_vocab:].contiguous()}),
        Split(r"lm_head\.weight", lambda key, t: {
            key: t[:base_vocab].contiguous(), "lm_head.additional_fc.weight": t[base_vocab:].contiguous()}),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Configs


def config_from_idefics(hub_config: dict, image_token_id: int) -> FlamingoPatternConfig:
    """Our config from an IDEFICS config.json (parsed by transformers' IdeficsConfig, so its defaults apply)."""
    from transformers import IdeficsConfig

    hf = IdeficsConfig.from_dict(hub_config)
    rope = dict(hf.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise NotImplementedError(f"RoPE scaling {rope['rope_type']!r} is not implemented by the shared decoder")
    vision, perceiver = hf.vision_config, hf.perceiver_config
    image_size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    interval = hf.cross_layer_interval
    return FlamingoPatternConfig(
        vision_config=dict(
            hidden_size=vision.embed_dim, intermediate_size=vision.intermediate_size,
            num_hidden_layers=vision.num_hidden_layers, num_attention_heads=vision.num_attention_heads,
            num_channels=vision.num_channels, image_size=image_size, patch_size=vision.patch_size,
            hidden_act=vision.hidden_act, layer_norm_eps=vision.layer_norm_eps,
        ),
        text_config=dict(
            vocab_size=hf.vocab_size + hf.additional_vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=hf.num_attention_heads, max_position_embeddings=hf.max_position_embeddings,
            norm_eps=hf.rms_norm_eps, hidden_act=hf.hidden_act, rope_theta=float(rope.get("rope_theta", 10000.0)),
            pad_token_id=hf.pad_token_id, bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id,
        ),
        vision_feature_select_strategy="full",
        use_resampler=bool(hf.use_resampler),
        num_latents=perceiver.resampler_n_latents, resampler_depth=perceiver.resampler_depth,
        resampler_num_heads=perceiver.resampler_n_heads, resampler_head_dim=perceiver.resampler_head_dim,
        resampler_qk_norm=bool(perceiver.qk_layer_norms_perceiver), resampler_hidden_act="relu",
        # IDEFICS builds num_layers // interval blocks and places block k before layer k * interval.
        cross_attn_layer_ids=[k * interval for k in range(hf.num_hidden_layers // interval)],
        cross_attn_norm_type="rmsnorm", cross_attn_norm_eps=hf.rms_norm_eps, cross_attn_qk_norm=bool(hf.qk_layer_norms),
        cross_attn_mlp_type="gated", cross_attn_hidden_act=hf.hidden_act,
        gate_shape="scalar" if hf.alpha_type == "float" else "vector",
        image_token_id=image_token_id, media_reset_token_id=hf.eos_token_id,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
    )  # fmt: skip


def config_to_idefics(config: FlamingoPatternConfig, base_vocab: int) -> dict:
    """IDEFICS's config.json for our config; refuses what IdeficsForVisionText2Text cannot express."""
    from transformers import IdeficsConfig

    text, vision = config.text_config, config.vision_config
    ids = config.cross_attn_layer_ids
    interval = ids[1] - ids[0] if len(ids) > 1 else text.num_hidden_layers
    problems = [
        (config.vision_feature_select_strategy != "full", "the resampler reads all ViT tokens"),
        (config.resampler_hidden_act != "relu" or config.resampler_mlp_ratio != 4, "a ReLU resampler MLP of width 4x"),
        (config.cross_attn_norm_type != "rmsnorm" or config.cross_attn_mlp_type != "gated", "RMSNorm + SwiGLU blocks"),
        (ids != [k * interval for k in range(text.num_hidden_layers // interval)], "blocks before every n-th layer from 0"),
        (config.cross_attn_num_heads != text.num_attention_heads or config.cross_attn_head_dim != text.head_dim,
         "cross-attention heads equal to the decoder's"),
        (config.cross_attn_intermediate_size != text.intermediate_size, "block MLPs as wide as the decoder's"),
        (text.num_key_value_heads != text.num_attention_heads or text.mlp_type != "gated" or text.qkv_bias,
         "a Llama decoder without GQA or biases"),
    ]  # fmt: skip
    for failed, requirement in problems:
        if failed:
            raise NotImplementedError(f"This model has no IDEFICS equivalent: IDEFICS needs {requirement}")
    hf = IdeficsConfig(
        vocab_size=base_vocab, additional_vocab_size=text.vocab_size - base_vocab, hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads, max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.norm_eps, hidden_act=text.hidden_act, cross_layer_interval=interval,
        qk_layer_norms=config.cross_attn_qk_norm, alpha_type="float" if config.gate_shape == "scalar" else "vector",
        use_resampler=config.use_resampler, pad_token_id=text.pad_token_id, bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id, tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": text.rope_theta},
        vision_config=dict(
            embed_dim=vision.hidden_size, image_size=vision.image_size, patch_size=vision.patch_size,
            intermediate_size=vision.intermediate_size, num_hidden_layers=vision.num_hidden_layers,
            num_attention_heads=vision.num_attention_heads, num_channels=vision.num_channels,
            hidden_act=vision.hidden_act, layer_norm_eps=vision.layer_norm_eps,
        ),
        perceiver_config=dict(
            use_resampler=config.use_resampler, resampler_n_latents=config.num_latents,
            resampler_depth=config.resampler_depth, resampler_n_heads=config.resampler_num_heads,
            resampler_head_dim=config.resampler_head_dim, qk_layer_norms_perceiver=config.resampler_qk_norm,
        ),
    )  # fmt: skip
    hf.architectures = ["IdeficsForVisionText2Text"]
    hf.dtype = config.dtype
    return hf


def build_processor(source_folder: Path, tokenizer, visual_tokens_per_image: int) -> FlamingoPatternProcessor:
    """IDEFICS's prompt format: `<s>` as text, each run of images wrapped in `<fake_token_around_image>`, and
    IDEFICS-instruct's `<end_of_utterance>` in the chat template when the tokenizer has it."""
    image_config = source_image_config(source_folder)
    size = image_config.get("size") or {"height": image_config["image_size"], "width": image_config["image_size"]}
    image_processor = FlamingoPatternImageProcessor(
        size={"height": size["height"], "width": size["width"]},
        resample=image_config.get("resample", 3),
        image_mean=image_config.get("image_mean"),
        image_std=image_config.get("image_std"),
        rescale_factor=image_config.get("rescale_factor", 1 / 255),
    )
    has_eou = tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE) not in (None, tokenizer.unk_token_id)
    return FlamingoPatternProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_token=IMAGE_TOKEN,
        fake_image_token=FAKE_IMAGE_TOKEN,
        bos_as_text=True,
        visual_tokens_per_image=visual_tokens_per_image,
        chat_template=source_chat_template(source_folder)
        or flamingo_chat_template(END_OF_UTTERANCE if has_eou else ""),
    )


# ----------------------------------------------------------------------------------------------------------
# Conversion


def convert_idefics(
    source: str | Path,
    output: str | Path,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Convert an IDEFICS checkpoint (folder or Hub id, in `HuggingFaceM4/idefics-9b`'s layout) into ours."""
    folder, hub_config = open_source(source, output, overwrite, "idefics", "IDEFICS")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for token in (IMAGE_TOKEN, FAKE_IMAGE_TOKEN):
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise ValueError(f"The tokenizer in {source} has no {token} token")
    config = config_from_idefics(hub_config, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    config.dtype = source_dtype(dtype, hub_config)
    model = meta_model(FlamingoPatternForConditionalGeneration, config)
    decoupled = hub_config.get("additional_vocab_size", 0) > 0
    key_map = KeyMap(idefics_rules(decoupled), gathers=concatenate_vocabulary() if decoupled else [])
    processor = build_processor(folder, tokenizer, config.num_visual_tokens)
    tensors = key_map.apply(source_tensors(weight_files(folder), "converting IDEFICS shards"))
    generation_config = source_generation_config(folder)
    return write_converted(
        output, overwrite, [folder], tensors, model, processor, generation_config, dtype, max_shard_bytes
    )


def export_idefics(
    ours: str | Path, output: str | Path, *, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> Path:
    """Write our Flamingo checkpoint (IDEFICS variant) in IDEFICS's layout, with `IdeficsProcessor` files.
    Tensors are copied bit for bit; the vocabulary is split back into frozen and additional rows."""
    from transformers import IdeficsImageProcessorPil, IdeficsProcessor

    folder = open_ours(ours, output, overwrite)
    config = FlamingoPatternConfig.from_pretrained(folder)
    processor = FlamingoPatternProcessor.from_pretrained(folder)
    tokenizer = processor.tokenizer
    if processor.fake_image_token is None:
        raise NotImplementedError("Only the IDEFICS variant (with <fake_token_around_image>) exports to IDEFICS")
    added = [tokenizer.convert_tokens_to_ids(t) for t in (FAKE_IMAGE_TOKEN, IMAGE_TOKEN)]
    base_vocab = min(added)
    hf_config = config_to_idefics(config, base_vocab)
    ip = processor.image_processor
    hf_processor = IdeficsProcessor(
        image_processor=IdeficsImageProcessorPil(
            image_size=ip.size["height"], image_mean=ip.image_mean, image_std=ip.image_std,
            resample=resample_code(ip.resample),
        ),
        tokenizer=tokenizer,
    )  # fmt: skip
    key_map = KeyMap(
        EXPORT_RULES, splits=split_vocabulary(base_vocab) if base_vocab < config.text_config.vocab_size else []
    )

    def write_files(staging: Path) -> None:
        hf_config.save_pretrained(staging)
        hf_processor.save_pretrained(staging)
        if processor.chat_template:
            (staging / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))

    return write_exported(folder, output, overwrite, key_map, max_shard_bytes, write_files)
