"""The one decoder-only language model every family uses; no pattern logic lives here.

Llama (LLaVA, IDEFICS), Qwen2 (+ multimodal RoPE) and Persimmon (Fuyu) differ only by fields of
`TextDecoderConfig`. Parameter names follow the Llama checkpoints (`q_proj`, `gate_proj`, `input_layernorm`,
...); converters map the other layouts onto them.

Axes: B batch, T new tokens, D hidden, H query heads, Hkv key/value heads, d head dim, r rotary dim.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import attention_function
from .configuration_backbones import TextDecoderConfig
from .input_checks import check_attention_mask


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the input dtype, as Llama does: bf16 results then match bit for bit.
        input_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)


def make_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    """ "layernorm" (with bias) or "rmsnorm"."""
    if norm_type == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    return RMSNorm(dim, eps=eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings, 1D or multimodal (M-RoPE).

    With `mrope_section` the positions are (3, B, T): temporal, height and width indices, and the r/2
    frequency pairs are split into three consecutive chunks, each driven by one of the three positions.
    Text tokens carry equal t/h/w indices, which reduces M-RoPE to plain 1D RoPE.
    """

    def __init__(self, config: TextDecoderConfig):
        super().__init__()
        self.rotary_dim = config.rotary_dim
        self.theta = config.rope_theta
        self.mrope_section = config.mrope_section
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        return 1.0 / (self.theta**exponents)  # (r/2,)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T), or (3, B, T) for M-RoPE -> cos, sin (B, T, r) in `dtype`."""
        inv_freq = self.inv_freq.float()
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, r/2) or (3, B, T, r/2)
        if self.mrope_section is not None:
            if position_ids.dim() == 2:  # text only: t = h = w
                freqs = freqs.unsqueeze(0).expand(3, *freqs.shape)
            chunks = freqs.split(self.mrope_section, dim=-1)
            freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)  # (B, T, r/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, r)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, d); rotates the first r dims (all of them unless the rotary is partial)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, r)
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class DecoderAttention(nn.Module):
    def __init__(self, config: TextDecoderConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads  # read by sdpa for GQA
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.output_bias)
        if config.qk_norm:  # Persimmon: LayerNorm over each head of q and k, before the rotation
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        last_position_only: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        """hidden_states (B, T, D) -> (B, T, D); with `last_position_only`, keys and values for all T tokens (the
        cache needs them) but the query, and so the output (B, 1, D), for the last token alone."""
        B, T, _ = hidden_states.shape
        queries = hidden_states[:, -1:] if last_position_only else hidden_states
        Tq = queries.shape[1]
        q = self.q_proj(queries).view(B, Tq, -1, self.head_dim)  # (B, Tq, H, d)
        k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim)  # (B, T, Hkv, d)
        v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        if self.config.qk_norm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        cos, sin = position_embeddings
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # (B, Hkv, T, d)
        if last_position_only:
            cos, sin = cos[:, -1:], sin[:, -1:]
            if attention_mask is not None and attention_mask.dim() == 4:  # (B, 1, T, S): the last query's row
                attention_mask = attention_mask[:, :, -1:]
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # (B, H, Tq, d)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, past + T, d)
        # A caller may pick the kernel for this call (the static decode path's single-query steps on CPU).
        kernel = kwargs.pop("attention_function", None) or attention_function(self.config)
        out, _ = kernel(
            self,
            q,
            k,
            v,
            attention_mask,
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
            **kwargs,
        )
        return self.o_proj(out.reshape(B, Tq, -1))


# Activations applied in place when no gradient is recorded: the MLP's widest tensors are then written once
# instead of two or three times (same values; with autograd on, the usual out-of-place functions run).
INPLACE_ACTIVATIONS = {
    "silu": lambda x: torch.nn.functional.silu(x, inplace=True),
    "relu": torch.relu_,
    "relu2": lambda x: torch.relu_(x).square_(),
}


class DecoderMLP(nn.Module):
    """Gated (SwiGLU: down(act(gate(x)) * up(x))) or plain (down(act(up(x)))) feed-forward."""

    def __init__(self, hidden_size: int, intermediate_size: int, mlp_type: str, hidden_act: str, bias: bool):
        super().__init__()
        self.gated = mlp_type == "gated"
        if self.gated:
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[hidden_act]
        self.act_inplace = INPLACE_ACTIVATIONS.get(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inplace = self.act_inplace is not None and not torch.is_grad_enabled()
        hidden = self.gate_proj(x) if self.gated else self.up_proj(x)
        hidden = self.act_inplace(hidden) if inplace else self.act_fn(hidden)
        if self.gated:
            hidden = hidden.mul_(self.up_proj(x)) if inplace else hidden * self.up_proj(x)
        return self.down_proj(hidden)


class DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: TextDecoderConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(config.norm_type, config.hidden_size, config.norm_eps)
        self.self_attn = DecoderAttention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config.norm_type, config.hidden_size, config.norm_eps)
        self.mlp = DecoderMLP(
            config.hidden_size, config.intermediate_size, config.mlp_type, config.hidden_act, config.mlp_bias
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        last_position_only: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        """(B, T, D) -> (B, T, D), or (B, 1, D) with `last_position_only` (see `only_last_position`)."""
        residual = hidden_states[:, -1:] if last_position_only else hidden_states
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache, last_position_only,
            **kwargs,
        )  # fmt: skip
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def only_last_position(kwargs: dict, mask, output_hidden_states: bool, length: int) -> bool:
    """Pops `last_position_only` from a forward's `kwargs` -> whether the last decoder layer may run its queries,
    attention output and MLP for the last of its `length` tokens alone (it still writes every token's keys and
    values). The causal-LM head asks for it when it keeps one position's logits (`logits_to_keep=1`, as
    generation's prompt pass does): the last layer's other positions feed nothing then, and skipping them saves
    most of a layer. Not for one token (nothing to skip), with all hidden states asked for, or with a mask that
    cannot be cut to one row (flex attention's)."""
    asked = kwargs.pop("last_position_only", False)
    cuttable = mask is None or isinstance(mask, torch.Tensor)
    return bool(asked) and length > 1 and not output_hidden_states and cuttable


class TextDecoder(nn.Module):
    """Token embeddings, decoder layers and the final norm (the LM head belongs to the family model).

    `prepare` and the per-layer loop are separate so a family can interleave its own blocks between the
    layers (Flamingo's gated cross-attention) with an explicit loop of its own.
    """

    def __init__(self, config: TextDecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = make_norm(config.norm_type, config.hidden_size, config.norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def prepare(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: Cache | None,
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        """The causal mask and the rotary tables for `inputs_embeds` (B, T, D) after `cache`'s tokens."""
        B, T, _ = inputs_embeds.shape
        past = cache.get_seq_length() if cache is not None else 0
        check_attention_mask(attention_mask, B, T, past)
        if past + T > self.config.max_position_embeddings:
            raise ValueError(
                f"The sequence is {past + T} tokens long, more than the {self.config.max_position_embeddings} "
                "positions (max_position_embeddings) this language model was trained for."
            )
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                # Count only real tokens, so a left-padded row gets the positions it would get alone.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
            else:
                position_ids = torch.arange(past, past + T, device=inputs_embeds.device).expand(B, T)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            # 2D positions let transformers detect packed sequences; M-RoPE's 3D positions play no part in masking.
            position_ids=position_ids if position_ids.dim() == 2 else None,
        )
        return mask, self.rotary_emb(position_ids, inputs_embeds.dtype)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, Cache | None, tuple[torch.Tensor, ...] | None]:
        """inputs_embeds (B, T, D) -> (normed hidden states (B, T, D), cache, all hidden states or None)."""
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        mask, position_embeddings = self.prepare(inputs_embeds, attention_mask, position_ids, cache)
        trim = only_last_position(kwargs, mask, output_hidden_states, inputs_embeds.shape[1])
        hidden_states = inputs_embeds
        all_hidden_states = [hidden_states] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            # The cache goes by keyword: gradient checkpointing drops it only then, so the recompute does not append twice.
            last = trim and i == len(self.layers) - 1
            hidden_states = layer(
                hidden_states, position_embeddings, mask, cache=cache, last_position_only=last, **kwargs
            )
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states[-1] = hidden_states  # the last entry is the normed output, as in transformers
        return hidden_states, cache, tuple(all_hidden_states) if output_hidden_states else None
