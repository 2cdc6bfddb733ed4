"""transformers' language-model configs <-> our shared decoder's config (the fields, both ways).

Llama, Qwen2 and Qwen2-VL's text model map onto `TextDecoderConfig`; anything else is refused with its name,
never approximated.
"""

from vlm_patterns.modeling.configuration_backbones import TextDecoderConfig

SUPPORTED = ("llama", "qwen2", "qwen2_vl_text")


def rope_parameters(text_config) -> dict:
    rope = dict(getattr(text_config, "rope_parameters", None) or {})
    rope.setdefault("rope_type", "default")
    if "rope_theta" not in rope:
        rope["rope_theta"] = getattr(text_config, "rope_theta", 10000.0)
    if rope["rope_type"] not in ("default", "mrope"):
        raise NotImplementedError(
            f"RoPE scaling {rope['rope_type']!r} is not implemented by the shared decoder (only plain RoPE)"
        )
    return rope


def decoder_fields(text_config) -> dict:
    """`TextDecoderConfig` keyword arguments for a transformers Llama / Qwen2 / Qwen2-VL text config."""
    model_type = text_config.model_type
    if model_type not in SUPPORTED:
        raise NotImplementedError(
            f"The language model is {model_type!r}; the shared decoder implements {', '.join(SUPPORTED)}"
        )
    if getattr(text_config, "use_sliding_window", False):
        raise NotImplementedError(
            "Sliding-window attention (use_sliding_window) is not implemented by the shared decoder"
        )
    rope = rope_parameters(text_config)
    if model_type == "llama":
        biases = dict(
            qkv_bias=text_config.attention_bias, output_bias=text_config.attention_bias, mlp_bias=text_config.mlp_bias
        )
    else:  # Qwen2: biases on q, k and v only
        biases = dict(qkv_bias=True, output_bias=False, mlp_bias=False)
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return dict(
        vocab_size=text_config.vocab_size,
        hidden_size=text_config.hidden_size,
        intermediate_size=text_config.intermediate_size,
        num_hidden_layers=text_config.num_hidden_layers,
        num_attention_heads=text_config.num_attention_heads,
        num_key_value_heads=text_config.num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=text_config.max_position_embeddings,
        norm_type="rmsnorm",
        norm_eps=text_config.rms_norm_eps,
        mlp_type="gated",
        hidden_act=text_config.hidden_act,
        rope_theta=float(rope["rope_theta"]),
        mrope_section=list(rope["mrope_section"]) if rope.get("mrope_section") else None,
        pad_token_id=text_config.pad_token_id,
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        **biases,
    )


def transformers_text_config(config: TextDecoderConfig, model_type: str, tie_word_embeddings: bool):
    """transformers' config of `model_type` ("llama", "qwen2", "qwen2_vl_text") with our decoder's architecture."""
    from transformers import LlamaConfig, Qwen2Config
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig

    if (
        config.norm_type != "rmsnorm"
        or config.mlp_type != "gated"
        or config.qk_norm
        or config.partial_rotary_factor != 1
    ):
        raise NotImplementedError(f"This language model has no {model_type} equivalent in transformers")
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.mrope_section is not None:
        rope["mrope_section"] = list(config.mrope_section)
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm_eps,
        hidden_act=config.hidden_act,
        rope_parameters=rope,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    if model_type == "llama":
        if config.qkv_bias != config.output_bias:
            raise NotImplementedError("Llama has one attention_bias for q, k, v and o alike")
        return LlamaConfig(**common, head_dim=config.head_dim, attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    if not config.qkv_bias or config.output_bias or config.mlp_bias:
        raise NotImplementedError("Qwen2 has biases on q, k and v only")
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        raise NotImplementedError("Qwen2 derives head_dim from hidden_size / num_attention_heads")
    return (Qwen2Config if model_type == "qwen2" else Qwen2VLTextConfig)(**common)
