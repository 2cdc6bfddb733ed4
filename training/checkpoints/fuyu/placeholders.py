"""How the projection and early-fusion patterns enter the language model: image features written, in order, over
the embeddings of placeholder tokens the processor put in the text (LLaVA's `<image>`, Qwen2-VL's
`<|image_pad|>`, Fuyu's `|SPEAKER|`). One function for the three families.

Axes: B batch, T tokens, D text width, F features of all images (in placeholder order).
"""

import torch
from torch import nn


def placeholder_mask(
    embeddings: nn.Embedding, token_id: int, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor
) -> torch.Tensor:
    """(B, T) bool: where the placeholder token is; found by its embedding row when only embeddings are given."""
    if input_ids is not None:
        return input_ids == token_id
    # Called, not indexed: with device_map offload the weight lives elsewhere until the module runs.
    row = embeddings(torch.tensor(token_id, device=inputs_embeds.device))
    return (inputs_embeds == row).all(-1)


def count_mismatch(placeholders: int, features: int, hint: str) -> ValueError:
    return ValueError(
        f"The prompt has {placeholders} image placeholder tokens but the images give {features} features; {hint}"
    )


def scatter_placeholders(
    inputs_embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor, hint: str
) -> torch.Tensor:
    """inputs_embeds (B, T, D) with `features` (F, D), or (I, N, D) flattened to (I * N, D), written over the F
    positions of `mask` (B, T), row by row. A count mismatch is a `ValueError`; `hint` says how to fix the prompt."""
    features = features.reshape(-1, inputs_embeds.shape[-1])  # (F, D)
    if torch.compiler.is_compiling():  # checked on the device: compiled code does not read the count back
        message = f"The prompt's image placeholder tokens do not match the images' features in number; {hint}"
        torch._assert_async(mask.sum() == features.shape[0], message)
    elif (placeholders := int(mask.sum())) != features.shape[0]:
        raise count_mismatch(placeholders, features.shape[0], hint)
    # With device_map="auto" the vision side may sit on another device than the embeddings.
    features = features.to(inputs_embeds.device, inputs_embeds.dtype)
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1).to(inputs_embeds.device), features)
