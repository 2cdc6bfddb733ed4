"""Qwen2-VL's image processor: resize each image to its own grid of 28-pixel cells within a pixel budget
(`smart_resize`), normalise, and cut it into patches ordered 2x2 merge window by window. A video is a list
of frames: the same, with time folded in pairs of frames. Torch/numpy only; see image_ops.py.

Axes: F frames, C channels, H/W pixels, P patch side, Tp frames per temporal patch, m merge size.
"""

import math

import torch
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .image_ops import (
    MAX_IMAGE_PIXELS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    flatten_images,
    load_image,
    resample_name,
    resize,
    to_uint8_tensor,
)

MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """The (height, width) nearest the image's, both multiples of `factor`, with the area in [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"The image is {width}x{height}: its aspect ratio {max(height, width) / min(height, width):.0f} is above "
            f"{MAX_ASPECT_RATIO}, which Qwen2-VL cannot cut into patches"
        )
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(
    frames: torch.Tensor, patch_size: int, temporal_patch_size: int, merge_size: int
) -> tuple[torch.Tensor, list[int]]:
    """frames (F, C, H, W) -> patches (t*h*w, C, Tp, P*P) in merge-window order, and the grid [t, h, w].

    A clip whose frame count is not a multiple of Tp repeats its last frame, as Qwen2-VL does. Works on uint8,
    so the one copy this reordering costs moves bytes, not floats."""
    if pad := -frames.shape[0] % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    F, C, H, W = frames.shape
    t, h, w, m, P = F // temporal_patch_size, H // patch_size, W // patch_size, merge_size, patch_size
    x = frames.reshape(t, temporal_patch_size, C, h // m, m, P, w // m, m, P)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, h/m, w/m, m, m, C, Tp, P, P)
    return x.reshape(t * h * w, C, temporal_patch_size, P * P), [t, h, w]


class Qwen2VLPatternImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"]

    def __init__(
        self,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        video_min_pixels: int = 128 * 28 * 28,
        video_max_pixels: int = 768 * 28 * 28,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        resample: str = "bicubic",
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        resize_backend: str = "torch",
        **kwargs,
    ):
        """
        min_pixels / max_pixels: the pixel budget of one image after resizing (max_pixels / 784 caps its tokens);
            video_min_pixels / video_max_pixels: the same per video frame. Both can be overridden per call.
        max_image_pixels: larger inputs are refused before decoding (images above max_pixels are resized down).
        resize_backend: "torch" (fast) or "pil" (bit-identical to transformers' PIL backend); see image_ops.py.
        """
        for legacy in ("do_convert_rgb", "do_resize", "size"):
            kwargs.pop(legacy, None)
        super().__init__(**kwargs)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.video_min_pixels, self.video_max_pixels = video_min_pixels, video_max_pixels
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.resample = resample_name(resample)
        self.do_rescale, self.rescale_factor, self.do_normalize = do_rescale, rescale_factor, do_normalize
        self.image_mean = list(image_mean) if image_mean is not None else list(OPENAI_CLIP_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(OPENAI_CLIP_STD)
        self.max_image_pixels = max_image_pixels
        if resize_backend not in ("torch", "pil"):
            raise ValueError(f"resize_backend must be 'torch' or 'pil', got {resize_backend!r}")
        self.resize_backend = resize_backend

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def tokens_per_grid(self, grid: list[int] | torch.Tensor) -> int:
        """Placeholder tokens for one image or video grid [t, h, w]."""
        t, h, w = (int(x) for x in grid)
        return t * h * w // self.merge_size**2

    def _patches(self, frames: list, min_pixels: int, max_pixels: int) -> tuple[torch.Tensor, list[int]]:
        """The frames of one clip (one frame for an image, used for every temporal slot) -> normalised patches
        (t*h*w, C*Tp*P*P) float32 and the grid; all frames are resized to the first frame's grid."""
        rgbs = [load_image(frame, max_pixels=self.max_image_pixels) for frame in frames]
        height, width = rgbs[0].shape[:2]
        if any(rgb.shape[:2] != (height, width) for rgb in rgbs):
            raise ValueError("All frames of a video must have the same size")
        size = smart_resize(height, width, self.factor, min_pixels, max_pixels)
        pixels = torch.cat([resize(to_uint8_tensor(rgb), size, self.resample, self.resize_backend) for rgb in rgbs])
        # An image is one frame shown in every temporal slot: cut and normalise it once, then repeat the values.
        temporal = 1 if len(rgbs) == 1 else self.temporal_patch_size
        patches, grid = patchify(pixels, self.patch_size, temporal, self.merge_size)  # uint8 (N, C, T, P*P)
        scale = self.rescale_factor if self.do_rescale else 1.0
        mean = torch.tensor(self.image_mean if self.do_normalize else [0.0] * 3).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std if self.do_normalize else [1.0] * 3).view(1, -1, 1, 1)
        N, C, _, PP = patches.shape
        out = torch.empty(N, C, self.temporal_patch_size, PP)
        # (x * scale - mean) / std in one pass, written straight into the output, float32
        torch.addcmul(-mean / std, patches, scale / std, out=out[:, :, :temporal])
        if temporal == 1:  # the image's values again in the other temporal slots
            out[:, :, 1:].copy_(out[:, :, :1].expand(-1, -1, self.temporal_patch_size - 1, -1))
            grid[0] = 1
        return out.view(N, -1), grid

    def preprocess(
        self,
        images=None,
        videos=None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """images: one, a list, or a list per prompt. videos: a list of frames, or a list of such lists.

        Returns pixel_values (patches, 1176) and image_grid_thw (images, 3) [t=1, h, w in patches], and the
        same for videos as pixel_values_videos / video_grid_thw.
        """
        if kwargs:
            raise TypeError(f"Unknown image processor options: {sorted(kwargs)}")
        data = {}
        images = flatten_images(images)
        if images:
            lo, hi = self._budget(min_pixels, max_pixels, self.min_pixels, self.max_pixels)
            patches = [self._patches([image], lo, hi) for image in images]
            data["pixel_values"] = patches[0][0] if len(patches) == 1 else torch.cat([p for p, _ in patches])
            data["image_grid_thw"] = torch.tensor([grid for _, grid in patches])
        if videos:
            clips = [videos] if not isinstance(videos[0], (list, tuple)) else videos
            lo, hi = self._budget(min_pixels, max_pixels, self.video_min_pixels, self.video_max_pixels)
            patches = [self._patches(list(clip), lo, hi) for clip in clips]
            data["pixel_values_videos"] = patches[0][0] if len(patches) == 1 else torch.cat([p for p, _ in patches])
            data["video_grid_thw"] = torch.tensor([grid for _, grid in patches])
        if not data:
            raise ValueError("No images or videos were given")
        return BatchFeature(data, tensor_type=return_tensors)

    @staticmethod
    def _budget(min_pixels, max_pixels, default_min, default_max) -> tuple[int, int]:
        high = max_pixels or default_max
        # A per-call cap below the default floor lowers the floor with it, rather than contradicting it.
        low = min(min_pixels or default_min, high)
        return low, high

    def __call__(self, images=None, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)
