"""LLaVA checkpoints -> ours, and ours -> transformers' `LlavaForConditionalGeneration` layout.

Two public layouts convert: llava-hf (`llava-hf/llava-1.5-7b-hf`: one folder, transformers' key names) and
the original LLaVA release (`liuhaotian/llava-v1.5-7b`: a Llama checkpoint with `model.mm_projector.*`, the
CLIP tower in a separate repository). For the original layout we do what transformers' own converter does:
add `<image>` and `<pad>` to the tokenizer, pad the vocabulary to a multiple of 64, and draw the new
embedding and output rows from N(mean, 1e-5 * covariance) of the existing embeddings (seeded, so a
conversion is reproducible), and use LLaVA's pad-to-square image preprocessing.
"""

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase
from transformers.tokenization_utils_base import AddedToken

from vlm_patterns.modeling import LlavaPatternConfig, LlavaPatternForConditionalGeneration
from vlm_patterns.processing import LlavaPatternImageProcessor, LlavaPatternProcessor
from vlm_patterns.processing.image_ops import resample_code
from vlm_patterns.processing.processing_llava import LLAVA_CHAT_TEMPLATE

from .chat_templates import choose_chat_template
from .checkpoint_io import (
    DEFAULT_SHARD_BYTES,
    check_output,
    checkpoint_keys,
    read_json,
    resolve_source,
    weight_files,
)
from .key_mapping import KeyMap
from .pipeline import (
    meta_model,
    open_ours,
    source_chat_template,
    source_dtype,
    source_generation_config,
    source_image_config,
    source_tensors,
    write_converted,
    write_exported,
)
from .text_models import decoder_fields, transformers_text_config

# llava-hf layout -> ours. The Hub's files name the CLIP tower `vision_tower.vision_model.*`; transformers 5.24
# saves it without `vision_model.`, and its in-memory layout (save_original_format=False) nests everything
# under `model.`: all three are accepted. Rotary and position-id buffers of old checkpoints are not weights.
LLAVA_HF_RULES = [
    (r"language_model\.model\.(.*)", r"model.language_model.\1"),
    (r"language_model\.lm_head\.(.*)", r"lm_head.\1"),
    (r"vision_tower\.(?:vision_model\.)?embeddings\.position_ids", None),
    (r"vision_tower\.(?:vision_model\.)?(.*)", r"model.vision_tower.\1"),
    (r"multi_modal_projector\.(.*)", r"model.multi_modal_projector.\1"),
    (r"model\.vision_tower\.(?:vision_model\.)?(.*)", r"model.vision_tower.\1"),
    (r"model\.(language_model|multi_modal_projector)\.(.*)", r"model.\1.\2"),
    (r"lm_head\.(.*)", r"lm_head.\1"),
    (r".*\.rotary_emb\.inv_freq", None),
]

# Ours -> llava-hf (the layout vLLM and SGLang load).
EXPORT_RULES = [
    (r"model\.language_model\.(.*)", r"language_model.model.\1"),
    (r"lm_head\.(.*)", r"language_model.lm_head.\1"),
    (r"model\.vision_tower\.(.*)", r"vision_tower.vision_model.\1"),
    (r"model\.multi_modal_projector\.(.*)", r"multi_modal_projector.\1"),
]

# Original LLaVA (LlavaLlamaForCausalLM) -> ours. `model.image_newline` belongs to LLaVA-NeXT's "anyres" mode,
# which this family does not implement; transformers' LLaVA-1.5 converter drops it as well.
ORIGINAL_RULES = [
    (r"model\.mm_projector\.0\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    (r"model\.mm_projector\.2\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
    (r"model\.mm_projector\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    (r"model\.vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids", None),
    (r"model\.vision_tower\.vision_tower\.vision_model\.(.*)", r"model.vision_tower.\1"),
    (r"model\.(embed_tokens|layers|norm)\.(.*)", r"model.language_model.\1.\2"),
    (r"lm_head\.weight", r"lm_head.weight"),
    (r".*\.rotary_emb\.inv_freq", None),
    (r"model\.image_newline", None),
]

# A CLIP checkpoint (CLIPModel or CLIPVisionModel) -> our vision tower; the text half of CLIP is not used.
CLIP_TOWER_RULES = [
    (r"vision_model\.embeddings\.position_ids", None),
    (r"vision_model\.(.*)", r"model.vision_tower.\1"),
    (r"(text_model|visual_projection|text_projection|logit_scale).*", None),
]

VOCAB_MULTIPLE = 64


# ----------------------------------------------------------------------------------------------------------
# Configs


def _vision_config_from_clip(clip) -> dict:
    return dict(
        hidden_size=clip.hidden_size,
        intermediate_size=clip.intermediate_size,
        num_hidden_layers=clip.num_hidden_layers,
        num_attention_heads=clip.num_attention_heads,
        num_channels=clip.num_channels,
        image_size=clip.image_size,
        patch_size=clip.patch_size,
        hidden_act=clip.hidden_act,
        layer_norm_eps=clip.layer_norm_eps,
    )


def config_from_llava_hf(hf_config: dict) -> LlavaPatternConfig:
    """Our config from a llava-hf config.json (parsed by transformers, so its defaults fill the gaps)."""
    from transformers import LlavaConfig

    vision_type = hf_config.get("vision_config", {}).get("model_type", "clip_vision_model")
    if vision_type != "clip_vision_model":
        raise NotImplementedError(
            f"This checkpoint's vision tower is {vision_type!r}; the shared vision block implements CLIP "
            "(clip_vision_model) only, so SigLIP and other towers cannot be converted yet"
        )
    text_type = hf_config.get("text_config", {}).get("model_type", "llama")
    if text_type not in ("llama", "qwen2"):
        raise NotImplementedError(
            f"This checkpoint's language model is {text_type!r}; LLaVA converts with Llama or Qwen2 language models"
        )
    hf = LlavaConfig.from_dict(hf_config)
    text = decoder_fields(hf.text_config)
    tie = hf.tie_word_embeddings or bool(getattr(hf.text_config, "tie_word_embeddings", False))
    if hf_config.get("pad_token_id") is not None:
        text["pad_token_id"] = hf_config["pad_token_id"]
    return LlavaPatternConfig(
        vision_config=_vision_config_from_clip(hf.vision_config),
        text_config=text,
        projector_type="mlp2x_gelu",
        projector_hidden_act=hf.projector_hidden_act,
        projector_bias=hf.multimodal_projector_bias,
        vision_feature_layer=hf.vision_feature_layer,
        vision_feature_select_strategy=hf.vision_feature_select_strategy,
        image_token_id=hf.image_token_id,
        tie_word_embeddings=tie,
    )


def config_to_llava_hf(config: LlavaPatternConfig):
    """transformers' LlavaConfig with the same architecture as ours."""
    from transformers import CLIPVisionConfig, LlavaConfig

    if config.projector_type != "mlp2x_gelu":
        raise NotImplementedError(
            "transformers' LlavaForConditionalGeneration has no single-linear projector (LLaVA-1)"
        )
    text, vision = config.text_config, config.vision_config
    qwen2 = text.qkv_bias and not text.output_bias  # Qwen2 puts biases on q, k, v only; Llama on all or none
    language_model = transformers_text_config(text, "qwen2" if qwen2 else "llama", config.tie_word_embeddings)
    clip = CLIPVisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_hidden_layers,
        num_attention_heads=vision.num_attention_heads,
        num_channels=vision.num_channels,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        hidden_act=vision.hidden_act,
        layer_norm_eps=vision.layer_norm_eps,
    )
    hf = LlavaConfig(
        vision_config=clip,
        text_config=language_model,
        image_token_index=config.image_token_id,
        image_seq_length=config.image_seq_length,
        projector_hidden_act=config.projector_hidden_act,
        multimodal_projector_bias=config.projector_bias,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    hf.architectures = ["LlavaForConditionalGeneration"]
    hf.pad_token_id = text.pad_token_id
    hf.dtype = config.dtype
    return hf


# ----------------------------------------------------------------------------------------------------------
# Processors


def _image_processor_from_json(image_config: dict, **overrides) -> LlavaPatternImageProcessor:
    keys = [
        "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_pad",
        "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
    ]  # fmt: skip
    return LlavaPatternImageProcessor(**{k: image_config[k] for k in keys if k in image_config}, **overrides)


def build_processor(
    config: LlavaPatternConfig,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: LlavaPatternImageProcessor,
    chat_template: str | None = None,
) -> LlavaPatternProcessor:
    """A processor whose placeholder count follows the model config, so the two cannot disagree."""
    image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
    return LlavaPatternProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's class token
        image_token=image_token,
        chat_template=choose_chat_template(chat_template, LLAVA_CHAT_TEMPLATE, tokenizer.special_tokens_map),
    )


def convert_llava(
    source: str | Path,
    output: str | Path,
    *,
    dtype: torch.dtype | None = None,
    vision_tower: str | Path | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    seed: int = 0,
) -> Path:
    """Convert a LLaVA checkpoint (llava-hf or original layout, a folder or a Hub id) into ours at `output`.

    The layout is read from config.json: `model_type: llava` is llava-hf; `mm_projector_type` marks the
    original release, whose CLIP tower comes from `vision_tower` (default: the checkpoint's `mm_vision_tower`).
    `dtype` casts floating tensors (default: keep the checkpoint's). Returns the output folder.
    """
    check_output(output, overwrite, [source])
    folder = resolve_source(source)
    hf_config = read_json(folder / "config.json")
    if "mm_projector_type" in hf_config or "mm_vision_tower" in hf_config:
        return _convert_original(folder, hf_config, output, dtype, vision_tower, overwrite, max_shard_bytes, seed)
    if hf_config.get("model_type") != "llava":
        raise ValueError(f"{source} is not a LLaVA checkpoint (model_type {hf_config.get('model_type')!r})")

    config = config_from_llava_hf(hf_config)
    config.dtype = source_dtype(dtype, hf_config)
    model = meta_model(LlavaPatternForConditionalGeneration, config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_processor = _image_processor_from_json(source_image_config(folder))
    processor = build_processor(config, tokenizer, image_processor, source_chat_template(folder))
    tensors = KeyMap(LLAVA_HF_RULES).apply(source_tensors(weight_files(folder), "converting llava-hf shards"))
    generation_config = _generation_config(folder, config)
    return write_converted(
        output, overwrite, [folder], tensors, model, processor, generation_config, dtype, max_shard_bytes
    )


def _generation_config(folder: Path, config: LlavaPatternConfig) -> GenerationConfig:
    """The source's own, else one from the language model's special tokens (the original layout has none)."""
    if (folder / "generation_config.json").exists():
        return source_generation_config(folder)
    text = config.text_config
    return GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
    )


# ----------------------------------------------------------------------------------------------------------
# The original LLaVA release


def _original_config(hf_config: dict, clip_config: dict, vocab_size: int, image_token_id: int, pad_token_id: int):
    from transformers import CLIPConfig, CLIPVisionConfig, LlamaConfig

    projector = hf_config.get("mm_projector_type", "linear")
    if projector not in ("linear", "mlp2x_gelu"):
        raise NotImplementedError(f"mm_projector_type {projector!r} is not supported (linear and mlp2x_gelu are)")
    if hf_config.get("mm_use_im_start_end"):
        raise NotImplementedError(
            "Checkpoints trained with <im_start>/<im_end> tokens (mm_use_im_start_end) are not supported"
        )
    select = hf_config.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise NotImplementedError(f"mm_vision_select_feature {select!r} is not supported (patch and cls_patch are)")
    llama = LlamaConfig.from_dict({k: v for k, v in hf_config.items() if not k.startswith("mm_") and k != "model_type"})
    text = decoder_fields(llama)
    text.update(vocab_size=vocab_size, pad_token_id=pad_token_id)
    tie = bool(llama.tie_word_embeddings)
    if "vision_config" in clip_config:
        clip = CLIPConfig.from_dict(clip_config).vision_config
    else:
        clip = CLIPVisionConfig.from_dict(clip_config)
    return LlavaPatternConfig(
        vision_config=_vision_config_from_clip(clip),
        text_config=text,
        projector_type=projector,
        vision_feature_layer=hf_config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        image_token_id=image_token_id,
        tie_word_embeddings=tie,
    )


def extend_tokenizer(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """Add `<image>` and `<pad>` as transformers' converter does; returns their ids."""
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id


class VocabularyPadding:
    """Grows `embed_tokens` and `lm_head` to the padded vocabulary; new rows ~ N(mu, 1e-5 * Sigma) of the old
    embeddings, as transformers' LLaVA converter does. `lm_head` waits for `embed_tokens` if it comes first."""

    EMBED, HEAD = "model.language_model.embed_tokens.weight", "lm_head.weight"

    def __init__(self, vocab_size: int, seed: int):
        self.vocab_size, self.seed = vocab_size, seed
        self.distribution = None
        self.held_head = None

    def _new_rows(self, count: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self.distribution.sample((count,))

    def _grow(self, tensor: torch.Tensor) -> torch.Tensor:
        extra = self.vocab_size - tensor.shape[0]
        return torch.cat([tensor, self._new_rows(extra).to(tensor.dtype)]) if extra > 0 else tensor

    def __call__(self, items: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in items:
            if key == self.EMBED:
                old = tensor.float()
                mu = old.mean(0)
                sigma = (old - mu).T @ (old - mu) / old.shape[0]
                self.distribution = torch.distributions.MultivariateNormal(mu, covariance_matrix=1e-5 * sigma)
                yield key, self._grow(tensor)
                if self.held_head is not None:
                    yield self.HEAD, self._grow(self.held_head)
                    self.held_head = None
            elif key == self.HEAD and self.distribution is None:
                self.held_head = tensor
            elif key == self.HEAD:
                yield key, self._grow(tensor)
            else:
                yield key, tensor


def _convert_original(folder, hf_config, output, dtype, vision_tower, overwrite, max_shard_bytes, seed) -> Path:
    tower_source = vision_tower or hf_config.get("mm_vision_tower")
    if tower_source is None:
        raise ValueError(
            "The original LLaVA layout needs the CLIP tower: pass vision_tower (e.g. openai/clip-vit-large-patch14-336)"
        )
    check_output(output, overwrite, [folder, tower_source])
    tower = resolve_source(tower_source, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_token_id, pad_token_id = extend_tokenizer(tokenizer)
    vocab_size = math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    config = _original_config(hf_config, read_json(tower / "config.json"), vocab_size, image_token_id, pad_token_id)
    config.dtype = dtype or hf_config.get("torch_dtype")
    model = meta_model(LlavaPatternForConditionalGeneration, config)

    llava_files = weight_files(folder)
    has_tower = any(key.startswith("model.vision_tower.") for key in checkpoint_keys(folder))
    tensors = source_tensors(llava_files, "converting LLaVA shards")
    items = VocabularyPadding(vocab_size, seed)(KeyMap(ORIGINAL_RULES).apply(tensors))
    if not has_tower:
        items = _chain(
            items, KeyMap(CLIP_TOWER_RULES).apply(source_tensors(weight_files(tower), "adding the CLIP tower"))
        )

    image_config = source_image_config(tower)
    image_processor = _image_processor_from_json(image_config, do_pad=hf_config.get("image_aspect_ratio") == "pad")
    processor = build_processor(config, tokenizer, image_processor)
    generation_config = _generation_config(folder, config)
    return write_converted(
        output, overwrite, [folder, tower], items, model, processor, generation_config, dtype, max_shard_bytes
    )


def _chain(*iterators):
    for iterator in iterators:
        yield from iterator


# ----------------------------------------------------------------------------------------------------------
# Export


def export_llava(
    ours: str | Path, output: str | Path, *, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> Path:
    """Write our LLaVA checkpoint in transformers' `LlavaForConditionalGeneration` layout (config, weights,
    `LlavaProcessor` files), which transformers, vLLM and SGLang load. Tensors are copied bit for bit."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    folder = open_ours(ours, output, overwrite)
    config = LlavaPatternConfig.from_pretrained(folder)
    hf_config = config_to_llava_hf(config)  # raises early for what transformers' class cannot express
    processor = LlavaPatternProcessor.from_pretrained(folder)
    ip = processor.image_processor
    resample = resample_code(ip.resample)
    hf_image_processor = LlavaImageProcessorPil(
        do_resize=ip.do_resize, size=ip.size, resample=resample, do_center_crop=ip.do_center_crop,
        crop_size=ip.crop_size, do_pad=ip.do_pad, do_rescale=ip.do_rescale, rescale_factor=ip.rescale_factor,
        do_normalize=ip.do_normalize, image_mean=ip.image_mean, image_std=ip.image_std,
    )  # fmt: skip
    hf_processor = LlavaProcessor(
        image_processor=hf_image_processor,
        tokenizer=processor.tokenizer,
        patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        num_additional_image_tokens=processor.num_additional_image_tokens,
        image_token=processor.image_token,
        chat_template=processor.chat_template,
    )

    def write_files(staging: Path) -> None:
        hf_config.save_pretrained(staging)
        hf_processor.save_pretrained(staging)

    return write_exported(folder, output, overwrite, KeyMap(EXPORT_RULES), max_shard_bytes, write_files)
