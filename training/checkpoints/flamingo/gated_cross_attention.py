"""Gated cross-attention: text tokens read the visual tokens of their image through gates that start closed.

    x = x + tanh(alpha_attn)  * CrossAttention(norm(x), visual tokens of the token's image)
    x = x + tanh(alpha_dense) * FeedForward(norm(x))

Both alphas start at 0, so a new block passes the frozen language model's activations through unchanged and
training opens the gates gradually (Flamingo, Alayrac et al. 2022, section 2.2). The attention branch is
zero for tokens that have no image before them; the feed-forward branch runs for every token.
Blocks sit *before* chosen decoder layers; the model's loop interleaves them (modeling_flamingo.py).
Parameter names follow IDEFICS (`cross_attn.q_proj`, `alpha_cross_attn`, `mlp.gate_proj`, ...).

Axes: B batch, T text tokens, M visual tokens of all images (images x latents), D text width, Dv vision width,
H heads, d head dim.
"""

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import masked_attention_function
from .configuration_flamingo import FlamingoPatternConfig
from .text_decoder import DecoderMLP, make_norm


class CrossAttention(nn.Module):
    """Queries from text, keys and values from the visual tokens; optional per-head q/k norm (IDEFICS)."""

    def __init__(self, config: FlamingoPatternConfig):
        super().__init__()
        self.config = config
        self.num_heads, self.head_dim = config.cross_attn_num_heads, config.cross_attn_head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.num_key_value_groups = 1
        text_width, vision_width = config.text_config.hidden_size, config.vision_config.hidden_size
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(text_width, inner, bias=False)
        self.k_proj = nn.Linear(vision_width, inner, bias=False)
        self.v_proj = nn.Linear(vision_width, inner, bias=False)
        self.o_proj = nn.Linear(inner, text_width, bias=False)
        if config.cross_attn_qk_norm:
            self.q_layer_norm = make_norm(config.cross_attn_norm_type, self.head_dim, config.cross_attn_norm_eps)
            self.k_layer_norm = make_norm(config.cross_attn_norm_type, self.head_dim, config.cross_attn_norm_eps)

    def media_keys_values(self, visual_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """visual tokens (B, M, Dv) -> keys, values (B, H, M, d). Computed once per image set, then cached."""
        B, M, _ = visual_tokens.shape
        k = self.k_proj(visual_tokens).view(B, M, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(visual_tokens).view(B, M, self.num_heads, self.head_dim).transpose(1, 2)
        if self.config.cross_attn_qk_norm:
            k = self.k_layer_norm(k)
        return k, v

    def forward(
        self, hidden_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, media_bias: torch.Tensor
    ) -> torch.Tensor:
        """hidden (B, T, D), keys/values (B, H, M, d), media_bias (B, 1, T, M) additive -> (B, T, D)."""
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        if self.config.cross_attn_qk_norm:
            q = self.q_layer_norm(q)
        out, _ = masked_attention_function(self.config)(
            self, q, keys, values, media_bias, scaling=self.scaling, dropout=0.0
        )
        return self.o_proj(out.reshape(B, T, -1))


class GatedCrossAttentionBlock(GradientCheckpointingLayer):
    def __init__(self, config: FlamingoPatternConfig):
        super().__init__()
        width = config.text_config.hidden_size
        self.input_layernorm = make_norm(config.cross_attn_norm_type, width, config.cross_attn_norm_eps)
        self.cross_attn = CrossAttention(config)
        self.post_attention_layernorm = make_norm(config.cross_attn_norm_type, width, config.cross_attn_norm_eps)
        self.mlp = DecoderMLP(
            width, config.cross_attn_intermediate_size, config.cross_attn_mlp_type, config.cross_attn_hidden_act, False
        )
        gate_shape = (1,) if config.gate_shape == "scalar" else (1, 1, width)
        self.alpha_cross_attn = nn.Parameter(torch.zeros(gate_shape))
        self.alpha_dense = nn.Parameter(torch.zeros(gate_shape))

    def forward(
        self,
        hidden_states: torch.Tensor,
        media: tuple[torch.Tensor, torch.Tensor] | None,
        media_bias: torch.Tensor | None,
        sees_image: torch.Tensor | None,
    ) -> torch.Tensor:
        """hidden (B, T, D); media: this block's (keys, values) or None when there are no images;
        media_bias (B, 1, T, M); sees_image (B, T) bool: tokens with an image before them."""
        if media is not None:
            attended = self.cross_attn(self.input_layernorm(hidden_states), *media, media_bias)
            # A token with no image has every key masked; its (uniform) attention must not leak in.
            attended = attended * sees_image.unsqueeze(-1).to(attended.dtype)
            hidden_states = hidden_states + torch.tanh(self.alpha_cross_attn) * attended
        dense = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + torch.tanh(self.alpha_dense) * dense
