"""Qwen2-VL: projection at native resolution. Images keep their own size (a budget of patches, not a fixed
grid); the merged patch tokens replace `<|image_pad|>` placeholders, and the LLM's rotary positions become
three-dimensional (time, row, column) for them: multimodal RoPE. Paper: Wang et al., "Qwen2-VL" (2024).
Loads `Qwen/Qwen2-VL-2B-Instruct` and `-7B-Instruct` (via conversion/).
pixels at ~native size -> patches (N, 1176) -> ViT with 2D RoPE -> 2x2 PatchMerger (N/4, D) -> LLM with M-RoPE.
"""

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .conditional_generation import PatternForConditionalGeneration
from .configuration_qwen2_vl import Qwen2VLPatternConfig
from .input_checks import check_attention_mask, check_grid, check_pixel_values
from .pattern_model import PatternModel
from .pattern_pretrained import PatternPreTrainedModel
from .placeholders import count_mismatch, scatter_placeholders
from .qwen2_vl_vision import Qwen2VLVisionTower
from .text_decoder import TextDecoder

# Axes: B batch, T tokens, I images, D text width; t/h/w a patch grid, m the merge size.


def get_rope_index(
    image_mask: torch.Tensor,
    video_mask: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    merge_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimodal RoPE positions (3, B, T) and each row's offset between position and length (B, 1).

    Text tokens count up on all three axes alike. The tokens of an image (or a video) share one starting
    position p and spread over the axes as their grid: time p + i, row p + j, column p + k, for the merged
    grid (t, h/m, w/m). The text after it resumes at p + max(t, h/m, w/m). Padding (attention_mask 0) is
    skipped and gets position 0. Example, two text tokens, a 1 x 4 x 6 patch grid (1 x 2 x 3 tokens), text:

        token   a  b  | i0 i1 i2 i3 i4 i5 | c
        time    0  1  |  2  2  2  2  2  2 | 5
        row     0  1  |  2  2  2  3  3  3 | 5
        column  0  1  |  2  3  4  2  3  4 | 5

    The offset (here 5 + 1 - 9 = -3) continues the positions during generation: token T + n sits at T + n + offset.
    image_mask / video_mask (B, T) mark the placeholders; grids (I, 3) are in the order they appear.
    """
    B, T = image_mask.shape
    device = image_mask.device
    positions = torch.zeros(3, B, T, dtype=torch.long, device=device)
    deltas = torch.zeros(B, 1, dtype=torch.long, device=device)
    grids = {1: iter((image_grid_thw if image_grid_thw is not None else torch.empty(0, 3)).tolist()),
             2: iter((video_grid_thw if video_grid_thw is not None else torch.empty(0, 3)).tolist())}  # fmt: skip
    kinds_all = image_mask.long() + 2 * video_mask.long()  # 0 text, 1 image, 2 video
    for b in range(B):
        keep = (
            attention_mask[b].bool() if attention_mask is not None else torch.ones(T, dtype=torch.bool, device=device)
        )
        kinds = kinds_all[b][keep]
        n = kinds.numel()
        row = torch.empty(3, n, dtype=torch.long, device=device)
        vision = torch.nonzero(kinds).flatten().tolist()
        cursor, next_position, v = 0, 0, 0
        while v < len(vision):
            start = vision[v]
            kind = int(kinds[start])
            try:
                t, h, w = next(grids[kind])
            except StopIteration:
                raise ValueError(
                    f"Row {b} has more {'image' if kind == 1 else 'video'} placeholders than grids"
                ) from None
            gh, gw = h // merge_size, w // merge_size
            count = t * gh * gw
            if start + count > n or not bool((kinds[start : start + count] == kind).all()):
                raise ValueError(f"Row {b}: a run of placeholders does not match its grid {(t, h, w)} ({count} tokens)")
            row[:, cursor:start] = torch.arange(start - cursor, device=device) + next_position  # text before it
            next_position += start - cursor
            ti, hi, wi = torch.meshgrid(
                torch.arange(t, device=device), torch.arange(gh, device=device), torch.arange(gw, device=device),
                indexing="ij",
            )  # fmt: skip
            row[:, start : start + count] = torch.stack([ti, hi, wi]).view(3, -1) + next_position
            next_position += max(t, gh, gw)
            cursor = start + count
            v += count
        row[:, cursor:] = torch.arange(n - cursor, device=device) + next_position
        positions[:, b, keep] = row
        deltas[b] = (row.max() + 1 - n) if n else 0
    for kind, remaining in grids.items():
        if next(remaining, None) is not None:
            raise ValueError(
                f"More {'image' if kind == 1 else 'video'} grids were given than the prompts have placeholders"
            )
    return positions, deltas


def expansion_hint(what: str) -> str:
    return f"let the processor expand each <|vision_start|><|{what}_pad|><|vision_end|>"


@dataclass
class Qwen2VLPatternModelOutput(BaseModelOutputWithPast):
    """`rope_deltas` (B, 1): pass it back (or position_ids) to continue from `cache` outside `generate`."""

    rope_deltas: torch.Tensor | None = None


@dataclass
class Qwen2VLPatternCausalLMOutput(CausalLMOutputWithPast):
    rope_deltas: torch.Tensor | None = None


class Qwen2VLPatternPreTrainedModel(PatternPreTrainedModel):
    config_class = Qwen2VLPatternConfig
    config: Qwen2VLPatternConfig
    input_modalities = ("image", "video", "text")
    _no_split_modules = ["DecoderLayer", "VisionBlock"]
    auto_map_classes = {
        "AutoModel": "Qwen2VLPatternModel",
        "AutoModelForImageTextToText": "Qwen2VLPatternForConditionalGeneration",
    }


class Qwen2VLPatternModel(PatternModel, Qwen2VLPatternPreTrainedModel):
    def __init__(self, config: Qwen2VLPatternConfig):
        super().__init__(config)
        self.visual = Qwen2VLVisionTower(config.vision_config)
        self.language_model = TextDecoder(config.text_config)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Patches (N, 1176) and their grids (I, 3) -> merged tokens (N / 4, D), images in order."""
        return self.visual(pixel_values, image_grid_thw)

    def placeholder_masks(self, input_ids, inputs_embeds) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the image and the video placeholders are, each (B, T) bool."""
        image_id, video_id = self.config.image_token_id, self.config.video_token_id
        return tuple(self.placeholder_mask(input_ids, inputs_embeds, token_id) for token_id in (image_id, video_id))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        rope_deltas: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> Qwen2VLPatternModelOutput:
        """`mm_token_type_ids` (what transformers' Qwen2-VL processor returns) is accepted and not needed: the
        placeholder tokens themselves say where images and videos are."""
        inputs_embeds, cache, use_cache = self.start_forward(
            input_ids, inputs_embeds, cache, past_key_values, use_cache
        )
        image_mask, video_mask = self.placeholder_masks(input_ids, inputs_embeds)
        past = cache.get_seq_length() if cache is not None else 0
        check_attention_mask(attention_mask, *inputs_embeds.shape[:2], past)  # before M-RoPE reads it
        image_layout, video_layout, position_ids, rope_deltas = self.read_grids(
            pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, image_mask, video_mask, attention_mask,
            past, position_ids, rope_deltas,
        )  # fmt: skip
        if pixel_values is not None:
            check_pixel_values(pixel_values)
            features = self.visual(pixel_values, image_grid_thw, image_layout)  # (N / 4, D)
            inputs_embeds = scatter_placeholders(inputs_embeds, image_mask, features, expansion_hint("image"))
        if pixel_values_videos is not None:
            check_pixel_values(pixel_values_videos, "pixel_values_videos")
            features = self.visual(pixel_values_videos, video_grid_thw, video_layout)
            inputs_embeds = scatter_placeholders(inputs_embeds, video_mask, features, expansion_hint("video"))

        hidden_states, cache, all_hidden_states = self.run_language_model(
            inputs_embeds, attention_mask, position_ids, cache, use_cache, output_hidden_states, **kwargs
        )
        return Qwen2VLPatternModelOutput(
            last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states, rope_deltas=rope_deltas
        )

    def next_positions(self, prefill, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """M-RoPE after the prompt: text positions continue from the prompt's offset (`rope_deltas`), equal on all
        three axes, so plain 1D positions serve the decode steps."""
        return super().next_positions(prefill, attention_mask) + prefill.rope_deltas.view(-1).to(torch.long)

    # Everything read from the grids on the host, in one call: torch.compile (the static path's compiled prompt
    # pass) runs it as it is, and compiles what comes before and after it.
    @torch.compiler.disable
    def read_grids(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, image_mask, video_mask,
                   attention_mask, past, position_ids, rope_deltas) -> tuple:  # fmt: skip
        """The grids checked against the patches and the placeholders -> each input's vision layout (see
        `Qwen2VLVisionTower.layout`) and the M-RoPE positions and offsets (as given, or computed)."""
        merge_size = self.config.vision_config.spatial_merge_size
        layouts = []
        for what, pixels, grid, mask in (
            ("image", pixel_values, image_grid_thw, image_mask),
            ("video", pixel_values_videos, video_grid_thw, video_mask),
        ):
            if pixels is None:
                layouts.append(None)
                continue
            name = "pixel_values" if what == "image" else "pixel_values_videos"
            if grid is None:
                raise ValueError(f"{name} need {what}_grid_thw (the processor returns both)")
            check_grid(grid, pixels, merge_size, what)
            layouts.append(self.visual.layout(pixels, grid))
            tokens, placeholders = int(grid.prod(-1).sum()) // merge_size**2, int(mask.sum())
            if placeholders != tokens:
                raise count_mismatch(placeholders, tokens, expansion_hint(what))
        if past == 0 and pixel_values is None and pixel_values_videos is None and bool((image_mask | video_mask).any()):
            raise ValueError("The prompt has image or video placeholder tokens but no pixel values were given")
        if position_ids is None:
            position_ids, rope_deltas = self.positions(
                image_mask, video_mask, image_grid_thw, video_grid_thw, attention_mask, past, rope_deltas
            )
        return *layouts, position_ids, rope_deltas

    def positions(self, image_mask, video_mask, image_grid_thw, video_grid_thw, attention_mask, past, rope_deltas):
        """M-RoPE positions for this call when none were given: from the grids for a fresh prompt, or continued
        from `rope_deltas` after `past` cached tokens."""
        B, T = image_mask.shape
        if past == 0:
            if image_grid_thw is None and video_grid_thw is None:
                return None, torch.zeros(B, 1, dtype=torch.long, device=image_mask.device)  # text only: plain RoPE
            mask = attention_mask[:, -T:] if attention_mask is not None else None
            return get_rope_index(
                image_mask,
                video_mask,
                image_grid_thw,
                video_grid_thw,
                mask,
                self.config.vision_config.spatial_merge_size,
            )
        if rope_deltas is None:
            raise ValueError(
                "Continuing from a cache needs the positions: pass position_ids, or rope_deltas from the previous "
                "output (generate() does this for you)"
            )
        if attention_mask is not None:
            text = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        else:
            text = torch.arange(past, past + T, device=image_mask.device).expand(B, T)
        return (text + rope_deltas.to(text.device)).unsqueeze(0).expand(3, -1, -1), rope_deltas


class Qwen2VLPatternForConditionalGeneration(PatternForConditionalGeneration, Qwen2VLPatternPreTrainedModel):
    base_model_class = Qwen2VLPatternModel
    output_class = Qwen2VLPatternCausalLMOutput
    vision_encoder_prefixes = ("model.visual.patch_embed.", "model.visual.blocks.")
    connector_prefixes = ("model.visual.merger.",)

    def positions_without_targets(self, input_ids, inputs_embeds, labels) -> torch.Tensor:
        image_mask, video_mask = self.model.placeholder_masks(input_ids, inputs_embeds)
        return image_mask | video_mask  # the model never predicts an image or video feature

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        """M-RoPE positions of the whole prompt, computed once; generate() then extends every axis by one per
        token, so the offset travels in the generation kwargs and nothing is kept on the model."""
        input_ids = model_kwargs.get("input_ids", inputs_tensor)
        grids = model_kwargs.get("image_grid_thw"), model_kwargs.get("video_grid_thw")
        is_ids = input_ids.dim() == 2 and not input_ids.is_floating_point()
        if not is_ids or (grids[0] is None and grids[1] is None):
            return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        positions, _ = get_rope_index(
            input_ids == self.config.image_token_id,
            input_ids == self.config.video_token_id,
            *grids,
            model_kwargs.get("attention_mask"),
            self.config.vision_config.spatial_merge_size,
        )
        return positions
