"""Fuyu's image processor: no fixed size. An image larger than the canvas (1080 x 1920) is scaled down to fit;
smaller ones keep their size. The image is padded at the bottom and right to whole 30-pixel patches,
normalised to [-1, 1], and cut into patches whose values run channel-last (row, column, RGB) as the checkpoint
expects. Torch/numpy only, one vectorised reshape; see image_ops.py.

Axes: R patch rows, C patch columns, P patch side, c channels.
"""

import torch
import torch.nn.functional as F
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .image_ops import MAX_IMAGE_PIXELS, flatten_images, load_image, resample_name, resize, to_uint8_tensor


def fit_within(height: int, width: int, max_height: int, max_width: int) -> tuple[tuple[int, int], float]:
    """(new height, new width) and the scale factor: shrink to fit the canvas, never enlarge."""
    if height <= max_height and width <= max_width:
        return (height, width), 1.0
    scale = min(max_height / height, max_width / width)
    # A thin strip can round to 0 pixels across (transformers' Fuyu processors then fail inside the resize):
    # keep at least one, so any aspect ratio still becomes a row or column of patches.
    return (max(1, int(height * scale)), max(1, int(width * scale))), scale


class FuyuPatternImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: dict[str, int] | None = None,
        patch_size: int | dict[str, int] = 30,
        resample: str | int = "bilinear",
        padding_value: int | float = 1,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | list[float] = 0.5,
        image_std: float | list[float] = 0.5,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        resize_backend: str = "torch",
        **kwargs,
    ):
        """
        size: the canvas, `{"height": 1080, "width": 1920}`; larger images are scaled down to fit it.
        padding_value: the 8-bit value that fills the last row and column of patches past the image edge (Fuyu's
            processor pads with 1 before rescaling; it ends up as -0.992 after normalisation).
        resize_backend: "torch" (fast) or "pil" (bit-identical to transformers' PIL backend); see image_ops.py.
        """
        for legacy in ("do_resize", "do_pad", "padding_mode", "do_convert_rgb"):
            kwargs.pop(legacy, None)
        super().__init__(**kwargs)
        self.size = dict(size) if size is not None else {"height": 1080, "width": 1920}
        self.patch_size = patch_size["height"] if isinstance(patch_size, dict) else int(patch_size)
        if isinstance(patch_size, dict) and patch_size["height"] != patch_size["width"]:
            raise ValueError("Fuyu's patches are square")
        self.resample = resample_name(resample)
        self.padding_value = padding_value
        self.do_rescale, self.rescale_factor, self.do_normalize = do_rescale, rescale_factor, do_normalize
        self.image_mean = image_mean if isinstance(image_mean, (int, float)) else list(image_mean)
        self.image_std = image_std if isinstance(image_std, (int, float)) else list(image_std)
        self.max_image_pixels = max_image_pixels
        if resize_backend not in ("torch", "pil"):
            raise ValueError(f"resize_backend must be 'torch' or 'pil', got {resize_backend!r}")
        self.resize_backend = resize_backend

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch rows and columns of an image of this original size."""
        (h, w), _ = fit_within(height, width, self.size["height"], self.size["width"])
        return -(-h // self.patch_size), -(-w // self.patch_size)

    def _patches(self, image) -> tuple[torch.Tensor, list[int], list[int], float]:
        rgb = load_image(image, max_pixels=self.max_image_pixels)
        height, width = rgb.shape[:2]
        (h, w), scale = fit_within(height, width, self.size["height"], self.size["width"])
        pixels = resize(to_uint8_tensor(rgb), (h, w), self.resample, self.resize_backend)  # (1, c, h, w) uint8
        P = self.patch_size
        rows, cols = -(-h // P), -(-w // P)
        pixels = F.pad(pixels, (0, cols * P - w, 0, rows * P - h), value=self.padding_value)  # whole patches
        patches = pixels[0].reshape(-1, rows, P, cols, P).permute(1, 3, 2, 4, 0)  # (R, C, P, P, c)
        patches = patches.reshape(rows * cols, P * P * pixels.shape[1])
        scale_255 = self.rescale_factor if self.do_rescale else 1.0
        mean = torch.tensor(self.image_mean if self.do_normalize else 0.0).reshape(-1)
        std = torch.tensor(self.image_std if self.do_normalize else 1.0).reshape(-1)
        if mean.numel() > 1:  # per channel: repeat over the P * P positions of the channel-last patch
            mean, std = mean.repeat(P * P), std.repeat(P * P)
        values = torch.addcmul(-mean / std, patches, scale_255 / std)  # (x * scale - mean) / std, float32
        return values, [rows, cols], [height, width], scale

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """Images (one, or a list) -> pixel_values (all patches, 30*30*3), and per image its patch grid
        [rows, columns], original size [height, width] and resize factor."""
        if kwargs:
            raise TypeError(f"Unknown image processor options: {sorted(kwargs)}")
        images = flatten_images(images)
        if not images:
            raise ValueError("No images were given")
        results = [self._patches(image) for image in images]
        data = {
            "pixel_values": results[0][0] if len(results) == 1 else torch.cat([r[0] for r in results]),
            "image_patch_grid": torch.tensor([r[1] for r in results]),
            "image_sizes": torch.tensor([r[2] for r in results]),
            "image_scale_factors": torch.tensor([r[3] for r in results]),
        }
        return BatchFeature(data, tensor_type=return_tensors)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)
