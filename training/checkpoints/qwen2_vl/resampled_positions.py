"""Learned absolute positions for images of any size: one square table of side x side learned vectors, resampled to
each image's patch grid by bilinear interpolation with the corners aligned (an image's first and last rows and
columns read the table's own), and added to the patch embeddings.

Qwen3-VL adds such positions to its ViT's patches beside the 2D rotary ones; Mono-InternVL, which has no vision
encoder, to its patch embeddings before the language model. Qwen2-VL's and Fuyu's own checkpoints have none (their
places reach the model only through rotary phases and, for Fuyu, the newline tokens); `num_position_embeddings` in
their configs turns a table on.
"""

import math

import torch
from torch import nn


def check_num_position_embeddings(count: int) -> None:
    """0 (no table) or a square of at least 4 entries."""
    side = math.isqrt(count) if count > 0 else 0
    if count and (side < 2 or side * side != count):
        raise ValueError(
            f"num_position_embeddings must be 0 (none) or a square of at least 4 (a table of side x side learned "
            f"positions), not {count}"
        )


def resampling_taps(places: torch.Tensor, sizes: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each patch reads the side x side table resampled to its image's grid: `places` (N, 2) its row and
    column, `sizes` (N, 2) its image's rows and columns -> (N, 4) indices into the flattened table and (N, 4)
    weights. Indices are clamped into the table, so a token that is not a patch reads some entry, never past it."""
    source = places.float() * (side - 1) / (sizes.to(places.device).float() - 1).clamp(min=1)  # its place on the table
    low = source.floor().clamp(0, side - 1)
    (row_weight, column_weight), (row, column) = (source - low).clamp(0, 1).unbind(-1), low.long().unbind(-1)
    row_below, column_right = (row + 1).clamp(max=side - 1), (column + 1).clamp(max=side - 1)
    indices = torch.stack([row * side + column, row * side + column_right,
                           row_below * side + column, row_below * side + column_right], dim=-1)  # fmt: skip
    weights = torch.stack([(1 - row_weight) * (1 - column_weight), (1 - row_weight) * column_weight,
                           row_weight * (1 - column_weight), row_weight * column_weight], dim=-1)  # fmt: skip
    return indices, weights


def resampled_positions(table: nn.Embedding, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The table read at `resampling_taps`: (..., 4) -> (..., D), in float32 where the weights are."""
    return (table(indices) * weights[..., None]).sum(-2)
