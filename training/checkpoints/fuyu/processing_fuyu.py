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
from transformers.processing_utils import MultiModalData, ProcessorMixin

from .image_ops import flatten_images
from .prompt_text import TokenRows, prompt_list, split_options, unknown_options

BOX_OPEN, BOX_CLOSE, POINT_OPEN, POINT_CLOSE, ANSWER = "<0x00>", "<0x01>", "<0x02>", "<0x03>", "<0x04>"
COORDINATES = re.compile(r"<(box|point)>(.*?)</\1>")

# Fuyu-8B has no chat format: the prompt is the user's text (its image is given separately), newline-terminated,
# and the model answers after its begin-of-answer token. The template writes ANSWER_MARK (the character \x04, that
# token's byte) before each answer, marked ({% generation %}) for `return_assistant_tokens_mask`, and at the end for
# a generation prompt; the processor turns each mark into the begin-of-answer token (a prompt without any mark,
# written by hand, gets one at its end).
ANSWER_MARK = "\x04"
FUYU_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set text = message['content'] if message['content'] is string else "
    "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- if message['role'] == 'user' -%}{{ text + '\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '\x04' }}{% generation %}{{ text + eos_token }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\x04' }}{%- endif -%}"
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
        return self.encode_text_with_spans(text, scale)[0]

    def encode_text_with_spans(self, text: str, scale: float, start: int = 0) -> tuple[list[int], list[tuple]]:
        """`encode_text`, and each token's character span in the text (shifted by `start`): a coordinate token
        spans its whole `<box>...</box>`."""
        ids, spans, cursor = [], [], 0

        def plain(begin: int, end: int) -> None:
            encoded = self.tokenizer(text[begin:end], add_special_tokens=False, return_offsets_mapping=True)
            ids.extend(encoded["input_ids"])
            spans.extend((start + begin + a, start + begin + b) for a, b in encoded["offset_mapping"])

        for match in COORDINATES.finditer(text):
            if match.start() > cursor:
                plain(cursor, match.start())
            values = [float(v) for v in match.group(2).split(",")]
            kind = match.group(1)
            if len(values) != (4 if kind == "box" else 2):
                raise ValueError(
                    f"<{kind}> needs {4 if kind == 'box' else 2} comma-separated numbers, got {match.group(0)!r}"
                )
            opening, closing = (BOX_OPEN, BOX_CLOSE) if kind == "box" else (POINT_OPEN, POINT_CLOSE)
            scaled = np.round(np.array(values) / 2 * scale).astype(int)  # the model counts in half pixels of its input
            tagged = [self.tokenizer.convert_tokens_to_ids(opening), *(self._coordinate_token(int(v)) for v in scaled)]
            tagged.append(self.tokenizer.convert_tokens_to_ids(closing))
            ids.extend(tagged)
            spans.extend([(start + match.start(), start + match.end())] * len(tagged))
            cursor = match.end()
        if cursor < len(text):
            plain(cursor, len(text))
        return ids, spans

    def encode_prompt(self, prompt: str, scale: float) -> tuple[list[int], list[tuple]]:
        """A prompt (after the image stream): BOS, the text, and the begin-of-answer token at each ANSWER_MARK,
        or at the end of a prompt that has none; with each token's character span."""
        ids, spans = [self.tokenizer.bos_token_id], [(0, 0)]
        start = 0
        for k, piece in enumerate(prompt.split(ANSWER_MARK)):
            if k:
                ids.append(self.answer_token_id)
                spans.append((start - 1, start))  # the mark's own character
            piece_ids, piece_spans = self.encode_text_with_spans(piece, scale, start)
            ids += piece_ids
            spans += piece_spans
            start += len(piece) + 1
        if ANSWER_MARK not in prompt:
            ids.append(self.answer_token_id)
            spans.append((0, 0))
        return ids, spans

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
        text_options, image_options = split_options(kwargs)
        data = dict(self.image_processor(flat, return_tensors=None, **image_options)) if flat else {}
        if not flat:
            unknown_options(image_options)
        unknown_options(
            text_options, {"return_offsets_mapping", "return_text_replacement_offsets", "add_special_tokens"}
        )
        if texts is not None:
            grids = iter(data.get("image_patch_grid", torch.empty(0, 2)).tolist())
            scales = iter(data.get("image_scale_factors", torch.empty(0)).tolist())
            streams, all_spans = [], []
            for prompt, image in zip(texts, per_prompt, strict=True):
                stream, scale = [], 1.0
                if image is not None:
                    stream += self.image_stream(*next(grids))
                    scale = next(scales)
                ids, spans = self.encode_prompt(prompt, scale)
                streams.append(stream + ids)
                all_spans.append([(0, 0)] * len(stream) + spans)
            rows = TokenRows(streams, all_spans if text_options.get("return_offsets_mapping") else None)
            data.update(rows.pad(self.tokenizer, padding, padding_side, pad_token_id=self.pad_token_id))
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
        """The generated part of one sequence: what follows the last begin-of-answer token of the prompt (a chat
        holds one per earlier answer too)."""
        sequence = list(sequence)
        if self.answer_token_id not in sequence:
            return sequence
        return sequence[len(sequence) - sequence[::-1].index(self.answer_token_id) :]

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

    max_images_per_prompt: int | None = 1  # Fuyu's stream holds one image, at its start

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Visual tokens per image (transformers' convention): one per patch, and the newline closing each row."""
        if image_sizes is None:
            return MultiModalData()
        grids = [self.image_processor.patch_grid(int(h), int(w)) for h, w in image_sizes]
        return MultiModalData(num_image_tokens=[rows * cols + rows for rows, cols in grids],
                              num_image_patches=[1] * len(grids))  # fmt: skip

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]
