"""OpenFlamingo -> our Flamingo pattern: three sources merged into one checkpoint.

OpenFlamingo's `checkpoint.pt` holds only what it trained (the resampler, the gated blocks and the language
model's input embeddings, grown by `<|endofchunk|>`, `<image>` and maybe `<PAD>`); the frozen CLIP ViT-L/14 and
the base language model come from their own repositories. We take, in this order of priority:
1. `checkpoint.pt` (OpenFlamingo names: `perceiver.layers.N.0.to_kv`, `lang_encoder.<layers>.I.gated_cross_attn_layer.*`),
2. the base language model (`--language`, a transformers Llama folder or Hub id),
3. the CLIP vision tower (`--vision`, transformers' layout, e.g. `openai/clip-vit-large-patch14`).
Fused `to_kv` matrices are split into our k_proj / v_proj. OpenFlamingo drops CLIP's class token and puts a
block before layer i when (i + 1) % n == 0; our config records both as fields.

Which public checkpoints convert: those whose base LM the shared decoder implements, i.e. Llama.
`openflamingo/OpenFlamingo-9B-deprecated` (LLaMA-7B, n = 4) does. The v2 releases build on MPT
(`OpenFlamingo-3B-vitl-mpt1b`, `-9B-vitl-mpt7b`, and their -langinstruct versions) or RedPajama/GPT-NeoX
(`OpenFlamingo-4B-vitl-rpj3b`); they are refused with the reason.

The output embedding gets rows for the added tokens only if `checkpoint.pt` has them; otherwise (OpenFlamingo
never trained them) they are drawn, seeded, from N(0, initializer_range), the distribution transformers'
`resize_token_embeddings` used when OpenFlamingo was trained, so that conversion is reproducible.
"""

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from vlm_patterns.modeling import FlamingoPatternConfig, FlamingoPatternForConditionalGeneration
from vlm_patterns.processing import FlamingoPatternImageProcessor, FlamingoPatternProcessor

from .checkpoint_io import DEFAULT_SHARD_BYTES, check_output, resolve_source, weight_files
from .key_mapping import KeyMap, Split
from .pipeline import (
    meta_model,
    source_image_config,
    source_tensors,
    write_converted,
)
from .text_models import decoder_fields

END_OF_CHUNK, IMAGE_TOKEN, PAD_TOKEN = "<|endofchunk|>", "<image>", "<PAD>"
# OpenFlamingo's fixed attention shapes (helpers.py: dim_head=64, heads=8) for the resampler and the blocks.
HEAD_DIM = 64

# Where OpenFlamingo's language wrapper keeps the decoder layers, by base model.
DECODER_LAYERS = {"llama": "model.layers", "mpt": "transformer.blocks", "gpt_neox": "gpt_neox.layers"}

PERCEIVER_RULES = [
    (r"perceiver\.latents", r"model.perceiver_resampler.latents"),
    (r"perceiver\.norm\.(weight|bias)", r"model.perceiver_resampler.layer_norm.\1"),
    (r"perceiver\.layers\.(\d+)\.0\.norm_media\.(weight|bias)", r"model.perceiver_resampler.blocks.\1.0.context_layer_norm.\2"),
    (r"perceiver\.layers\.(\d+)\.0\.norm_latents\.(weight|bias)", r"model.perceiver_resampler.blocks.\1.0.latents_layer_norm.\2"),
    (r"perceiver\.layers\.(\d+)\.0\.to_q\.weight", r"model.perceiver_resampler.blocks.\1.0.q_proj.weight"),
    (r"perceiver\.layers\.(\d+)\.0\.to_kv\.weight", r"model.perceiver_resampler.blocks.\1.0.to_kv.weight"),
    (r"perceiver\.layers\.(\d+)\.0\.to_out\.weight", r"model.perceiver_resampler.blocks.\1.0.output_proj.weight"),
    (r"perceiver\.layers\.(\d+)\.1\.0\.(weight|bias)", r"model.perceiver_resampler.blocks.\1.1.ln.\2"),
    (r"perceiver\.layers\.(\d+)\.1\.1\.weight", r"model.perceiver_resampler.blocks.\1.1.fc.weight"),
    (r"perceiver\.layers\.(\d+)\.1\.3\.weight", r"model.perceiver_resampler.blocks.\1.1.c_proj.weight"),
]  # fmt: skip

# Inside one gated block: OpenFlamingo's names -> ours (IDEFICS's).
BLOCK_PARTS = [
    (r"attn_gate", r"alpha_cross_attn"),
    (r"ff_gate", r"alpha_dense"),
    (r"attn\.norm\.(weight|bias)", r"input_layernorm.\1"),
    (r"attn\.to_q\.weight", r"cross_attn.q_proj.weight"),
    (r"attn\.to_kv\.weight", r"cross_attn.to_kv.weight"),
    (r"attn\.to_out\.weight", r"cross_attn.o_proj.weight"),
    (r"ff\.0\.(weight|bias)", r"post_attention_layernorm.\1"),
    (r"ff\.1\.weight", r"mlp.up_proj.weight"),
    (r"ff\.3\.weight", r"mlp.down_proj.weight"),
]


def checkpoint_rules(block_layers: list[int]) -> list[tuple[str, str | None]]:
    """checkpoint.pt -> ours. Block k is the one OpenFlamingo placed in decoder layer `block_layers[k]`."""
    prefix = r"lang_encoder\.model\.layers\."
    rules = list(PERCEIVER_RULES)
    for k, layer in enumerate(block_layers):
        for part, target in BLOCK_PARTS:
            rules.append(
                (prefix + f"{layer}\\.gated_cross_attn_layer\\." + part, f"model.gated_cross_attn_layers.{k}." + target)
            )
    rules += [
        # A full (not trainable-only) state dict also holds the wrapped decoder layers and two aliases of them.
        (prefix + r"(\d+)\.decoder_layer\.(.*)", r"model.language_model.layers.\1.\2"),
        (r"lang_encoder\.(gated_cross_attn_layers|old_decoder_blocks)\..*", None),
        (r"lang_encoder\.model\.(embed_tokens\.weight|norm\.weight)", r"model.language_model.\1"),
        (r"lang_encoder\.lm_head\.weight", r"lm_head.weight"),
        (r"vision_encoder\..*", None),  # open_clip's copy of the frozen tower; --vision provides it
        (r".*\.rotary_emb\.inv_freq", None),
    ]  # fmt: skip
    return rules


LLAMA_RULES = [
    (r"model\.(.*)", r"model.language_model.\1"),
    (r"lm_head\.weight", r"lm_head.weight"),
    (r".*\.rotary_emb\.inv_freq", None),
]

CLIP_RULES = [
    (r"vision_model\.embeddings\.position_ids", None),
    (r"vision_model\.(.*)", r"model.vision_model.\1"),
    (r"(text_model|visual_projection|text_projection|logit_scale).*", None),
]


def split_fused_kv() -> Split:
    """`to_kv` (OpenFlamingo computes k, v = to_kv(x).chunk(2, dim=-1)) -> k_proj and v_proj."""

    def split(key: str, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        base = key.removesuffix("to_kv.weight")
        keys, values = fused.chunk(2, dim=0)
        return {base + "k_proj.weight": keys.contiguous(), base + "v_proj.weight": values.contiguous()}

    return Split(r".*\.to_kv\.weight", split)


# ----------------------------------------------------------------------------------------------------------
# Reading checkpoint.pt


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """OpenFlamingo's state dict: a plain dict, or a training checkpoint's `model_state_dict`; DDP's `module.`
    prefixes removed. Memory-mapped where the file format allows."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if "model_state_dict" in state:
        state = state["model_state_dict"]
    return {key.removeprefix("module."): tensor for key, tensor in state.items()}


def inspect_checkpoint(state: dict[str, torch.Tensor], language_type: str) -> dict:
    """What the checkpoint says about the architecture: block placement, resampler depth and widths."""
    layers_attr = DECODER_LAYERS.get(language_type)
    if language_type != "llama":
        known = ", ".join(f"{k} ({v})" for k, v in DECODER_LAYERS.items())
        raise NotImplementedError(
            f"The base language model is {language_type!r}; the shared decoder implements Llama only, so its "
            f"OpenFlamingo checkpoints cannot be converted (OpenFlamingo bases: {known})"
        )
    unsupported = [k for k in state if k.startswith(("perceiver.media_time_embs", "perceiver.frame_embs"))]
    if unsupported:
        raise NotImplementedError(f"Resamplers with media-time or frame embeddings are not supported: {unsupported}")
    pattern = re.compile(rf"lang_encoder\.{re.escape(layers_attr)}\.(\d+)\.gated_cross_attn_layer\.attn_gate")
    block_layers = sorted(int(m[1]) for key in state if (m := pattern.fullmatch(key)))
    depth = len({int(m[1]) for key in state if (m := re.fullmatch(r"perceiver\.layers\.(\d+)\..*", key))})
    if not block_layers or not depth or "perceiver.latents" not in state:
        raise ValueError(
            "This file holds no OpenFlamingo resampler and gated blocks (is it an OpenFlamingo checkpoint.pt?)"
        )
    first = f"lang_encoder.{layers_attr}.{block_layers[0]}.gated_cross_attn_layer"
    return dict(
        block_layers=block_layers,
        depth=depth,
        num_latents=state["perceiver.latents"].shape[0],
        resampler_inner=state["perceiver.layers.0.0.to_q.weight"].shape[0],
        resampler_mlp=state["perceiver.layers.0.1.1.weight"].shape[0],
        cross_inner=state[f"{first}.attn.to_q.weight"].shape[0],
        cross_mlp=state[f"{first}.ff.1.weight"].shape[0],
    )


def extend_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """The tokens OpenFlamingo adds, in its order: `<|endofchunk|>`, `<image>`, then `<PAD>` if there is no pad."""
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CHUNK, IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


def config_from_sources(facts: dict, language_config, clip_config, tokenizer) -> FlamingoPatternConfig:
    text = decoder_fields(language_config)
    text.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    vision = clip_config.vision_config if hasattr(clip_config, "vision_config") else clip_config
    return FlamingoPatternConfig(
        vision_config=dict(
            hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
            num_hidden_layers=vision.num_hidden_layers, num_attention_heads=vision.num_attention_heads,
            num_channels=vision.num_channels, image_size=vision.image_size, patch_size=vision.patch_size,
            hidden_act=vision.hidden_act, layer_norm_eps=vision.layer_norm_eps,
        ),
        text_config=text,
        vision_feature_select_strategy="default",  # OpenFlamingo reads the patch tokens only
        num_latents=facts["num_latents"], resampler_depth=facts["depth"],
        resampler_num_heads=facts["resampler_inner"] // HEAD_DIM, resampler_head_dim=HEAD_DIM,
        resampler_qk_norm=False, resampler_hidden_act="gelu",
        resampler_mlp_ratio=facts["resampler_mlp"] // vision.hidden_size, resampler_norm_eps=1e-5,
        cross_attn_layer_ids=facts["block_layers"], cross_attn_num_heads=facts["cross_inner"] // HEAD_DIM,
        cross_attn_head_dim=HEAD_DIM, cross_attn_norm_type="layernorm", cross_attn_norm_eps=1e-5,
        cross_attn_qk_norm=False, cross_attn_mlp_type="plain", cross_attn_intermediate_size=facts["cross_mlp"],
        cross_attn_hidden_act="gelu", gate_shape="scalar",
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), media_reset_token_id=None,
        tie_word_embeddings=bool(language_config.tie_word_embeddings),
    )  # fmt: skip


class GrowVocabulary:
    """Base-model embedding and output rows for the added tokens, when checkpoint.pt does not provide them:
    seeded draws from N(0, initializer_range)."""

    def __init__(self, vocab_size: int, std: float, seed: int):
        self.vocab_size, self.std, self.seed = vocab_size, std, seed

    def __call__(self, items: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in items:
            if key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
                extra = self.vocab_size - tensor.shape[0]
                if extra > 0:
                    generator = torch.Generator().manual_seed(self.seed + (key == "lm_head.weight"))
                    rows = torch.randn(extra, tensor.shape[1], generator=generator) * self.std
                    tensor = torch.cat([tensor, rows.to(tensor.dtype)])
            yield key, tensor


def convert_openflamingo(
    checkpoint: str | Path,
    output: str | Path,
    *,
    vision: str | Path,
    language: str | Path,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    seed: int = 0,
) -> Path:
    """Merge an OpenFlamingo `checkpoint.pt` with its CLIP tower (`vision`) and base language model (`language`,
    whose tokenizer is used unless `tokenizer` names another) into one checkpoint of ours at `output`."""
    check_output(output, overwrite, [checkpoint, vision, language] + ([tokenizer] if tokenizer else []))
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / "checkpoint.pt"
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint} does not exist (pass OpenFlamingo's checkpoint.pt or its folder)")
    language_dir = resolve_source(language)
    vision_dir = resolve_source(vision)
    language_config = AutoConfig.from_pretrained(language_dir)
    clip_config = AutoConfig.from_pretrained(vision_dir)
    if clip_config.model_type not in ("clip", "clip_vision_model"):
        raise NotImplementedError(
            f"--vision must be a CLIP checkpoint in transformers' layout, not {clip_config.model_type!r}"
        )
    state = load_checkpoint(checkpoint)
    facts = inspect_checkpoint(state, language_config.model_type)
    text_tokenizer = AutoTokenizer.from_pretrained(resolve_source(tokenizer) if tokenizer else language_dir)
    extend_tokenizer(text_tokenizer)
    config = config_from_sources(facts, language_config, clip_config, text_tokenizer)
    config.dtype = dtype or getattr(language_config, "dtype", None)
    model = meta_model(FlamingoPatternForConditionalGeneration, config)

    embed = state.get("lang_encoder.model.embed_tokens.weight")
    if embed is not None and embed.shape[0] != len(text_tokenizer):
        raise ValueError(
            f"checkpoint.pt's embeddings have {embed.shape[0]} rows but the tokenizer (with OpenFlamingo's added "
            f"tokens) has {len(text_tokenizer)}: pass the tokenizer OpenFlamingo was trained with (--tokenizer)"
        )
    from_checkpoint = KeyMap(checkpoint_rules(facts["block_layers"]), splits=[split_fused_kv()])
    renamed = list(from_checkpoint.apply((key, state[key]) for key in state))
    covered = {key for key, _ in renamed}
    grow = GrowVocabulary(len(text_tokenizer), getattr(language_config, "initializer_range", 0.02), seed)
    base = KeyMap(LLAMA_RULES).apply(source_tensors(weight_files(language_dir), "adding the base language model"))
    tower = KeyMap(CLIP_RULES).apply(source_tensors(weight_files(vision_dir), "adding the CLIP tower"))

    def merged() -> Iterator[tuple[str, torch.Tensor]]:
        yield from renamed
        yield from grow((key, tensor) for key, tensor in base if key not in covered)
        yield from tower

    image_processor = open_clip_image_processor(vision_dir, clip_config)
    processor = FlamingoPatternProcessor(
        image_processor=image_processor,
        tokenizer=text_tokenizer,
        end_of_chunk_token=END_OF_CHUNK,
        visual_tokens_per_image=config.num_visual_tokens,
    )
    end_of_chunk = text_tokenizer.convert_tokens_to_ids(END_OF_CHUNK)
    generation_config = GenerationConfig(
        bos_token_id=text_tokenizer.bos_token_id,
        eos_token_id=[end_of_chunk]
        + ([text_tokenizer.eos_token_id] if text_tokenizer.eos_token_id is not None else []),
        pad_token_id=text_tokenizer.pad_token_id,
    )
    sources = [checkpoint, language_dir, vision_dir]
    return write_converted(
        output, overwrite, sources, merged(), model, processor, generation_config, dtype, max_shard_bytes
    )


IMAGE_KEYS = {
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor", "do_normalize",
    "image_mean", "image_std",
}  # fmt: skip


def open_clip_image_processor(vision_dir: Path, clip_config) -> FlamingoPatternImageProcessor:
    """OpenFlamingo's image transform (open_clip's for CLIP): resize the shortest edge, centre-crop, CLIP's
    normalisation. The tower's preprocessor_config.json, when it has one, says the same in transformers' terms."""
    vision = clip_config.vision_config if hasattr(clip_config, "vision_config") else clip_config
    side = vision.image_size
    settings = dict(size={"shortest_edge": side}, do_center_crop=True, crop_size={"height": side, "width": side})
    if (vision_dir / "preprocessor_config.json").exists() or (vision_dir / "processor_config.json").exists():
        settings |= {k: v for k, v in source_image_config(vision_dir).items() if k in IMAGE_KEYS}
    return FlamingoPatternImageProcessor(**settings)
