"""The original LLaVA release layout (liuhaotian/llava-v1.5-7b + a separate CLIP tower)."""

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from vlm_patterns.conversion.checkpoint_io import iter_shard, weight_files
from vlm_patterns.conversion.llava import VOCAB_MULTIPLE
from vlm_patterns.conversion.verify import verify_llava

# transformers' convert_llava_weights_to_hf.py renames keys by substring replacement, in this order.
TRANSFORMERS_KEYS_TO_MODIFY = {
    "model.vision_tower.": "",
    "model.mm_projector": "multi_modal_projector",
    "model": "model.model",
    "vision_model.model": "vision_model",
    "lm_head": "language_model.lm_head",
    "model.model": "language_model.model",
    "multi_modal_projector.0": "multi_modal_projector.linear_1",
    "multi_modal_projector.2": "multi_modal_projector.linear_2",
}
# ... which gives the llava-hf names; llava-hf -> ours is a prefix swap.
HF_TO_OURS = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
              ("multi_modal_projector.", "model.multi_modal_projector.")]  # fmt: skip


def transformers_name(key: str) -> str:
    for old, new in TRANSFORMERS_KEYS_TO_MODIFY.items():
        if old in key:
            key = key.replace(old, new)
    for old, new in HF_TO_OURS:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(projector_type="linear", select_feature="cls_patch", image_aspect_ratio="square", select_layer=-1),
    ],
    ids=["mlp2x_gelu-pad", "linear-cls_patch"],
)
def test_original_layout_matches_the_original_forward(llava_original, options):
    """Reference: CLIPVisionModel + projector + LlamaForCausalLM from transformers, loaded from the original files."""
    source, converted = llava_original(**options)
    report = verify_llava(source, converted)
    assert report.passed, report.summary()
    assert report.max_logit_diff <= 1e-4


def test_original_layout_follows_transformers_converter(llava_original):
    source, converted = llava_original()
    ours = load_file(converted / "model.safetensors")
    tokenizer = AutoTokenizer.from_pretrained(source)
    old_vocab = len(tokenizer)
    source_state = {k: v for path in weight_files(source) for k, v in iter_shard(path)}

    # Same names and values as transformers' converter, key by key.
    for key, tensor in source_state.items():
        name = transformers_name(key)
        if name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(ours[name][:old_vocab], tensor)
        else:
            assert torch.equal(ours[name], tensor), key

    # <image> and <pad> appended, vocabulary padded to a multiple of 64, new rows near the embeddings' mean.
    converted_tokenizer = AutoTokenizer.from_pretrained(converted)
    assert converted_tokenizer.convert_tokens_to_ids("<image>") == old_vocab
    assert converted_tokenizer.pad_token == "<pad>" and converted_tokenizer.pad_token_id == old_vocab + 1
    vocab = ours["model.language_model.embed_tokens.weight"].shape[0]
    assert vocab == math.ceil((old_vocab + 2) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    embeddings = source_state["model.embed_tokens.weight"]
    new_rows = ours["model.language_model.embed_tokens.weight"][old_vocab:]
    spread = embeddings.std(0).max() * 1e-5**0.5 * 6  # six standard deviations of N(mu, 1e-5 Sigma)
    assert (new_rows - embeddings.mean(0)).abs().max() <= spread
    assert ours["lm_head.weight"].shape[0] == vocab

    # The processor pads to a square with the mean colour, as LLaVA-1.5 trained with.
    import json

    assert json.loads((converted / "processor_config.json").read_text())["image_processor"]["do_pad"] is True


def test_conversion_is_reproducible(llava_original, tmp_path):
    from vlm_patterns.conversion.llava import convert_llava

    source, converted = llava_original()
    again = convert_llava(source, tmp_path / "again")
    first, second = load_file(converted / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
