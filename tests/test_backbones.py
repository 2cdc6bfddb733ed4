"""The shared blocks against transformers' own layers, and their plumbing (masks, positions, device maps)."""

import re

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import LlamaConfig, LlamaForCausalLM

from vlm_patterns.modeling.configuration_backbones import TextDecoderConfig, VisionTowerConfig
from vlm_patterns.modeling.text_decoder import TextDecoder
from vlm_patterns.modeling.vision_transformer import VisionTransformer


def tiny_decoder_config(**overrides) -> TextDecoderConfig:
    fields = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    return TextDecoderConfig(**{**fields, **overrides})


def decoder_from_llama(seed: int = 0) -> tuple[TextDecoder, LlamaForCausalLM]:
    """A Llama from transformers and our decoder holding the same weights."""
    config = tiny_decoder_config()
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=config.norm_eps,
        )  # fmt: skip
    ).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in llama.parameters():
            p.normal_(0, 0.2)
    ours = TextDecoder(config).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in llama.state_dict().items() if k.startswith("model.")})
    config._attn_implementation_internal = "sdpa"
    return ours, llama


def test_decoder_matches_llama():
    ours, llama = decoder_from_llama()
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        hidden, _, _ = ours(llama.model.embed_tokens(ids))
        assert torch.allclose(hidden, llama.model(ids).last_hidden_state, atol=1e-5)


def test_left_padding_does_not_change_real_tokens():
    ours, llama = decoder_from_llama(1)
    ids = torch.randint(3, 96, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    embed = llama.model.embed_tokens
    with torch.no_grad():
        alone, _, _ = ours(embed(ids))
        with_pad, _, _ = ours(embed(padded), attention_mask=mask)  # positions are counted over real tokens
    assert torch.allclose(alone, with_pad[:, 4:], atol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_cache_continues_the_sequence(implementation):
    ours, llama = decoder_from_llama(2)
    ours.config._attn_implementation_internal = implementation
    embeds = llama.model.embed_tokens(torch.randint(0, 96, (2, 12)))
    with torch.no_grad():
        full, _, _ = ours(embeds)
        first, cache, _ = ours(embeds[:, :8], use_cache=True)
        rest, _, _ = ours(embeds[:, 8:], cache=cache)
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-5)


def test_partial_rotary_and_persimmon_style_fields_run():
    config = tiny_decoder_config(norm_type="layernorm", mlp_type="plain", hidden_act="relu2", qkv_bias=True,
                                 output_bias=True, mlp_bias=True, qk_norm=True, partial_rotary_factor=0.5,
                                 num_key_value_heads=6)  # fmt: skip
    config._attn_implementation_internal = "sdpa"
    decoder = TextDecoder(config)
    assert decoder.rotary_emb.inv_freq.shape == (2,)  # head_dim 8, half of it rotated: 2 frequency pairs
    assert isinstance(decoder.norm, torch.nn.LayerNorm) and decoder.layers[
        0
    ].self_attn.q_layernorm.normalized_shape == (8,)
    hidden, _, _ = decoder(torch.randn(1, 5, 48))
    assert hidden.shape == (1, 5, 48) and torch.isfinite(hidden).all()


def test_mrope_with_equal_positions_is_plain_rope():
    config = tiny_decoder_config(mrope_section=[1, 1, 2], num_attention_heads=6)  # head_dim 8: 4 pairs
    rotary = TextDecoder(config).rotary_emb
    plain = TextDecoder(tiny_decoder_config()).rotary_emb
    positions = torch.arange(10).view(1, 10)
    cos, sin = rotary(positions.unsqueeze(0).expand(3, 1, 10), torch.float32)
    plain_cos, plain_sin = plain(positions, torch.float32)
    assert torch.equal(cos, plain_cos) and torch.equal(sin, plain_sin)


def test_invalid_shapes_are_refused():
    # Configs are strict dataclasses: a broken shape rule fails at construction, naming the rule.
    with pytest.raises(StrictDataclassError, match="not a multiple of num_key_value_heads"):
        tiny_decoder_config(num_key_value_heads=4)
    with pytest.raises(StrictDataclassError, match="mrope_section"):
        tiny_decoder_config(mrope_section=[1, 1, 1])
    with pytest.raises(StrictDataclassError, match="expected one of"):
        tiny_decoder_config(norm_type="batchnorm")
    with pytest.raises(StrictDataclassError, match="not a multiple of patch_size"):
        VisionTowerConfig(image_size=30, patch_size=14)


def test_vision_hidden_state_indices():
    config = VisionTowerConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                               image_size=8, patch_size=4)  # fmt: skip
    config._attn_implementation_internal = "eager"
    tower = VisionTransformer(config).eval()
    pixels = torch.randn(2, 3, 8, 8)
    first, last, penultimate = tower(pixels, [0, -1, -2])
    assert first.shape == (2, 5, 16)
    assert torch.equal(last, tower(pixels, [3])[0]) and torch.equal(penultimate, tower(pixels, [2])[0])
    with pytest.raises(ValueError, match="out of range"):
        tower(pixels, [4])


def test_device_map_keeps_layers_whole(llava_pair):
    from accelerate import infer_auto_device_map
    from transformers import AutoModelForImageTextToText

    _, converted = llava_pair()
    model = AutoModelForImageTextToText.from_pretrained(converted)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    device_map = infer_auto_device_map(
        model, max_memory={0: size // 3, 1: size // 3, "cpu": 2 * size}, no_split_module_classes=model._no_split_modules
    )
    assert len(set(device_map.values())) == 3  # the model really is spread
    for name in device_map:  # never inside a layer: residual adds need both operands on one device
        assert ".layers." not in name or re.search(r"\.layers\.\d+$", name), name
