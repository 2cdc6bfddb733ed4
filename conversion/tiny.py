"""Tiny checkpoints in the public layouts, built with transformers' own classes and random weights.

No machine this project is built on reaches the Hub, so parity tests, the benchmark and the README's demo
build their source checkpoints here: transformers' reference model (e.g. `LlavaForConditionalGeneration`)
with a small config, saved exactly as the public repositories are, plus a byte-level BPE tokenizer
trained on a few sentences. Converting such a folder exercises the same path as a real download.
"""

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from vlm_patterns.processing.processing_llava import LLAVA_CHAT_TEMPLATE

TINY_CORPUS = [
    "USER: What is in the image? ASSISTANT: A red circle on a blue square.",
    "USER: Describe the picture. ASSISTANT: There are two green triangles and a yellow star.",
    "USER: How many objects are there? ASSISTANT: Three objects: a cat, a dog and a bird.",
    "USER: What colour is the car? ASSISTANT: The car is white, parked left of the tree.",
    "USER: Read the word. ASSISTANT: The word says hello world.",
    "A photo of a small brown dog running on green grass under the sun.",
    "The quick brown fox jumps over the lazy dog; 0 1 2 3 4 5 6 7 8 9.",
    "Left, right, above, below, next to, in front of, behind, inside, outside.",
    "Answer the question about the image briefly and correctly, please.",
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def build_tokenizer(vocab_size: int = 384, special_tokens: list[str] = SPECIAL_TOKENS) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) that prepends `<s>`, like Llama's."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TINY_CORPUS * 4, trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    pad = {"pad_token": "<pad>"} if "<pad>" in special_tokens else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **pad
    )


def rename_saved_keys(folder: Path, rename: Callable[[str], str]) -> None:
    """Rename the tensors of a single-file checkpoint in place."""
    path = Path(folder) / "model.safetensors"
    state = load_file(path)
    save_file({rename(key): tensor for key, tensor in state.items()}, path, metadata={"format": "pt"})


def example_image(width: int = 96, height: int = 64, seed: int = 0) -> PIL.Image.Image:
    """A small synthetic scene (gradient background, a few coloured shapes), deterministic by seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), np.full_like(x, 128)], -1)
    image = PIL.Image.fromarray(base.astype(np.uint8))
    draw = PIL.ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        size = int(rng.integers(6, max(8, min(width, height) // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + size, y0 + size], fill=colour)
    return image


def photo_like_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """`example_image` as a camera would see it: edges softened by the lens, plus mild sensor noise."""
    import PIL.ImageFilter

    image = example_image(width, height, seed).filter(PIL.ImageFilter.GaussianBlur(max(1.0, min(width, height) / 200)))
    noise = np.random.default_rng(seed).normal(0, 3, (height, width, 3))
    return PIL.Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def build_tiny_llava_hf(
    folder: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden_size: int = 32,
    vision_layers: int = 3,
    text_hidden_size: int = 64,
    text_layers: int = 2,
    num_heads: int = 4,
    num_key_value_heads: int = 2,
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str = "default",
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.2,
    text_model: str = "llama",
) -> Path:
    """A random `LlavaForConditionalGeneration` + `LlavaProcessor` saved in the llava-hf layout; the language
    model is a Llama, or with `text_model="qwen2"` a Qwen2."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
    )

    folder = Path(folder)
    tokenizer = build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text_config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[text_model](
        vocab_size=len(tokenizer),
        hidden_size=text_hidden_size,
        intermediate_size=text_hidden_size * 2 + 8,
        num_hidden_layers=text_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        initializer_range=initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size * 2 + 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=num_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden_size,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2 + (vision_feature_select_strategy == "full"),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        tie_word_embeddings=tie_word_embeddings,
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers zero-initialises biases and norms; random ones test more of the mapping
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    # transformers 5.24 saves the CLIP tower as `vision_tower.*`; the Hub's llava-hf files say `vision_tower.vision_model.*`.
    rename_saved_keys(
        folder, lambda key: re.sub(r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.", key)
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    return folder


def build_tiny_clip(
    folder: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    layers: int = 3,
) -> Path:
    """A random `CLIPModel` (text and vision halves, as `openai/clip-vit-large-patch14-336` is) and its
    image processor, saved in the Hub layout."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    folder = Path(folder)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=1, num_attention_heads=4,
            vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=hidden_size, intermediate_size=hidden_size * 2 + 4, num_hidden_layers=layers,
            num_attention_heads=4, image_size=image_size, patch_size=patch_size,
        ),
        projection_dim=hidden_size,
    )  # fmt: skip
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)
    return folder


def build_tiny_llava_original(
    folder: str | Path,
    tower: str | Path,
    *,
    seed: int = 0,
    projector_type: str = "mlp2x_gelu",
    select_layer: int = -2,
    select_feature: str = "patch",
    image_aspect_ratio: str = "pad",
    text_hidden_size: int = 64,
    text_layers: int = 2,
    num_shards: int = 2,
) -> Path:
    """A random original-layout LLaVA (`LlavaLlamaForCausalLM`: Llama weights + `model.mm_projector.*`, a
    tokenizer without `<image>` or a pad token, `.bin` shards) pointing at the CLIP tower in `tower`."""
    import json

    from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM

    folder, tower = Path(folder), Path(tower)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(special_tokens=["<unk>", "<s>", "</s>"])  # like Llama's: no pad, no <image>
    vision = CLIPVisionConfig.from_pretrained(tower)
    llama = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden_size, intermediate_size=text_hidden_size * 2 + 8,
        num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    state = LlamaForCausalLM(llama).state_dict()
    projector = [torch.nn.Linear(vision.hidden_size, text_hidden_size)]
    if projector_type == "mlp2x_gelu":
        projector += [torch.nn.GELU(), torch.nn.Linear(text_hidden_size, text_hidden_size)]
    for i, layer in enumerate(projector):
        prefix = "model.mm_projector" if projector_type == "linear" else f"model.mm_projector.{i}"
        for name, tensor in layer.state_dict().items():
            state[f"{prefix}.{name}"] = tensor
    state = {key: tensor.clone() for key, tensor in state.items()}  # untie shared storage before saving
    keys = sorted(state)
    shards = [keys[i::num_shards] for i in range(num_shards)]
    weight_map = {}
    for i, shard_keys in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        torch.save({key: state[key] for key in shard_keys}, folder / name)
        weight_map.update(dict.fromkeys(shard_keys, name))
    with open(folder / "pytorch_model.bin.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    config = llama.to_dict()
    config.update(
        architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", mm_projector_type=projector_type,
        mm_hidden_size=vision.hidden_size, mm_vision_tower=str(tower), mm_vision_select_layer=select_layer,
        mm_vision_select_feature=select_feature, image_aspect_ratio=image_aspect_ratio, mm_use_im_start_end=False,
        mm_use_im_patch_token=False, mm_patch_merge_type="flat", tokenizer_padding_side="right", torch_dtype="float32",
    )  # fmt: skip
    config.pop("dtype", None)
    with open(folder / "config.json", "w") as f:
        json.dump(config, f, indent=2, default=str)
    tokenizer.save_pretrained(folder)
    return folder


QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # fmt: skip


def build_qwen_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen2-VL's special tokens; like Qwen's, it adds no BOS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(TINY_CORPUS * 4 + ["You are a helpful assistant.", "system user assistant"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def build_tiny_qwen2_vl(
    folder: str | Path,
    *,
    seed: int = 0,
    embed_dim: int = 32,
    depth: int = 2,
    vision_heads: int = 4,
    text_hidden_size: int = 64,
    text_layers: int = 2,
    num_heads: int = 4,
    num_key_value_heads: int = 2,
    mrope_section: tuple[int, int, int] = (2, 3, 3),
    tie_word_embeddings: bool = True,
    hub_flat_config: bool = True,
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 28 * 28 * 64,
) -> Path:
    """A random `Qwen2VLForConditionalGeneration` saved as the Hub's Qwen2-VL repositories are: hub key layout,
    a flat config.json with `rope_scaling: {type: mrope}` (or transformers 5.24's nested one), the image
    processor's preprocessor_config.json, tokenizer and chat template."""
    import json

    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from vlm_patterns.processing.processing_qwen2_vl import QWEN2_VL_CHAT_TEMPLATE

    folder = Path(folder)
    tokenizer = build_qwen_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}  # fmt: skip
    text = dict(
        vocab_size=len(tokenizer), hidden_size=text_hidden_size, intermediate_size=text_hidden_size * 2 + 8,
        num_hidden_layers=text_layers, num_attention_heads=num_heads, num_key_value_heads=num_key_value_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=None, initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(mrope_section)},
    )  # fmt: skip
    vision = dict(depth=depth, embed_dim=embed_dim, hidden_size=text_hidden_size, num_heads=vision_heads, mlp_ratio=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings, **ids)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-zero biases and norms exercise more of the mapping
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    if hub_flat_config:  # the Hub's own files: text fields at the top, legacy rope_scaling, minimal vision_config
        flat = {k: v for k, v in text.items() if k != "rope_parameters"}
        flat.update(
            architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl", torch_dtype="float32",
            rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": list(mrope_section)},
            use_sliding_window=False, vision_token_id=tokenizer.convert_tokens_to_ids("<|vision_pad|>"),
            vision_config=dict(vision, in_chans=3, spatial_patch_size=14), **ids,
        )  # fmt: skip
        (folder / "config.json").write_text(json.dumps(flat, indent=2))
    Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}, indent=2))
    return folder


FUYU_SPECIAL_TOKENS = [
    "|ENDOFTEXT|",
    "<unk>",
    "<s>",
    "|SPEAKER|",
    "|NEWLINE|",
    "<0x00>",
    "<0x01>",
    "<0x02>",
    "<0x03>",
    "<0x04>",
]


def build_fuyu_tokenizer(vocab_size: int = 360) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (spaces as `▁`, no BOS added by itself) with Fuyu's special tokens, its byte
    tokens `<0x00>`..`<0x04>` (box, point and answer markers) and a token per coordinate value 0..999."""
    import string

    from tokenizers import AddedToken, normalizers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=FUYU_SPECIAL_TOKENS, initial_alphabet=list(string.printable) + ["▁"],
        show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(TINY_CORPUS * 4 + ["Generate a coco-style caption.", "Where is the dog?"], trainer)
    tokenizer.add_tokens([AddedToken(str(i), normalized=False) for i in range(1000)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="|ENDOFTEXT|", unk_token="<unk>"
    )


def build_tiny_fuyu(
    folder: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    num_heads: int = 4,
    patch_size: int = 30,
    canvas: tuple[int, int] = (1080, 1920),
) -> Path:
    """A random `FuyuForCausalLM` saved as `adept/fuyu-8b` is: the Hub's flat config.json (Persimmon fields at the
    top), its key layout (fused, per-head interleaved QKV), the image processor config and tokenizer."""
    import json

    from transformers import FuyuConfig, FuyuForCausalLM, FuyuImageProcessorPil

    folder = Path(folder)
    tokenizer = build_fuyu_tokenizer()
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 4, num_hidden_layers=layers,
        num_attention_heads=num_heads, hidden_act="relu2", max_position_embeddings=4096, layer_norm_eps=1e-5,
        qk_layernorm=True, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5},
    )  # fmt: skip
    config = FuyuConfig(
        text_config=text, patch_size=patch_size, num_channels=3,
        image_token_id=tokenizer.convert_tokens_to_ids("|SPEAKER|"), tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = FuyuForCausalLM(config).eval()
    with torch.no_grad():  # non-zero biases and norms exercise more of the mapping
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    flat = {k: v for k, v in text.items() if k != "rope_parameters"}  # adept/fuyu-8b's config.json is flat
    flat.update(
        architectures=["FuyuForCausalLM"], model_type="fuyu", image_size=300, patch_size=patch_size, num_channels=3,
        rope_theta=25000.0, partial_rotary_factor=0.5, image_token_id=config.image_token_id, tie_word_embeddings=False,
        torch_dtype="float32",
    )  # fmt: skip
    (folder / "config.json").write_text(json.dumps(flat, indent=2))
    FuyuImageProcessorPil(
        size={"height": canvas[0], "width": canvas[1]}, patch_size={"height": patch_size, "width": patch_size}
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_idefics_tokenizer(end_of_utterance: bool = False) -> PreTrainedTokenizerFast:
    """Llama-like (`<unk>` 0, `<s>` 1, `</s>` 2, `<unk>` as padding) plus IDEFICS's two added tokens at the end
    of the vocabulary, `<fake_token_around_image>` and `<image>` (and `<end_of_utterance>` for -instruct)."""
    tokenizer = build_tokenizer(special_tokens=["<unk>", "<s>", "</s>"])
    extra = ["<fake_token_around_image>", "<image>"] + (["<end_of_utterance>"] if end_of_utterance else [])
    tokenizer.add_special_tokens({"additional_special_tokens": extra, "pad_token": "<unk>"})
    return tokenizer


def build_tiny_idefics(
    folder: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    text_hidden_size: int = 64,
    text_layers: int = 4,
    num_heads: int = 4,
    cross_layer_interval: int = 2,
    alpha_type: str = "float",
    qk_layer_norms: bool = True,
    use_resampler: bool = True,
    num_latents: int = 8,
    end_of_utterance: bool = False,
) -> Path:
    """A random `IdeficsForVisionText2Text` + `IdeficsProcessor` saved as `HuggingFaceM4/idefics-9b` is (two
    decoupled extra tokens, every `cross_layer_interval`-th layer gated), with its gates opened: random alphas,
    so the cross-attention actually changes the logits."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsImageProcessorPil, IdeficsProcessor

    folder = Path(folder)
    tokenizer = build_idefics_tokenizer(end_of_utterance)
    base_vocab = tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
    config = IdeficsConfig(
        vocab_size=base_vocab, additional_vocab_size=len(tokenizer) - base_vocab, hidden_size=text_hidden_size,
        intermediate_size=text_hidden_size * 2 + 8, num_hidden_layers=text_layers, num_attention_heads=num_heads,
        max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.2, cross_layer_interval=cross_layer_interval,
        alpha_type=alpha_type, qk_layer_norms=qk_layer_norms, use_resampler=use_resampler,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        vision_config=dict(
            embed_dim=vision_hidden_size, image_size=image_size, patch_size=patch_size,
            intermediate_size=vision_hidden_size * 2 + 4, num_hidden_layers=vision_layers, num_attention_heads=4,
            hidden_act="gelu",
        ),
        perceiver_config=dict(
            use_resampler=use_resampler, resampler_n_latents=num_latents, resampler_depth=2, resampler_n_heads=2,
            resampler_head_dim=12, qk_layer_norms_perceiver=qk_layer_norms,
        ),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():  # open the gates; non-zero biases and norms exercise more of the mapping
        for name, param in model.named_parameters():
            if name.split(".")[-1] in ("alpha_cross_attn", "alpha_dense"):
                param.copy_(torch.empty_like(param).uniform_(0.4, 1.2) * torch.sign(torch.randn_like(param)))
            elif name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    image_processor = IdeficsImageProcessorPil(image_size=image_size)
    IdeficsProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def build_tiny_open_flamingo(
    folder: str | Path,
    *,
    seed: int = 0,
    cross_attn_every_n_layers: int = 2,
    text_hidden_size: int = 64,
    text_layers: int = 4,
    num_latents: int = 8,
    heads: int = 2,
    full_state_dict: bool = False,
) -> tuple[Path, Path, Path]:
    """OpenFlamingo's three sources in their public layouts: a CLIP tower (transformers' layout), a Llama base
    model with its tokenizer, and `checkpoint.pt` with OpenFlamingo's names (resampler, gated blocks before
    layers with (i + 1) % n == 0, the input embeddings grown by `<|endofchunk|>`, `<image>`, `<PAD>`), gates
    opened. With `full_state_dict` it also holds the wrapped decoder layers and their aliases, as a full
    `model.state_dict()` does. Returns (checkpoint.pt, CLIP folder, Llama folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    clip = build_tiny_clip(folder / "clip", seed=seed, hidden_size=32, layers=2)
    language = folder / "llama"
    tokenizer = build_tokenizer(special_tokens=["<unk>", "<s>", "</s>"])
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden_size, intermediate_size=text_hidden_size * 2 + 8,
        num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )).eval()  # fmt: skip
    llama.save_pretrained(language)
    tokenizer.save_pretrained(language)

    generator = torch.Generator().manual_seed(seed + 100)

    def randn(*shape, std=0.2):
        return torch.randn(*shape, generator=generator) * std

    def layer_norm(prefix, dim):
        return {f"{prefix}.weight": 1 + randn(dim, std=0.1), f"{prefix}.bias": randn(dim, std=0.1)}

    vision, text, inner = 32, text_hidden_size, heads * 64
    state = {"perceiver.latents": randn(num_latents, vision, std=1.0), **layer_norm("perceiver.norm", vision)}
    for i in range(2):
        p = f"perceiver.layers.{i}"
        state |= layer_norm(f"{p}.0.norm_media", vision) | layer_norm(f"{p}.0.norm_latents", vision)
        state |= {f"{p}.0.to_q.weight": randn(inner, vision), f"{p}.0.to_kv.weight": randn(2 * inner, vision),
                  f"{p}.0.to_out.weight": randn(vision, inner), **layer_norm(f"{p}.1.0", vision),
                  f"{p}.1.1.weight": randn(4 * vision, vision), f"{p}.1.3.weight": randn(vision, 4 * vision)}  # fmt: skip
    blocks = [i for i in range(text_layers) if (i + 1) % cross_attn_every_n_layers == 0]
    for i in blocks:
        p = f"lang_encoder.model.layers.{i}.gated_cross_attn_layer"
        state |= {f"{p}.attn_gate": randn(1, std=1.0), f"{p}.ff_gate": randn(1, std=1.0),
                  **layer_norm(f"{p}.attn.norm", text), f"{p}.attn.to_q.weight": randn(inner, text),
                  f"{p}.attn.to_kv.weight": randn(2 * inner, vision), f"{p}.attn.to_out.weight": randn(text, inner),
                  **layer_norm(f"{p}.ff.0", text), f"{p}.ff.1.weight": randn(4 * text, text),
                  f"{p}.ff.3.weight": randn(text, 4 * text)}  # fmt: skip
    embed = llama.get_input_embeddings().weight.detach()
    state["lang_encoder.model.embed_tokens.weight"] = torch.cat([embed, randn(3, text)])  # chunk, image, <PAD>
    if full_state_dict:
        for key, tensor in llama.state_dict().items():
            if key.startswith("model.layers."):
                i, rest = key.removeprefix("model.layers.").split(".", 1)
                state[f"lang_encoder.model.layers.{i}.decoder_layer.{rest}"] = tensor
                state[f"lang_encoder.old_decoder_blocks.{i}.{rest}"] = tensor.clone()
        for key in [k for k in state if ".gated_cross_attn_layer." in k]:
            i = key.split(".")[3]
            state[f"lang_encoder.gated_cross_attn_layers.{i}.{key.split('.gated_cross_attn_layer.')[1]}"] = state[key]
        state["lang_encoder.model.norm.weight"] = llama.model.norm.weight.detach()
    checkpoint = folder / "checkpoint.pt"
    torch.save({key: tensor.clone().contiguous() for key, tensor in state.items()}, checkpoint)
    return checkpoint, clip, language
