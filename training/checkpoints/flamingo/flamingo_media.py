"""Which image each text token may see, and the cache entries that carry images from one call to the next.

Flamingo's rule: a token sees only the most recent `<image>` at or before it; tokens before the first image
see none. With a reset token (IDEFICS: `</s>`), tokens after it see none until the next image, so packed
documents do not look at each other's pictures. The rule is computed with cumulative sums and maxima over
the sequence, and continues across calls (prefill, then one token per decode step) through `ImageCursor`,
stored in the generation cache beside the text layers. The cross-attention keys and values of the visual
tokens are computed once per set of images and kept in `MediaKeysValues` entries of the same cache: decode
steps only read them.

Axes: B batch, T tokens of this call, I images per row.
"""

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer


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


class MediaKeysValues(DynamicLayer):
    """One gated block's cross-attention keys and values over the visual tokens (B, H, I * N, d).

    Written when images arrive, read at every later step. Beam reordering and batch expansion apply to it as
    to the text layers; cropping (assisted decoding) does not, since images do not grow with the text.
    """

    # Written once per prompt, then only read: these entries leave a static (compilable) cache static, so its
    # text layers keep their fixed-length masks.
    is_compileable = True

    def store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def crop(self, tokens_to_remove: int) -> None:
        return


class ImageCursor(DynamicLayer):
    """The `ImageState` of each row, kept in the cache so the next call continues the rule where this one
    stopped. Follows beam reordering and batch expansion like the key/value layers."""

    is_compileable = True

    def __init__(self):
        super().__init__()
        self.state: ImageState | None = None

    def _apply(self, function) -> None:
        if self.state is not None:
            self.state = ImageState(
                *(function(t) for t in (self.state.count, self.state.current, self.state.available))
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        return

    def get_seq_length(self) -> int:
        return 0


def media_cache_entries(cache: Cache, num_text_layers: int, num_blocks: int) -> tuple[ImageCursor, list]:
    """The cursor and the blocks' key/value entries of `cache`, created on first use after the text layers."""
    end = num_text_layers + 1 + num_blocks
    if len(cache.layers) < end:
        while len(cache.layers) < num_text_layers:  # text layers a lazily built cache has not created yet
            cache.layers.append(DynamicLayer())
        cache.layers[num_text_layers:] = [ImageCursor()] + [MediaKeysValues() for _ in range(num_blocks)]
    cursor, entries = cache.layers[num_text_layers], cache.layers[num_text_layers + 1 : end]
    if not isinstance(cursor, ImageCursor) or not all(isinstance(e, MediaKeysValues) for e in entries):
        raise TypeError("This cache was built for another model: its layers do not match this Flamingo model")
    return cursor, entries
