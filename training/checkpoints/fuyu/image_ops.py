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
import PIL.ImageOps
import torch
import torch.nn.functional as F

from .image_sources import ImageInputError, read_source

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | str | os.PathLike | bytes

# PIL's own decompression-bomb threshold: bigger images are refused rather than decoded.
MAX_IMAGE_PIXELS = 89_478_485
EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how a camera held the picture

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _decode(data: bytes, name: str, max_pixels: int) -> PIL.Image.Image:
    """Encoded bytes -> a decoded PIL image, upright, its size checked from the header before any decoding."""
    try:
        with warnings.catch_warnings():  # PIL warns of large images; the limit below is this project's own
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data))  # reads the header only
    except PIL.UnidentifiedImageError as e:  # PIL's message names only its in-memory buffer
        raise ImageInputError(
            f"{name[0].upper()}{name[1:]} is not a readable image: not a format PIL decodes ({_head(data)})"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageInputError(f"{name[0].upper()}{name[1:]} is not a readable image: {e}") from e
    except PIL.Image.DecompressionBombError as e:  # above twice PIL's own limit: it refuses from the header
        raise ImageInputError(f"{name[0].upper()}{name[1:]} is above the limit of {max_pixels} pixels: {e}") from e
    _check_pixels(*image.size, max_pixels, name)
    try:
        image.load()  # decode now, so a truncated or corrupt file fails here and not later
        return image  # turned upright by load_image, with every other PIL image
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageInputError(f"{name[0].upper()}{name[1:]} is not a readable image: {e}") from e


def upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """The image turned upright by its EXIF orientation (2-8), as transformers' `load_image` does; the image itself
    when there is nothing to turn (PIL's `exif_transpose` copies every pixel even then: 3-5 ms for a photo)."""
    if image.getexif().get(EXIF_ORIENTATION, 1) not in range(2, 9):
        return image
    return PIL.ImageOps.exif_transpose(image)


def _head(data: bytes) -> str:
    """What a file starts with, for a message: text shows as text, anything else as bytes."""
    start = data[:16]
    return (
        f"it starts with {start.decode()!r}"
        if start.isascii() and start.decode().isprintable()
        else f"it starts with {start!r}"
    )


def _check_pixels(width: int, height: int, max_pixels: int, name: str = "The image") -> None:
    if width * height > max_pixels:
        raise ImageInputError(
            f"{name[0].upper()}{name[1:]} is {width}x{height} = {width * height} pixels, above the limit {max_pixels}"
        )


def _to_uint8(values: np.ndarray, what: str) -> np.ndarray:
    """Pixel values of any depth -> uint8 by their real range, or a clear error; never silently saturated.

    uint8 as is; uint16 (16-bit PNG/TIFF) by /257 (65535 -> 255); other integers only when they lie in 0..255;
    floats in [0, 1] (as transformers' `to_pil_image` reads them) or, failing that, in [0, 255]. NaN or infinite
    values are refused: there is no right colour for them.
    """
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    if values.dtype == np.uint16:
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(values.dtype, np.integer):
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > 255:
            raise ImageInputError(
                f"{what} holds integers from {low} to {high}; pass uint8 (0..255), uint16 (0..65535) or floats in [0, 1]"
            )
        return values.astype(np.uint8)
    if not np.issubdtype(values.dtype, np.floating):
        raise ImageInputError(f"{what} has dtype {values.dtype}; pass uint8, uint16 or floats in [0, 1]")
    if values.size and not np.isfinite(values).all():
        raise ImageInputError(f"{what} holds NaN or infinite values")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low >= 0 and high <= 1:
        return np.round(values * 255).astype(np.uint8)
    if low >= 0 and high <= 255:
        return np.round(values).astype(np.uint8)
    raise ImageInputError(f"{what} holds floats from {low:g} to {high:g}; pass floats in [0, 1] (or 0..255), or uint8")


def _pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    """(H, W, 3) uint8; transparency is composited onto white, as transformers' processors do. High-bit-depth and
    float modes (I;16, I, F) are scaled by their real range, not clipped at 255 as PIL's `convert` does."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image)
        if image.mode.startswith("I;16"):
            values = values.astype(np.uint16)
        elif image.mode == "I":  # 32-bit integers: 16-bit files land here; read them as 16-bit when they fit
            high = int(values.max()) if values.size else 0
            values = values.astype(np.uint16) if 255 < high <= 65535 and values.min() >= 0 else values
        return _array_to_rgb(values, what=f"The {image.mode}-mode image")
    mode = image.mode
    try:
        if mode == "La":  # premultiplied grey + alpha: PIL converts it only to LA
            image = image.convert("LA")
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = PIL.Image.alpha_composite(background, rgba)
        if image.mode != "RGB":
            image = image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageInputError(f"The {mode}-mode image cannot be read as RGB: {e}") from e
    return np.asarray(image)  # one copy out of PIL; read-only, which is fine: nothing writes to it


def _array_to_rgb(array: np.ndarray, what: str = "The image array") -> np.ndarray:
    """HW, HWC or CHW arrays (C in 1, 3, 4) of uint8, uint16 or floats in [0, 1] -> (H, W, 3) uint8."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first -> last
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ImageInputError(
            f"An image array must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; got {array.shape}"
        )
    array = _to_uint8(array, what)
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        rgb, alpha = array[..., :3].astype(np.float32), array[..., 3:].astype(np.float32) / 255
        return np.round(rgb * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return array


def _array_size(array: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """(width, height) of an image array from its shape alone, so that limits are checked before any pixel is read."""
    shape = tuple(array.shape)
    if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
        shape = shape[1:]
    return (shape[1], shape[0]) if len(shape) >= 2 else (0, 0)


def load_image(
    image: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS, max_aspect_ratio: float | None = None
) -> np.ndarray:
    """Any supported image input -> (H, W, 3) uint8 RGB, upright, or a clear error.

    Accepts what transformers' processors accept: a file path, an http(s) URL, a `data:image/...;base64` URI, a
    base64 string, encoded bytes, a PIL image, a numpy array or a torch tensor. Files and PIL images are turned
    upright by their EXIF orientation, as transformers' `load_image` does. The pixel count is checked from the
    header (or the array's shape) before anything is decoded. Refuses unreachable or empty sources, corrupt
    files, images with no pixels, more than `max_pixels` pixels, a longer/shorter side ratio above
    `max_aspect_ratio`, and values that cannot be read as colours (NaN, out of range).
    """
    if isinstance(image, (str, os.PathLike)):
        data, name = read_source(image)
        image = _decode(data, name, max_pixels)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        if not image:
            raise ImageInputError("The image data is empty (0 bytes)")
        image = _decode(bytes(image), "the image data", max_pixels)
    if isinstance(image, PIL.Image.Image):
        _check_pixels(*image.size, max_pixels)  # before converting: conversion would allocate it all
        image = upright(image)
        width, height = image.size
        rgb = _pil_to_rgb(image) if width and height else np.zeros((height, width, 3), np.uint8)
    elif isinstance(image, (torch.Tensor, np.ndarray)):
        _check_pixels(*_array_size(image), max_pixels)
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        rgb = _array_to_rgb(array)
    else:
        raise ImageInputError(
            f"Unsupported image type {type(image).__name__}: pass a path, URL, data URI, bytes, PIL image, "
            "array or tensor"
        )

    height, width = rgb.shape[:2]
    if height == 0 or width == 0:
        raise ImageInputError(f"The image has no pixels ({width}x{height})")
    _check_pixels(width, height, max_pixels)
    if max_aspect_ratio is not None and max(height, width) / min(height, width) > max_aspect_ratio:
        raise ImageInputError(
            f"The image is {width}x{height}: its aspect ratio {max(height, width) / min(height, width):.0f} "
            f"is above the limit {max_aspect_ratio:g}"
        )
    return rgb


def flatten_images(images) -> list:
    """A single image, a list of images or a list of lists (one per prompt) -> a flat list.

    `None` stands for "no images" only as the whole argument: a `None` inside the lists is refused, because
    dropping it would shift every later image onto the wrong prompt.
    """
    if images is None:
        return []
    flat: list = []

    def walk(item, where: str) -> None:
        if isinstance(item, (list, tuple)):
            for i, inner in enumerate(item):
                walk(inner, f"{where}[{i}]")
        elif item is None:
            raise ImageInputError(
                f"{where} is None: give each prompt exactly its images (an empty list for a prompt without any)"
            )
        else:
            flat.append(item)

    walk(images, "images")
    return flat


def to_uint8_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array -> (1, 3, H, W) uint8 tensor sharing its memory (channels-last strides).

    The array may be read-only (a view of PIL's bytes); every later step writes to new tensors only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0)


PIL_FILTERS = {"nearest": PIL.Image.Resampling.NEAREST, "bilinear": PIL.Image.Resampling.BILINEAR,
               "bicubic": PIL.Image.Resampling.BICUBIC}  # fmt: skip


def resample_name(resample: str | int) -> str:
    """ "bicubic", "bilinear" or "nearest", from that name or PIL's integer code (what public configs store)."""
    name = (
        {int(f): n for n, f in PIL_FILTERS.items()}.get(resample, resample) if isinstance(resample, int) else resample
    )
    if name not in PIL_FILTERS:
        raise ValueError(f"resample must be one of {sorted(PIL_FILTERS)} (or PIL's code), got {resample!r}")
    return name


def resample_code(name: str) -> int:
    """PIL's integer code of a resampling filter name: what transformers' configs store."""
    return int(PIL_FILTERS[name])


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
