"""Checks on what a family's `forward` is given, made before any work, so that a wrong input is a clear error
naming the problem instead of an index error deep inside, or, worse, a plausible answer computed from it.
Inside compiled code (the static path's compiled prompt pass) the checks on values run on the device as
`torch._assert_async`: the same conditions, without reading the values back to the host."""

import torch


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids must be integers in [0, vocab_size): an embedding lookup past the table fails without naming the id."""
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids are empty (shape {tuple(input_ids.shape)}): a prompt needs at least one token")
    if torch.compiler.is_compiling():  # compiled code checks on the device, without naming the id
        in_range = ((input_ids >= 0) & (input_ids < vocab_size)).all()
        torch._assert_async(in_range, f"Token ids must lie in this model's vocabulary of {vocab_size} ids")
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"Token id {bad} is outside this model's vocabulary of {vocab_size} ids (0..{vocab_size - 1})")


def check_attention_mask(attention_mask: torch.Tensor | None, batch: int, length: int, past: int) -> None:
    """A 2D mask must be (batch, cached + new tokens): a longer one shifts every position and changes the logits."""
    if attention_mask is None or attention_mask.dim() == 4:  # 4D masks are prepared by the caller, as in transformers
        return
    expected = (batch, past + length)
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != expected:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; it must be (batch, cached + new tokens) = "
            f"{expected}, one entry per token of input_ids" + (f" and of the {past} cached tokens" if past else "")
        )


def check_pixel_values(pixel_values: torch.Tensor, name: str = "pixel_values") -> None:
    """Pixels must be the processor's normalised floats: integers would be read as normalised values, and NaN gives
    an empty answer without a word."""
    if not pixel_values.dtype.is_floating_point:
        raise TypeError(
            f"{name} must be floating point, normalised by the processor; got {pixel_values.dtype}. Pass the images "
            "through the processor (or convert and normalise them yourself)"
        )
    if torch.compiler.is_compiling():  # on the device: compiled code does not read values back
        torch._assert_async(torch.isfinite(pixel_values).all(), f"{name} hold NaN or infinite values")
    elif not bool(torch.isfinite(pixel_values).all()):
        raise ValueError(f"{name} hold NaN or infinite values")


def check_grid(grid_thw: torch.Tensor, pixel_values: torch.Tensor, merge_size: int, name: str = "image") -> None:
    """Qwen2-VL's (I, 3) grids of (frames, patch rows, patch columns): positive, whole merge groups, and as many
    patches as `pixel_values` has rows."""
    if grid_thw.dim() != 2 or grid_thw.shape[-1] != 3 or grid_thw.dtype.is_floating_point:
        raise ValueError(
            f"{name}_grid_thw must be integers of shape (count, 3), got {grid_thw.dtype} {tuple(grid_thw.shape)}"
        )
    if bool((grid_thw <= 0).any()):
        raise ValueError(
            f"{name}_grid_thw must be positive (frames, patch rows, patch columns); got {grid_thw.tolist()}"
        )
    if bool((grid_thw[:, 1:] % merge_size).any()):
        raise ValueError(f"{name}_grid_thw rows and columns must be multiples of {merge_size}; got {grid_thw.tolist()}")
    patches = int(grid_thw.prod(-1).sum())
    if patches != pixel_values.shape[0]:
        raise ValueError(
            f"{name}_grid_thw describes {patches} patches ({grid_thw.tolist()}) but the pixel values hold "
            f"{pixel_values.shape[0]}"
        )


def check_image_mask(image_mask: torch.Tensor | None, pixel_values: torch.Tensor) -> None:
    """Flamingo's (B, I) mask of real images among the padded `pixel_values` (B, I, 3, H, W)."""
    if image_mask is None:
        return
    if tuple(image_mask.shape) != tuple(pixel_values.shape[:2]):
        raise ValueError(
            f"image_mask has shape {tuple(image_mask.shape)}; it must be (batch, images) = "
            f"{tuple(pixel_values.shape[:2])}, one entry per image slot of pixel_values"
        )
