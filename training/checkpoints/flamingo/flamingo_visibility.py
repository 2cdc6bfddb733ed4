"""Which image each text token may see: Flamingo's rule.

A token sees only the most recent `<image>` at or before it; tokens before the first image see none. With a reset
token (IDEFICS: `</s>`), tokens after it see none until the next image, so packed documents do not look at each
other's pictures. The rule is computed with cumulative sums and maxima over the sequence, and continues across
calls (prefill, then one token per decode step) from an `ImageState` that the cache carries (flamingo_cache.py).

Axes: B batch, T tokens of this call, I images per row.
"""

from dataclasses import dataclass

import torch


@dataclass
class ImageState:
    """Per row: images counted so far, the image the next text token sees (-1: none), images available."""

    count: torch.Tensor  # (B,) long
    current: torch.Tensor  # (B,) long
    available: torch.Tensor  # (B,) long

    @classmethod
    def start(cls, batch: int, available: torch.Tensor, device) -> "ImageState":
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        return cls(zeros, zeros - 1, available.to(device=device, dtype=torch.long))


def track_images(
    input_ids: torch.Tensor, image_token_id: int, reset_token_id: int | None, state: ImageState
) -> tuple[torch.Tensor, ImageState]:
    """The image index each token sees, (B, T) long with -1 for none, and the state after these tokens.

    `<image>` tokens beyond the images available to a row are read as text (they can only appear in a
    generated continuation; the model rejects them in a prompt).
    """
    B, T = input_ids.shape
    positions = torch.arange(T, device=input_ids.device).expand(B, T)
    is_image = input_ids == image_token_id
    count = state.count.unsqueeze(1) + is_image.long().cumsum(-1)  # (B, T) images up to and including t
    is_image = is_image & (count <= state.available.unsqueeze(1))
    count = count.clamp(max=state.available.unsqueeze(1))
    last_image = torch.where(is_image, positions, -1).cummax(-1).values  # (B, T) latest image position <= t
    index = torch.where(last_image >= 0, count - 1, state.current.unsqueeze(1))
    is_reset = torch.zeros_like(is_image) if reset_token_id is None else input_ids == reset_token_id
    if reset_token_id is not None:
        last_reset = torch.where(is_reset, positions, -1).cummax(-1).values
        reset_before = torch.cat([last_reset.new_full((B, 1), -1), last_reset[:, :-1]], dim=1)  # strictly before t
        index = index.masked_fill(reset_before > last_image, -1)
    if T == 0:
        return index, state
    current = torch.where(is_reset[:, -1], -1, index[:, -1])  # the reset token itself still sees its image
    return index, ImageState(count[:, -1], current, state.available)


def image_attention(index: torch.Tensor, num_images: int) -> torch.Tensor:
    """index (B, T) -> (B, T, I) bool: which image each token attends to (one-hot, or none)."""
    images = torch.arange(num_images, device=index.device)
    return index.unsqueeze(-1) == images


def media_bias(sees: torch.Tensor, tokens_per_image: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, I) bool -> additive attention mask (B, 1, T, I * N) over the visual tokens of all images."""
    bias = torch.zeros(sees.shape, dtype=dtype, device=sees.device)
    bias = bias.masked_fill(~sees, torch.finfo(dtype).min)
    return bias.repeat_interleave(tokens_per_image, dim=-1).unsqueeze(1)


def images_per_row(image_mask: torch.Tensor | None, num_images: int, batch: int) -> torch.Tensor:
    """(B,) long: the real images of each row (`image_mask` (B, I) marks them; without it, all `num_images`)."""
    if image_mask is not None:
        return image_mask.to(torch.bool).sum(-1).long()
    return torch.full((batch,), num_images, dtype=torch.long)


def check_image_tokens(input_ids: torch.Tensor, image_token_id: int, has_images: bool, state: ImageState,
                       past: int) -> None:  # fmt: skip
    """Each row's `<image>` tokens must match its images: a clear error instead of a silent mismatch."""
    tokens = (input_ids == image_token_id).sum(-1)
    if has_images:
        expected = state.available - state.count  # images not yet reached by earlier calls
        if bool((tokens != expected).any()):
            raise ValueError(
                f"The prompts hold {tokens.tolist()} <image> tokens per row but {expected.tolist()} images were "
                "given for them; write one <image> per image, where the image belongs in the text (rows with "
                "fewer images than others need image_mask)"
            )
    elif past == 0 and bool(tokens.any()):
        raise ValueError("The prompt has <image> tokens but no pixel_values were given")
