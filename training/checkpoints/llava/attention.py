"""Attention glue shared by every block: our eager kernel plus transformers' registry (sdpa, flash, ...).

Axes: B batch, H query heads, Hkv key/value heads, Tq queries, Tk keys, d head dim.
"""

from collections.abc import Callable

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. q (B, H, Tq, d), k/v (B, Hkv, Tk, d) -> out (B, Tq, H, d), weights (B, H, Tq, Tk).

    The mask is either additive (float, as transformers' eager mask builder returns) or boolean (True = keep).
    Softmax runs in float32, as the reference implementations do.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)  # (B, H, Tk, d)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Tq, Tk)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, Tq, H, d)
    return out, weights


def attention_function(config) -> Callable:
    """The kernel chosen by `config._attn_implementation` ("eager", "sdpa", "flash_attention_2", ...)."""
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention)


def masked_attention_function(config) -> Callable:
    """The kernel for attention under an arbitrary additive mask (cross-attention to chosen images).

    Flash-attention kernels take only causal/padding masks, so they fall back to sdpa here.
    """
    implementation = config._attn_implementation
    if implementation not in ("eager", "sdpa"):
        implementation = "sdpa"
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
