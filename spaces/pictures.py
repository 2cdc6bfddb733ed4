"""How each pattern sees an image, as a picture of what its model's first layer receives.

LLaVA's fixed square and its patch grid; Qwen2-VL's image at about its own size, 14-pixel patches and the 2 x 2
groups merged into one token (thick lines); Fuyu's raw patches row by row, each row closed by a newline token
(red); Flamingo's latents and, per gated cross-attention layer, how open its gates are (tanh of the learned
alpha). `pattern_view(family, ...)` draws the family's picture with `<family>_view`; what each shows is written
under it in the Space (the registry's `picture_legend`).
"""

import math

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from vlm_patterns.processing import load_image
from vlm_patterns.processing.image_processing_fuyu import fit_within
from vlm_patterns.processing.image_processing_qwen2_vl import smart_resize

GRID = (70, 70, 70)
MERGED = (255, 200, 0)
NEWLINE = (230, 40, 40)
DISPLAY = 320  # the longer side of a view, in screen pixels


def _enlarge(image: PIL.Image.Image) -> tuple[PIL.Image.Image, float]:
    scale = DISPLAY / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, PIL.Image.Resampling.NEAREST if scale > 1 else PIL.Image.Resampling.BILINEAR), scale


def _grid(draw: PIL.ImageDraw.ImageDraw, width: float, height: float, step: float, colour, line: int = 1) -> None:
    x = 0.0
    while x <= width + 0.5:
        draw.line([(x, 0), (x, height)], fill=colour, width=line)
        x += step
    y = 0.0
    while y <= height + 0.5:
        draw.line([(0, y), (width, y)], fill=colour, width=line)
        y += step


def _rgb(image) -> PIL.Image.Image:
    return PIL.Image.fromarray(image if isinstance(image, np.ndarray) else load_image(image))


def square_input_view(image, image_size: int, patch_size: int, pad_to_square: bool) -> tuple[PIL.Image.Image, int]:
    """The fixed-size input with its patch grid; returns (picture, visual tokens)."""
    rgb = _rgb(image)
    if pad_to_square:
        side = max(rgb.size)
        mean = tuple(int(v) for v in np.asarray(rgb).reshape(-1, 3).mean(0))
        square = PIL.Image.new("RGB", (side, side), mean)
        square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
        rgb = square
    else:  # shortest edge to size, centre crop
        scale = image_size / min(rgb.size)
        rgb = rgb.resize((max(image_size, round(rgb.width * scale)), max(image_size, round(rgb.height * scale))))
        left, top = (rgb.width - image_size) // 2, (rgb.height - image_size) // 2
        rgb = rgb.crop((left, top, left + image_size, top + image_size))
    view, scale = _enlarge(rgb.resize((image_size, image_size), PIL.Image.Resampling.BICUBIC))
    _grid(PIL.ImageDraw.Draw(view), view.width, view.height, patch_size * scale, GRID)
    return view, (image_size // patch_size) ** 2


def native_resolution_view(image, patch_size: int, merge_size: int, min_pixels: int, max_pixels: int):
    """The image resized by smart_resize, its 14-pixel patches (thin) and merged tokens (thick); (picture, tokens)."""
    rgb = _rgb(image)
    factor = patch_size * merge_size
    height, width = smart_resize(rgb.height, rgb.width, factor, min_pixels, max_pixels)
    view, scale = _enlarge(rgb.resize((width, height), PIL.Image.Resampling.BICUBIC))
    draw = PIL.ImageDraw.Draw(view)
    _grid(draw, view.width, view.height, patch_size * scale, GRID)
    _grid(draw, view.width, view.height, factor * scale, MERGED, line=2)
    return view, (height // factor) * (width // factor)


def patch_rows_view(image, patch_size: int, canvas: dict[str, int]):
    """The patches row by row, a newline marker after each row; (picture, visual tokens incl. newlines)."""
    rgb = _rgb(image)
    (height, width), _ = fit_within(rgb.height, rgb.width, canvas["height"], canvas["width"])
    rows, cols = math.ceil(height / patch_size), math.ceil(width / patch_size)
    padded = PIL.Image.new("RGB", (cols * patch_size, rows * patch_size), (0, 0, 0))
    padded.paste(rgb.resize((width, height), PIL.Image.Resampling.BILINEAR), (0, 0))
    marker = max(4, patch_size // 2)
    strip = PIL.Image.new("RGB", (padded.width + marker + 2, padded.height), (255, 255, 255))
    strip.paste(padded, (0, 0))
    view, scale = _enlarge(strip)
    draw = PIL.ImageDraw.Draw(view)
    _grid(draw, padded.width * scale, padded.height * scale, patch_size * scale, GRID)
    for row in range(rows):
        top = row * patch_size * scale
        left = (padded.width + 2) * scale
        draw.rectangle([left, top + 2, left + marker * scale, top + patch_size * scale - 2], fill=NEWLINE)
    return view, rows * cols + rows


def latents_and_gates_view(latents: np.ndarray, gates: list[tuple[int, float, float]]) -> PIL.Image.Image:
    """Left: the visual tokens of the first image (latents x channels, as a heat map). Right: per gated layer,
    tanh(alpha) of the attention branch (blue) and of the feed-forward branch (orange), from -1 to 1."""
    count, width = latents.shape
    values = (latents - latents.min()) / max(float(latents.max() - latents.min()), 1e-6)
    heat = np.stack([values * 255, values * 120, (1 - values) * 255], -1).astype(np.uint8)  # (N, D, 3)
    heat_image = PIL.Image.fromarray(heat).resize((200, max(count * 8, 64)), PIL.Image.Resampling.NEAREST)
    bar_height, gap = 18, 10
    chart = PIL.Image.new("RGB", (220, max(heat_image.height, len(gates) * (2 * bar_height + gap) + 20)), "white")
    draw = PIL.ImageDraw.Draw(chart)
    middle = 110
    draw.line([(middle, 0), (middle, chart.height)], fill=(120, 120, 120))
    for i, (layer, attention, dense) in enumerate(gates):
        top = 10 + i * (2 * bar_height + gap)
        for j, (value, colour) in enumerate(((attention, (50, 90, 220)), (dense, (240, 150, 30)))):
            y = top + j * bar_height
            end = middle + value * 100
            draw.rectangle([min(middle, end), y + 2, max(middle, end), y + bar_height - 2], fill=colour)
        draw.text((4, top + bar_height // 2), f"L{layer}", fill=(0, 0, 0))
    view = PIL.Image.new("RGB", (heat_image.width + chart.width + 10, max(heat_image.height, chart.height)), "white")
    view.paste(heat_image, (0, 0))
    view.paste(chart, (heat_image.width + 10, 0))
    return view


def pattern_view(family: str, model, processor, image, qwen_budget: int = 32):
    """The picture of how this family's model sees `image` (None without an image or when it cannot be read)."""
    if image is None:
        return None
    try:
        return globals()[f"{family}_view"](image, model, processor, qwen_budget)
    except Exception:
        return None  # the column's answer reports what went wrong with this image


def llava_view(image, model, processor, qwen_budget: int) -> PIL.Image.Image:
    """The fixed square the ViT reads, with its patch grid (one visual token per patch)."""
    ip = processor.image_processor
    return square_input_view(image, ip.crop_size["height"], processor.patch_size, ip.do_pad)[0]


def qwen2_vl_view(image, model, processor, qwen_budget: int) -> PIL.Image.Image:
    """The image as smart_resize sizes it within the budget, its patches and merged tokens."""
    ip = processor.image_processor
    budget = qwen_budget * ip.factor**2
    return native_resolution_view(image, ip.patch_size, ip.merge_size, min(ip.min_pixels, budget), budget)[0]


def fuyu_view(image, model, processor, qwen_budget: int) -> PIL.Image.Image:
    """The raw patches row by row, each row closed by a newline token."""
    ip = processor.image_processor
    return patch_rows_view(image, ip.patch_size, ip.size)[0]


def flamingo_view(image, model, processor, qwen_budget: int) -> PIL.Image.Image:
    """The resampler's latents for the image and how open each gated layer is."""
    inputs = processor(images=[[image]], text=processor.image_token)
    with torch.inference_mode():
        latents = model.get_image_features(inputs["pixel_values"].to(model.device, model.dtype))[0, 0]
        gates = [
            (layer, torch.tanh(b.alpha_cross_attn).mean().item(), torch.tanh(b.alpha_dense).mean().item())
            for layer, b in zip(model.config.cross_attn_layer_ids, model.model.gated_cross_attn_layers, strict=True)
        ]
    return latents_and_gates_view(latents.float().cpu().numpy(), gates)
