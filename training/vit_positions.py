"""`--positions-as-places`: a ViT's learned positions set to its patches' places, larger than the patches.

A CLIP-style ViT adds a learned position to each patch's embedding, and initialised as usual (small and random) that
position is about a sixteenth of the patch's own embedding here. The encoder hands on little of where each token
lies, and what little it hands on, the language model could not learn to use: trained on the position question,
LLaVA stayed on the answer's prior in every run that left positions so (the README's left/right bullet). Set instead
to 2D sin-cos of each patch's column and row (as MAE fixes them) at twice the patches' mean norm, the same model left
that prior within a thousand steps. Over 8 x 8 patches most of such a table's norm is the same at every place (the
cosines of its slow frequencies stay near 1): the part that varies is about as large as the patches. Where the table
is set matters. In a new model it costs shapes: the vision stage then names single shapes far slower (55% at step
1000 against 79%). Set after the stage, in a model whose encoder has already learned shapes with small positions, it
is the shipped recipe's third run (training/retrain.sh, POSITIONS=reset): Flamingo then answered the position
question at 85% after 5000 steps of every kind, against 43% for the same steps without it. Centring the table (the
same varying part, without the shared one) named shapes no faster and, in one run, did not leave the position
question's prior by step 1800, though its loss fell as far. The positions stay learned parameters; this is where
they start, and a checkpoint is laid out exactly as before. Qwen2-VL's own ViT has no learned positions (2D rotary),
and Fuyu has no encoder: the recipes give both a square table resampled to each image and added to the patches, as
Qwen3-VL and Mono-InternVL have (`start_resampled_positions_as_places`; for a checkpoint without one, the recipe adds
it first).
"""

import math

import numpy as np
import torch

from .synthetic_vqa import draw_scene

# The positions' mean norm, in patch embeddings' mean norms: at 1 (the varying part about half the patches' norm),
# the measured run stayed on the position question's prior to step 1800; at 2 it was off it by step 900.
SCALE = 2.0
PICTURES = 32  # task pictures drawn to measure the patch embeddings' norm (a fixed seed: the same start each time)


def sincos_places(columns: int, rows: int, width: int) -> torch.Tensor:
    """(rows * columns, width) in raster order: a quarter of the width each for the sine and cosine of the column
    and of the row, at frequencies from 1 to 1/100 per patch."""
    if width % 4:
        raise ValueError(f"2D sin-cos places need a width divisible by 4, not {width}")
    quarter = width // 4
    frequencies = 1.0 / 100 ** (torch.arange(quarter) / quarter)
    row, column = torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij")
    angles = [axis.flatten()[:, None].float() * frequencies for axis in (column, row)]
    return torch.cat([f(angle) for angle in angles for f in (torch.sin, torch.cos)], dim=-1)


def task_pixels(image_processor) -> torch.Tensor:
    """The same task pictures each time (seed 0), prepared by `image_processor`: what the patches' norm is measured on."""
    rng = np.random.default_rng(0)
    pictures = [draw_scene(rng, int(rng.integers(1, 4)))[0] for _ in range(PICTURES)]
    return image_processor(pictures, return_tensors="pt")["pixel_values"]


def scaled_places(side: int, patches: torch.Tensor, scale: float = SCALE) -> torch.Tensor:
    """`sincos_places` over a side x side grid, scaled to `scale` times the mean norm of `patches` (..., width)."""
    table = sincos_places(side, side, patches.shape[-1]).to(patches)
    return table * (scale * patches.norm(dim=-1).mean() / table.norm(dim=-1).mean())


@torch.no_grad()
def start_clip_positions_as_places(embeddings, image_processor, scale: float = SCALE) -> None:
    """Set a square CLIP-style ViT's patch positions (`embeddings.position_embedding`, the class token's first and
    left as it is) to `scaled_places`, measured on task pictures prepared by `image_processor`."""
    pixels = task_pixels(image_processor)
    pixels = pixels.flatten(0, 1) if pixels.dim() == 5 else pixels  # Flamingo's (B, I, C, S, S)
    weight = embeddings.position_embedding.weight
    patches = embeddings.patch_embedding(pixels.to(weight.dtype)).flatten(2).transpose(1, 2)  # (I, P, D)
    weight[1:] = scaled_places(math.isqrt(weight.shape[0] - 1), patches, scale)


@torch.no_grad()
def start_resampled_positions_as_places(table, patches: torch.Tensor, scale: float = SCALE) -> None:
    """Set a square table of learned positions that is resampled to each image (Qwen2-VL's and Fuyu's, in the
    recipes; modeling/resampled_positions.py) to `scaled_places` of `patches`, the patch embeddings of task pictures."""
    table.weight.copy_(scaled_places(math.isqrt(table.weight.shape[0]), patches, scale))
