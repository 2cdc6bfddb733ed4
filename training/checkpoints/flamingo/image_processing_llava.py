"""LLaVA's image processor: resize the shortest edge, centre-crop, normalise (llava-hf), or first pad to a
square with the mean colour (`do_pad`, the original LLaVA-1.5). Torch/numpy only; see image_ops.py.
"""

import torch
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .image_ops import (
    MAX_IMAGE_PIXELS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    center_crop,
    flatten_images,
    load_image,
    normalize,
    pad_to_square,
    resample_name,
    resize,
    to_uint8_tensor,
)

# PIL's integer codes, as they appear in transformers' preprocessor_config.json files.


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """Scale so the shorter side becomes `shortest_edge`; the longer side is truncated, as transformers does."""
    if height <= width:
        return shortest_edge, int(shortest_edge * width / height)
    return int(shortest_edge * height / width), shortest_edge


class LlavaPatternImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: dict[str, int] | None = None,
        resample: str | int = "bicubic",
        do_center_crop: bool = True,
        crop_size: dict[str, int] | None = None,
        do_pad: bool = False,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        max_aspect_ratio: float = 200.0,
        resize_backend: str = "torch",
        **kwargs,
    ):
        """
        size: `{"shortest_edge": 336}` (or a plain int, the same); crop_size: `{"height": 336, "width": 336}`
            (or an int for a square).
        resample: "bicubic", "bilinear" or "nearest" (PIL's integer codes are accepted).
        do_pad: pad to a square with the mean colour before resizing (original LLaVA-1.5, not llava-hf).
        max_image_pixels / max_aspect_ratio: larger or more elongated images are refused with an error,
            not resized into a multi-gigabyte tensor.
        resize_backend: "torch" (fast; see image_ops.py for how close to PIL) or "pil" (bit-identical to
            transformers' PIL backend).
        """
        kwargs.pop("do_convert_rgb", None)  # always RGB
        super().__init__(**kwargs)
        self.do_resize = do_resize
        # Older preprocessor_config.json files (e.g. openai/clip-vit-large-patch14) give plain ints.
        size = {"shortest_edge": size} if isinstance(size, int) else size
        crop_size = {"height": crop_size, "width": crop_size} if isinstance(crop_size, int) else crop_size
        self.size = dict(size) if size is not None else {"shortest_edge": 336}
        self.resample = resample_name(resample)
        self.do_center_crop = do_center_crop
        self.crop_size = dict(crop_size) if crop_size is not None else {"height": 336, "width": 336}
        self.do_pad = do_pad
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if image_mean is not None else list(OPENAI_CLIP_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(OPENAI_CLIP_STD)
        self.max_image_pixels = max_image_pixels
        self.max_aspect_ratio = max_aspect_ratio
        if resize_backend not in ("torch", "pil"):
            raise ValueError(f"resize_backend must be 'torch' or 'pil', got {resize_backend!r}")
        self.resize_backend = resize_backend

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of every processed image."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if "height" in self.size:
            return self.size["height"], self.size["width"]
        raise ValueError("Without center crop, size must give height and width so all images match")

    def preprocess_one(self, image) -> torch.Tensor:
        """One image -> (1, 3, h, w) float32."""
        rgb = load_image(image, max_pixels=self.max_image_pixels, max_aspect_ratio=self.max_aspect_ratio)
        if self.do_pad:
            rgb = pad_to_square(rgb, [int(m * 255) for m in self.image_mean])
        pixels = to_uint8_tensor(rgb)  # (1, 3, H, W) uint8
        if self.do_resize:
            height, width = rgb.shape[:2]
            if "shortest_edge" in self.size:
                target = shortest_edge_size(height, width, self.size["shortest_edge"])
            else:
                target = (self.size["height"], self.size["width"])
            pixels = resize(pixels, target, self.resample, self.resize_backend)
        if self.do_center_crop:
            pixels = center_crop(pixels, self.output_size)
        if not self.do_normalize:
            return pixels.float() * (self.rescale_factor if self.do_rescale else 1.0)
        return normalize(pixels, self.image_mean, self.image_std, self.rescale_factor if self.do_rescale else 1.0)

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """Images (one, a list, or a list of lists per prompt) -> `pixel_values` (N, 3, h, w) float32."""
        if kwargs:
            unknown = [key for key in kwargs if not hasattr(self, key)]
            if unknown:
                raise TypeError(f"Unknown image processor options: {unknown}")
            # Per-call overrides act on a copy, so the processor's own settings never change.
            return type(self)(**{**self.to_dict(), **kwargs}).preprocess(images, return_tensors=return_tensors)
        images = flatten_images(images)
        if not images:
            raise ValueError("No images were given")
        pixel_values = torch.cat([self.preprocess_one(image) for image in images])
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)
