"""Qwen2-VL's processor: images and videos -> patches and grids, and each `<|image_pad|>` / `<|video_pad|>`
in the text -> as many placeholders as that image's merged grid has tokens (t * h * w / 4)."""

import numpy as np
import torch
from transformers.image_processing_base import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessorMixin

from .image_ops import flatten_images
from .image_processing_qwen2_vl import smart_resize
from .prompt_text import TokenRows, prompt_list, unknown_options

# Qwen's ChatML: a default system turn, images and videos wrapped in vision start/end tokens where they occur, the
# answers marked ({% generation %}) for `return_assistant_tokens_mask`.
QWEN2_VL_CHAT_TEMPLATE = (
    "{%- set counts = namespace(image=0, video=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') }}{%- endif -%}"
    "{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- elif message['content'] is string -%}{{ message['content'] + '<|im_end|>\n' }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{%- set counts.image = counts.image + 1 -%}"
    "{%- if add_vision_id -%}{{ 'Picture ' ~ counts.image ~ ': ' }}{%- endif -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{%- set counts.video = counts.video + 1 -%}"
    "{%- if add_vision_id -%}{{ 'Video ' ~ counts.video ~ ': ' }}{%- endif -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{{ '<|im_end|>\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


class Qwen2VLPatternProcessor(ProcessorMixin):
    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_token: str = "<|image_pad|>",
        video_token: str = "<|video_pad|>",
        chat_template: str | None = QWEN2_VL_CHAT_TEMPLATE,
        **kwargs,
    ):
        self.image_token, self.video_token = image_token, video_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)
        for token, token_id in ((image_token, self.image_token_id), (video_token, self.video_token_id)):
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(f"The tokenizer has no {token!r} token")

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        videos=None,
        audio=None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str = "left",
        return_mm_token_type_ids: bool = True,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Prompts with one `<|image_pad|>` per image and one `<|video_pad|>` per video, in order.

        images: flat, or one list per prompt. videos: a list of frames per video (or a (F, H, W, C) array).
        Batches are left-padded by default, as batched generation needs. min_pixels / max_pixels set this call's
        pixel budget. `mm_token_type_ids`, the 0/1/2 (text/image/video) map transformers' model reads, comes by
        default, as from transformers' Qwen2VLProcessor (`return_mm_token_type_ids=False` leaves it out).
        """
        if audio is not None:
            raise ValueError("Qwen2-VL takes images, videos and text")
        if images is None and text is None and videos is None:
            raise ValueError("Pass images, videos, text, or a combination")
        unknown_options(kwargs)
        clips = self._clips(videos)
        flat_images = flatten_images(images)
        data = {}
        if flat_images or clips:
            data.update(self.image_processor(flat_images or None, videos=clips, min_pixels=min_pixels, max_pixels=max_pixels, return_tensors=None))  # fmt: skip
        if text is not None:
            texts = prompt_list(text)
            image_counts = self._placeholder_counts(
                texts, self.image_token, data.get("image_grid_thw"), len(flat_images)
            )
            video_counts = self._placeholder_counts(texts, self.video_token, data.get("video_grid_thw"), len(clips))
            rows = TokenRows.encode(self.tokenizer, texts, **kwargs)
            for row, (n_images, n_videos) in enumerate(zip(*self._per_prompt(texts), strict=True)):
                rows.expand(row, self.image_token_id, image_counts[:n_images])
                rows.expand(row, self.video_token_id, video_counts[:n_videos])
                image_counts, video_counts = image_counts[n_images:], video_counts[n_videos:]
            data.update(rows.pad(self.tokenizer, padding, padding_side))
            if return_mm_token_type_ids:
                ids = torch.as_tensor(data["input_ids"])
                data["mm_token_type_ids"] = (ids == self.image_token_id).long() + 2 * (
                    ids == self.video_token_id
                ).long()
        return BatchFeature(data, tensor_type=return_tensors)

    @staticmethod
    def _clips(videos) -> list[list]:
        """One video (a list of frames, or an (F, H, W, C) array) or a list of videos -> a list of frame lists."""
        if videos is None:
            return []

        def is_video(v) -> bool:
            return isinstance(v, (list, tuple)) or (isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim == 4)

        several = isinstance(videos, (list, tuple)) and len(videos) > 0 and is_video(videos[0])
        return [list(video) for video in (videos if several else [videos])]

    def _per_prompt(self, texts: list[str]) -> tuple[list[int], list[int]]:
        return [t.count(self.image_token) for t in texts], [t.count(self.video_token) for t in texts]

    def _placeholder_counts(self, texts: list[str], token: str, grids, expected: int) -> list[int]:
        found = sum(t.count(token) for t in texts)
        if found != expected:
            kind = "images" if token == self.image_token else "videos"
            raise ValueError(
                f"The prompts hold {found} {token} placeholders but {expected} {kind} were given; write one "
                f"<|vision_start|>{token}<|vision_end|> per item where it belongs (apply_chat_template does)"
            )
        return [self.image_processor.tokens_per_grid(grid) for grid in grids] if grids is not None else []

    max_images_per_prompt: int | None = None

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Visual tokens per image (transformers' convention): the merged tokens of the image at the size
        `smart_resize` gives it, within the pixel budget (`min_pixels`/`max_pixels` as the call would pass them)."""
        if image_sizes is None:
            return MultiModalData()
        ip = self.image_processor
        low, high = ip._budget(kwargs.get("min_pixels"), kwargs.get("max_pixels"), ip.min_pixels, ip.max_pixels)
        tokens = []
        for height, width in image_sizes:
            resized = smart_resize(int(height), int(width), ip.factor, low, high)
            tokens.append(ip.tokens_per_grid([1, resized[0] // ip.patch_size, resized[1] // ip.patch_size]))
        return MultiModalData(num_image_tokens=tokens, num_image_patches=[1] * len(tokens))

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            "mm_token_type_ids",
            "pixel_values",
            "image_grid_thw",
            "pixel_values_videos",
            "video_grid_thw",
        ]
