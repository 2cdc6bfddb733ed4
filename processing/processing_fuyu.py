"""Fuyu's processor: the token stream and Fuyu's box/point coordinates, both ways.

Stream of one prompt (Adept's layout): for each patch row, one `|SPEAKER|` per patch and a `|NEWLINE|`; then
`<s>`, the prompt, and the begin-of-answer token `<0x04>`. Boxes in a prompt, `<box>y1, x1, y2, x2</box>` in the
original image's pixels, become `<0x00>` + one vocabulary token per coordinate (the value halved and scaled by
the resize factor) + `<0x01>`; points `<point>x, y</point>` use `<0x02>` / `<0x03>`. The answer is decoded back
the same way.
"""

import re

import numpy as np
import torch
from transformers.image_processing_base import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_ops import flatten_images
from .prompt_text import prompt_list

BOX_OPEN, BOX_CLOSE, POINT_OPEN, POINT_CLOSE, ANSWER = "<0x00>", "<0x01>", "<0x02>", "<0x03>", "<0x04>"
COORDINATES = re.compile(r"<(box|point)>(.*?)</\1>")

# Fuyu-8B has no chat format: the prompt is the user's text (its image is given separately), newline-terminated.
FUYU_CHAT_TEMPLATE = (
    "{%- for message in messages if message['role'] == 'user' -%}"
    "{{ message['content'] if message['content'] is string else "
    "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}{{ '\n' }}"
    "{%- endfor -%}"
)


class FuyuPatternProcessor(ProcessorMixin):
    markers = (BOX_OPEN, BOX_CLOSE, POINT_OPEN, POINT_CLOSE, ANSWER)

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_token: str = "|SPEAKER|",
        image_newline_token: str = "|NEWLINE|",
        chat_template: str | None = FUYU_CHAT_TEMPLATE,
        **kwargs,
    ):
        self.image_token, self.image_newline_token = image_token, image_newline_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        vocab = tokenizer.get_vocab()
        missing = [t for t in (image_token, image_newline_token, tokenizer.bos_token, *self.markers) if t not in vocab]
        if missing:
            raise ValueError(f"The tokenizer lacks Fuyu's tokens {missing}")
        self.image_token_id, self.image_newline_token_id = vocab[image_token], vocab[image_newline_token]
        self.answer_token_id = vocab[ANSWER]
        # Fuyu's processor pads with id 0 whatever the tokenizer says; kept, so batches match the reference.
        self.pad_token_id = 0

    # ------------------------------------------------------------------------------------------------------
    # Coordinates

    def _coordinate_token(self, value: int) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(str(value))
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no token for the coordinate {value}")
        return token_id

    def encode_text(self, text: str, scale: float) -> list[int]:
        """Prompt text -> token ids, with `<box>`/`<point>` coordinates turned into Fuyu's coordinate tokens."""
        ids, cursor = [], 0
        for match in COORDINATES.finditer(text):
            if match.start() > cursor:
                ids += self.tokenizer(text[cursor : match.start()], add_special_tokens=False)["input_ids"]
            values = [float(v) for v in match.group(2).split(",")]
            kind = match.group(1)
            if len(values) != (4 if kind == "box" else 2):
                raise ValueError(
                    f"<{kind}> needs {4 if kind == 'box' else 2} comma-separated numbers, got {match.group(0)!r}"
                )
            opening, closing = (BOX_OPEN, BOX_CLOSE) if kind == "box" else (POINT_OPEN, POINT_CLOSE)
            scaled = np.round(np.array(values) / 2 * scale).astype(int)  # the model counts in half pixels of its input
            ids += [self.tokenizer.convert_tokens_to_ids(opening), *(self._coordinate_token(int(v)) for v in scaled)]
            ids.append(self.tokenizer.convert_tokens_to_ids(closing))
            cursor = match.end()
        if cursor < len(text):
            ids += self.tokenizer(text[cursor:], add_special_tokens=False)["input_ids"]
        return ids

    def decode_coordinates(self, token_ids, scale: float) -> str:
        """Generated ids -> text, coordinate tokens written back as `<box>y1, x1, y2, x2</box>` / `<point>x, y</point>`
        in the original image's pixels (`scale`: the image processor's resize factor)."""
        tags = {BOX_OPEN: ("box", 4, BOX_CLOSE), POINT_OPEN: ("point", 2, POINT_CLOSE)}
        tokens = self.tokenizer.convert_ids_to_tokens(list(token_ids))
        pieces, run, i = [], [], 0
        while i < len(tokens):
            name, count, closing = tags.get(tokens[i], (None, 0, None))
            inner = tokens[i + 1 : i + 1 + count]
            if (
                name
                and len(inner) == count
                and all(t.isdigit() for t in inner)
                and tokens[i + 1 + count : i + 2 + count] == [closing]
            ):
                pieces.append(self.tokenizer.convert_tokens_to_string(run))
                values = [round(int(t) * 2 / scale) for t in inner]
                pieces.append(f"<{name}>{', '.join(map(str, values))}</{name}>")
                run, i = [], i + count + 2
            else:
                run.append(tokens[i])
                i += 1
        pieces.append(self.tokenizer.convert_tokens_to_string(run))
        return "".join(pieces)

    # ------------------------------------------------------------------------------------------------------
    # Streams

    def image_stream(self, rows: int, cols: int) -> list[int]:
        return ([self.image_token_id] * cols + [self.image_newline_token_id]) * rows

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        videos=None,
        audio=None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str = "left",
        **kwargs,
    ) -> BatchFeature:
        """One prompt per image (images may be None for text-only prompts). Batches are left-padded with id 0,
        as generation needs. Returns input_ids, attention_mask, pixel_values (all patches, 2700), and per image
        its patch grid, original size and resize factor (for `post_process_box_coordinates`)."""
        if videos is not None or audio is not None:
            raise ValueError("Fuyu takes images and text only")
        if images is None and text is None:
            raise ValueError("Pass images, text, or both")
        texts = prompt_list(text) if text is not None else None
        per_prompt = self._images_per_prompt(images, texts)
        flat = [image for image in per_prompt if image is not None]
        data = dict(self.image_processor(flat, return_tensors=None, **kwargs)) if flat else {}
        if kwargs and not flat:
            raise TypeError(f"Unknown processor options: {sorted(kwargs)}")
        if texts is not None:
            grids = iter(data.get("image_patch_grid", torch.empty(0, 2)).tolist())
            scales = iter(data.get("image_scale_factors", torch.empty(0)).tolist())
            streams = []
            for prompt, image in zip(texts, per_prompt, strict=True):
                stream, scale = [], 1.0
                if image is not None:
                    stream += self.image_stream(*next(grids))
                    scale = next(scales)
                stream += [self.tokenizer.bos_token_id, *self.encode_text(prompt, scale), self.answer_token_id]
                streams.append(stream)
            pad_id = self.tokenizer.pad_token_id
            self.tokenizer.pad_token_id = self.pad_token_id
            try:
                data.update(self.tokenizer.pad({"input_ids": streams}, padding=padding, padding_side=padding_side))
            finally:
                self.tokenizer.pad_token_id = pad_id
        return BatchFeature(data, tensor_type=return_tensors)

    @staticmethod
    def _images_per_prompt(images, texts) -> list:
        if texts is None:
            return flatten_images(images)
        if images is None:
            return [None] * len(texts)
        per_prompt = [images] if not isinstance(images, (list, tuple)) else list(images)
        per_prompt = [
            image[0] if isinstance(image, (list, tuple)) and len(image) == 1 else image for image in per_prompt
        ]
        if any(isinstance(image, (list, tuple)) and image for image in per_prompt):
            raise ValueError("Fuyu takes at most one image per prompt")
        per_prompt = [None if isinstance(image, (list, tuple)) else image for image in per_prompt]
        if len(per_prompt) != len(texts):
            raise ValueError(f"{len(texts)} prompts but {len(per_prompt)} images: give one image (or None) per prompt")
        return per_prompt

    # ------------------------------------------------------------------------------------------------------
    # Answers

    def answer_ids(self, sequence) -> list[int]:
        """The generated part of one sequence: what follows the begin-of-answer token."""
        sequence = list(sequence)
        return sequence[sequence.index(self.answer_token_id) + 1 :] if self.answer_token_id in sequence else sequence

    def post_process_image_text_to_text(self, generated_ids, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return [
            self.tokenizer.decode(self.answer_ids(seq), skip_special_tokens=skip_special_tokens, **kwargs)
            for seq in generated_ids
        ]

    def post_process_box_coordinates(self, generated_ids, image_scale_factors) -> list[str]:
        """Answers with their coordinate tokens written as boxes/points in each original image's pixels."""
        return [
            self.decode_coordinates(self.answer_ids(seq), float(scale))
            for seq, scale in zip(generated_ids, image_scale_factors, strict=True)
        ]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]
