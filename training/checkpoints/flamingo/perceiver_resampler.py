"""Perceiver Resampler: however many image features come in, a fixed number of visual tokens come out.

A small set of learned latents cross-attends to the image features. Keys and values are computed over the
features *concatenated with the latents*, so in the same step the latents also attend to one another
(Flamingo, Alayrac et al. 2022, appendix A.1.1). A feed-forward follows; `depth` such blocks, then a LayerNorm.
The language model then attends to N latents per image instead of hundreds of patches.

features (I, P, Dv) -> latents (I, N, Dv)
Parameter names follow IDEFICS (`blocks.k.0.q_proj`, `blocks.k.1.fc`, ...).

Axes: I images, P image features, N latents, Dv vision width, H heads, d head dim.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN

from .attention import attention_function
from .configuration_flamingo import FlamingoPatternConfig


class PerceiverAttention(nn.Module):
    def __init__(self, config: FlamingoPatternConfig):
        super().__init__()
        self.config = config
        width = config.vision_config.hidden_size
        self.num_heads, self.head_dim = config.resampler_num_heads, config.resampler_head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.num_key_value_groups = 1
        self.context_layer_norm = nn.LayerNorm(width, eps=config.resampler_norm_eps)
        self.latents_layer_norm = nn.LayerNorm(width, eps=config.resampler_norm_eps)
        inner = self.num_heads * self.head_dim
        # No biases, as in the Perceiver and Flamingo papers.
        self.q_proj = nn.Linear(width, inner, bias=False)
        self.k_proj = nn.Linear(width, inner, bias=False)
        self.v_proj = nn.Linear(width, inner, bias=False)
        self.output_proj = nn.Linear(inner, width, bias=False)
        if config.resampler_qk_norm:  # IDEFICS: LayerNorm over each head of q and k
            self.q_layer_norm = nn.LayerNorm(self.head_dim, eps=config.resampler_norm_eps)
            self.k_layer_norm = nn.LayerNorm(self.head_dim, eps=config.resampler_norm_eps)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """context (I, P, Dv), latents (I, N, Dv) -> update of the latents (I, N, Dv)."""
        images, N, _ = latents.shape
        context = self.context_layer_norm(context)
        latents = self.latents_layer_norm(latents)
        keys_from = torch.cat([context, latents], dim=1)  # (I, P + N, Dv): latents see features and each other
        q = self.q_proj(latents).view(images, N, self.num_heads, self.head_dim).transpose(1, 2)  # (I, H, N, d)
        k = self.k_proj(keys_from).view(images, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (I, H, P + N, d)
        v = self.v_proj(keys_from).view(images, -1, self.num_heads, self.head_dim).transpose(1, 2)
        if self.config.resampler_qk_norm:
            q, k = self.q_layer_norm(q), self.k_layer_norm(k)
        out, _ = attention_function(self.config)(self, q, k, v, None, scaling=self.scaling, dropout=0.0)
        return self.output_proj(out.reshape(images, N, -1))


class PerceiverMLP(nn.Module):
    """LayerNorm, Linear, activation (IDEFICS: ReLU; OpenFlamingo: GELU), Linear; no biases."""

    def __init__(self, config: FlamingoPatternConfig):
        super().__init__()
        width = config.vision_config.hidden_size
        self.ln = nn.LayerNorm(width, eps=config.resampler_norm_eps)
        self.fc = nn.Linear(width, width * config.resampler_mlp_ratio, bias=False)
        self.act = ACT2FN[config.resampler_hidden_act]
        self.c_proj = nn.Linear(width * config.resampler_mlp_ratio, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.fc(self.ln(x))))


class PerceiverResampler(nn.Module):
    def __init__(self, config: FlamingoPatternConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(config.num_latents, config.vision_config.hidden_size))
        self.blocks = nn.ModuleList(
            [nn.ModuleList([PerceiverAttention(config), PerceiverMLP(config)]) for _ in range(config.resampler_depth)]
        )
        self.layer_norm = nn.LayerNorm(config.vision_config.hidden_size, eps=config.resampler_norm_eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (I, P, Dv) -> visual tokens (I, N, Dv)."""
        latents = self.latents.to(features.dtype).expand(features.shape[0], -1, -1)  # (I, N, Dv)
        for attention, mlp in self.blocks:
            latents = latents + attention(features, latents)
            latents = latents + mlp(latents)
        return self.layer_norm(latents)
