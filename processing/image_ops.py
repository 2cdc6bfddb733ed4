"""Image loading and pixel operations shared by the image processors: torch and numpy only, no torchvision.

Images travel as uint8 tensors (N, 3, H, W) until the last step, and normalising once at the end touches
each pixel a single time. Resizing has two backends:
- "torch" (default): `torch.nn.functional.interpolate(antialias=True)` on uint8, PIL's filters in SIMD
  fixed point, several times faster than PIL. On photographs almost every pixel is within one 8-bit level
  of PIL; a few can differ by two, because the two round their fixed-point weights differently, and on
  hard synthetic edges more, where Pillow >= 13 runs its two 1D passes in the other order (it resizes
  vertically first when the height shrinks much more than the width). transformers' torchvision backend
  calls the same torch kernel and differs from PIL the same way.
- "pil": PIL's own resize, bit-identical to transformers' PIL backend, at PIL's speed.
"""

import io
import os
import warnings
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | str | os.PathLike | bytes

# PIL's own decompression-bomb threshold: bigger images are refused rather than decoded.
MAX_IMAGE_PIXELS = 89_478_485

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageInputError(ValueError):
    """An image that cannot be used: unreadable, empty, of an unsupported layout, or outside the limits."""


def _open_file(source: str | os.PathLike | bytes) -> PIL.Image.Image:
    if isinstance(source, bytes):
        if not source:
            raise ImageInputError("The image data is empty (0 bytes)")
        data, name = source, "the image bytes"
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No image file at {path!r}")
        if os.path.getsize(path) == 0:
            raise ImageInputError(f"The image file {path!r} is empty (0 bytes)")
        with open(path, "rb") as f:
            data, name = f.read(), repr(path)
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()  # decode now, so a truncated or corrupt file fails here and not later
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageInputError(f"{name} is not a readable image: {e}") from e
    return image


def _pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    """(H, W, 3) uint8; transparency is composited onto white, as transformers' processors do."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)  # one copy out of PIL; read-only, which is fine: nothing writes to it


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """HW, HWC or CHW arrays (C in 1, 3, 4; uint8, or floats in [0, 1]) -> (H, W, 3) uint8."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first -> last
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ImageInputError(
            f"An image array must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; got {array.shape}"
        )
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ImageInputError(f"Image arrays must be uint8 or float in [0, 1], got {array.dtype}")
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ImageInputError("Float image arrays must hold values in [0, 1]")
        array = np.round(array * 255).astype(np.uint8)
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        rgb, alpha = array[..., :3].astype(np.float32), array[..., 3:].astype(np.float32) / 255
        return np.round(rgb * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return array


def load_image(
    image: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS, max_aspect_ratio: float | None = None
) -> np.ndarray:
    """Any supported image input -> (H, W, 3) uint8 RGB, or a clear error.

    Accepts a file path, encoded bytes, a PIL image, a numpy array or a torch tensor. Refuses empty or
    corrupt files, images with no pixels, more than `max_pixels` pixels, or a longer/shorter side ratio
    above `max_aspect_ratio`.
    """
    if isinstance(image, (str, os.PathLike, bytes)):
        image = _open_file(image)
    if isinstance(image, PIL.Image.Image):
        width, height = image.size
        if width * height > max_pixels:  # check before converting: conversion would allocate it all
            raise ImageInputError(
                f"The image is {width}x{height} = {width * height} pixels, above the limit {max_pixels}"
            )
        rgb = _pil_to_rgb(image) if width and height else np.zeros((height, width, 3), np.uint8)
    elif isinstance(image, torch.Tensor):
        rgb = _array_to_rgb(image.detach().cpu().numpy())
    elif isinstance(image, np.ndarray):
        rgb = _array_to_rgb(image)
    else:
        raise ImageInputError(
            f"Unsupported image type {type(image).__name__}: pass a path, bytes, PIL image, array or tensor"
        )

    height, width = rgb.shape[:2]
    if height == 0 or width == 0:
        raise ImageInputError(f"The image has no pixels ({width}x{height})")
    if height * width > max_pixels:
        raise ImageInputError(f"The image is {width}x{height} = {width * height} pixels, above the limit {max_pixels}")
    if max_aspect_ratio is not None and max(height, width) / min(height, width) > max_aspect_ratio:
        raise ImageInputError(
            f"The image is {width}x{height}: its aspect ratio {max(height, width) / min(height, width):.0f} "
            f"is above the limit {max_aspect_ratio:g}"
        )
    return rgb


def flatten_images(images) -> list:
    """A single image, a list of images or a list of lists (one per prompt) -> a flat list."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item)]
    return [images]


def to_uint8_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array -> (1, 3, H, W) uint8 tensor sharing its memory (channels-last strides).

    The array may be read-only (a view of PIL's bytes); every later step writes to new tensors only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0)


PIL_FILTERS = {"nearest": PIL.Image.Resampling.NEAREST, "bilinear": PIL.Image.Resampling.BILINEAR,
               "bicubic": PIL.Image.Resampling.BICUBIC}  # fmt: skip


def resize(
    images: torch.Tensor, size: tuple[int, int], resample: str = "bicubic", backend: str = "torch"
) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 3, h, w) uint8, antialiased when shrinking (see the module docstring)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if backend == "pil":
        height, width = size
        resized = [
            np.array(PIL.Image.fromarray(image.permute(1, 2, 0).numpy()).resize((width, height), PIL_FILTERS[resample]))
            for image in images
        ]
        return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)
    if backend != "torch":
        raise ValueError(f"resize backend must be 'torch' or 'pil', got {backend!r}")
    if resample == "nearest":
        return F.interpolate(images, size=size, mode="nearest-exact")
    return F.interpolate(images, size=size, mode=resample, antialias=True, align_corners=False)


def center_crop(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, h, w) cut from the centre; zero-padded around first if smaller, as transformers does."""
    height, width = images.shape[-2:]
    crop_h, crop_w = size
    if crop_h > height or crop_w > width:
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        top, left = (pad_h + 1) // 2, (pad_w + 1) // 2
        images = F.pad(images, (left, pad_w - left, top, pad_h - top))
        height, width = images.shape[-2:]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return images[..., top : top + crop_h, left : left + crop_w]


def pad_to_square(rgb: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    """(H, W, 3) -> (S, S, 3), S = max(H, W), the image centred on a `fill` background (original LLaVA's expand2square)."""
    height, width = rgb.shape[:2]
    if height == width:
        return rgb
    side = max(height, width)
    square = np.empty((side, side, 3), dtype=np.uint8)
    square[:] = np.asarray(fill, dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = rgb
    return square


def normalize(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], rescale_factor: float = 1 / 255
) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> float32 (x * rescale_factor - mean) / std, contiguous."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    out = images.to(torch.float32, memory_format=torch.contiguous_format)
    return out.mul_(rescale_factor).sub_(mean_t).div_(std_t)
