"""The generation-cache entries that carry images from one call to the next.

The cross-attention keys and values of the visual tokens are computed once per set of images and kept in
`MediaKeysValues` entries after the text layers of the same cache: decode steps only read them. `ImageCursor`
keeps each row's `ImageState` (flamingo_visibility.py), so the next call continues the image rule where this one
stopped.

Axes: B batch, H heads, I images per row, N visual tokens per image, d head dim.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .flamingo_visibility import ImageState, image_attention, media_bias, track_images


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


class StaticImages:
    """The prompt's images as the static decode path reads them (static_generation.py): each gated block's
    keys/values and each row's `ImageState`, in buffers that a captured step reads at fixed addresses. `step`
    gives one decode token's image context and advances the state in place, by the same rule as the cache's
    cursor; `snapshot`/`restore` undo the advances of a graph's warm-up runs."""

    def __init__(self, media, state: ImageState, config):
        self.media, self.state = media, state
        self.image_token_id, self.reset_token_id = config.image_token_id, config.media_reset_token_id
        self.tokens_per_image = config.num_visual_tokens
        self.num_images = media[0][0].shape[2] // self.tokens_per_image if media else 0

    @classmethod
    def from_cache(cls, cursor: ImageCursor, entries: list, config, previous: "StaticImages | None"):
        media = [(entry.keys, entry.values) for entry in entries] if entries and entries[0].is_initialized else None
        state = cursor.state
        if previous is not None and previous.fits(media, state):
            for (keys, values), (new_keys, new_values) in zip(previous.media or [], media or [], strict=True):
                keys.copy_(new_keys)
                values.copy_(new_values)
            for buffer, value in zip(
                previous.state_tensors(), (state.count, state.current, state.available), strict=True
            ):
                buffer.copy_(value)
            return previous
        media = [(keys.clone(), values.clone()) for keys, values in media] if media else None
        return cls(media, ImageState(state.count.clone(), state.current.clone(), state.available.clone()), config)

    def fits(self, media, state: ImageState) -> bool:
        shapes = [tuple(k.shape) for k, _ in media] if media else None
        own = [tuple(k.shape) for k, _ in self.media] if self.media else None
        return shapes == own and self.state.count.shape == state.count.shape

    def state_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.state.count, self.state.current, self.state.available

    def step(self, token: torch.Tensor):
        """token (B, 1) -> (media, bias (B, 1, 1, I * N), sees an image (B, 1)); (None, None, None) without images."""
        if self.media is None:
            return None
        index, after = track_images(token, self.image_token_id, self.reset_token_id, self.state)
        self.state.count.copy_(after.count)
        self.state.current.copy_(after.current)
        sees = image_attention(index, self.num_images)  # (B, 1, I)
        return self.media, media_bias(sees, self.tokens_per_image, self.media[0][0].dtype), sees.any(-1)

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.state.count.clone(), self.state.current.clone()

    def restore(self, saved: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.state.count.copy_(saved[0])
        self.state.current.copy_(saved[1])
