"""Shared fixtures: tiny checkpoints in the public layouts (built once per session) and their conversions."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

import vlm_patterns  # noqa: E402,F401  (registers the Auto classes)
from vlm_patterns.conversion.fuyu import convert_fuyu  # noqa: E402
from vlm_patterns.conversion.idefics import convert_idefics  # noqa: E402
from vlm_patterns.conversion.llava import convert_llava  # noqa: E402
from vlm_patterns.conversion.qwen2_vl import convert_qwen2_vl  # noqa: E402
from vlm_patterns.conversion.tiny import (  # noqa: E402
    build_tiny_clip,
    build_tiny_fuyu,
    build_tiny_idefics,
    build_tiny_llava_hf,
    build_tiny_llava_original,
    build_tiny_qwen2_vl,
)

# LLaVA variants the parity tests cover: feature layer, select strategy, tied embeddings.
LLAVA_VARIANTS = {
    "layer-2-default": dict(vision_feature_layer=-2, vision_feature_select_strategy="default"),
    "layer-1-full": dict(vision_feature_layer=-1, vision_feature_select_strategy="full", seed=1),
    "layers-list-tied": dict(vision_feature_layer=[-3, -1], tie_word_embeddings=True, seed=2, image_size=48),
    "qwen2-text": dict(text_model="qwen2", seed=3),
}


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def llava_pair(workdir):
    """variant name -> (llava-hf folder, converted folder); built lazily and cached for the session."""
    cache = {}

    def get(variant: str = "layer-2-default") -> tuple[Path, Path]:
        if variant not in cache:
            source = build_tiny_llava_hf(workdir / f"llava-hf-{variant}", **LLAVA_VARIANTS[variant])
            cache[variant] = (source, convert_llava(source, workdir / f"llava-ours-{variant}"))
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def clip_tower(workdir) -> Path:
    return build_tiny_clip(workdir / "clip-tower")


@pytest.fixture(scope="session")
def llava_original(workdir, clip_tower):
    """options -> (original-layout folder, converted folder), cached by options."""
    cache = {}

    def get(**options) -> tuple[Path, Path]:
        key = tuple(sorted(options.items()))
        if key not in cache:
            name = "-".join(f"{k}={v}" for k, v in key) or "default"
            source = build_tiny_llava_original(workdir / f"original-{name}", clip_tower, **options)
            cache[key] = (source, convert_llava(source, workdir / f"original-ours-{name}"))
        return cache[key]

    return get


# Qwen2-VL variants: the Hub's flat config with tied embeddings (like the 2B), and transformers' nested config
# with an untied output layer (like the 7B) and a different vision width.
QWEN2_VL_VARIANTS = {
    "hub-tied": dict(),
    "nested-untied": dict(hub_flat_config=False, tie_word_embeddings=False, seed=1, embed_dim=48, depth=3),
}


@pytest.fixture(scope="session")
def qwen2_vl_pair(workdir):
    cache = {}

    def get(variant: str = "hub-tied") -> tuple[Path, Path]:
        if variant not in cache:
            source = build_tiny_qwen2_vl(workdir / f"qwen2-vl-{variant}", **QWEN2_VL_VARIANTS[variant])
            cache[variant] = (source, convert_qwen2_vl(source, workdir / f"qwen2-vl-ours-{variant}"))
        return cache[variant]

    return get


# Fuyu: a small canvas keeps "larger than the canvas" cheap to test; a second seed and width for independence.
FUYU_VARIANTS = {
    "small-canvas": dict(canvas=(120, 180)),
    "wider": dict(canvas=(150, 150), hidden_size=96, num_heads=6, seed=1),
}


@pytest.fixture(scope="session")
def fuyu_pair(workdir):
    cache = {}

    def get(variant: str = "small-canvas") -> tuple[Path, Path]:
        if variant not in cache:
            source = build_tiny_fuyu(workdir / f"fuyu-{variant}", **FUYU_VARIANTS[variant])
            cache[variant] = (source, convert_fuyu(source, workdir / f"fuyu-ours-{variant}"))
        return cache[variant]

    return get


# IDEFICS: scalar gates with q/k norms (like idefics-9b); vector gates, no q/k norms, blocks every 3rd layer and
# IDEFICS-instruct's <end_of_utterance>; and a resampler-less model whose blocks read the ViT tokens directly.
IDEFICS_VARIANTS = {
    "scalar-qk-norm": dict(),
    "vector-instruct": dict(
        alpha_type="vector", qk_layer_norms=False, cross_layer_interval=3, text_layers=6, num_latents=6,
        end_of_utterance=True, seed=1,
    ),
    "no-resampler": dict(use_resampler=False, seed=2, image_size=24),
}  # fmt: skip


@pytest.fixture(scope="session")
def idefics_pair(workdir):
    cache = {}

    def get(variant: str = "scalar-qk-norm") -> tuple[Path, Path]:
        if variant not in cache:
            source = build_tiny_idefics(workdir / f"idefics-{variant}", **IDEFICS_VARIANTS[variant])
            cache[variant] = (source, convert_idefics(source, workdir / f"idefics-ours-{variant}"))
        return cache[variant]

    return get


SHIPPED = Path(__file__).resolve().parents[1] / "training" / "checkpoints"


@pytest.fixture(scope="session")
def shipped():
    """family -> (model, processor) of the four checkpoints shipped in training/checkpoints, loaded once; read only."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return {
        family: (AutoModelForImageTextToText.from_pretrained(SHIPPED / family).eval(),
                 AutoProcessor.from_pretrained(SHIPPED / family))
        for family in ("llava", "qwen2_vl", "fuyu", "flamingo")
    }  # fmt: skip
