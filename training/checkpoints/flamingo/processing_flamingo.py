"""Flamingo's processor: interleaved text and images. Each image is one `<image>` token in the text (the model
finds it there; no placeholders are expanded), and `pixel_values` hold every row's images in order, padded to
the batch's largest image count, with `image_mask` marking the real ones.

IDEFICS wraps each run of images in `<fake_token_around_image>` (`fake_image_token`) and puts `<s>` in front
as text (`bos_as_text`); OpenFlamingo separates examples with `<|endofchunk|>` (`end_of_chunk_token`).
"""

import re

import torch
from transformers.image_processing_base import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessorMixin

from .image_ops import flatten_images
from .prompt_text import TokenRows, prompt_list, split_options, unknown_options


def flamingo_chat_template(end_of_utterance: str = "") -> str:
    """IDEFICS-instruct's conversation format: "User: text<image><end_of_utterance>\\nAssistant: ...".
    Images and text appear in the order of the message's content. An answer ends with `end_of_utterance`, or
    without one with the EOS token, and is marked ({% generation %}) for `return_assistant_tokens_mask`."""
    answer_end = f"'{end_of_utterance}'" if end_of_utterance else "eos_token"
    return (
        "{%- for message in messages -%}"
        "{{ message['role'] | capitalize }}:"
        "{%- if message['role'] == 'assistant' -%}{% generation %}"
        "{%- if message['content'] is string -%}{{ ' ' + message['content'] }}"
        "{%- else -%}{%- for item in message['content'] if 'text' in item -%}{{ ' ' + item['text'] }}{%- endfor -%}"
        "{%- endif -%}{{ " + answer_end + " }}{% endgeneration %}{{ '\n' }}"
        "{%- else -%}"
        "{%- if message['content'] is string -%}{{ ' ' + message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{{ '<image>' }}{%- elif 'text' in item -%}{{ ' ' + item['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{{ '" + end_of_utterance + "\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
    )


class FlamingoPatternProcessor(ProcessorMixin):
    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_token: str = "<image>",
        fake_image_token: str | None = None,
        end_of_chunk_token: str | None = None,
        bos_as_text: bool = False,
        visual_tokens_per_image: int | None = None,
        chat_template: str | None = None,
        **kwargs,
    ):
        """
        fake_image_token: wraps each run of consecutive images (IDEFICS: `<fake_token_around_image>`).
        end_of_chunk_token: ends each in-context example in `few_shot` prompts (OpenFlamingo: `<|endofchunk|>`;
            default: a newline).
        bos_as_text: put the BOS token in front as text and tokenize without special tokens, as IDEFICS was
            trained; otherwise the tokenizer adds its special tokens itself.
        visual_tokens_per_image: what each image becomes for the language model (the resampler's latents, read
            through cross-attention; the text holds one `<image>` per image). The model's config says it too
            (`num_visual_tokens`); the processor keeps a copy to count without the model.
        """
        self.image_token = image_token
        self.fake_image_token = fake_image_token
        self.end_of_chunk_token = end_of_chunk_token
        self.bos_as_text = bos_as_text
        self.visual_tokens_per_image = visual_tokens_per_image
        super().__init__(image_processor, tokenizer, chat_template=chat_template or flamingo_chat_template())
        for token in (image_token, fake_image_token, end_of_chunk_token):
            if token is None:
                continue
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(f"The tokenizer has no {token!r} token; add it as a special token first")
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def expand_text(self, text: str) -> str:
        """IDEFICS variant: wrap each run of `<image>` tokens in fake tokens (<fake><image><fake><image><fake>) and,
        as IdeficsProcessor does with the text pieces between images, drop the spaces next to them."""
        if self.fake_image_token is None:
            return text
        image, fake = self.image_token, self.fake_image_token
        run = f" *((?:{re.escape(image)})+) *"
        return re.sub(run, lambda m: fake + (image + fake) * m[1].count(image), text.strip(" "))

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        videos=None,
        audio=None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str = "left",
        add_special_tokens: bool = True,
        **kwargs,
    ) -> BatchFeature:
        """Prompts with one `<image>` per image where the image belongs, and the images in order: one list per
        prompt, or a flat list shared out by each prompt's `<image>` count.

        Returns `input_ids` and `attention_mask` (left-padded by default, as batched generation needs) and,
        with images, `pixel_values` (B, I, 3, H, W), zero for the padding images, and `image_mask` (B, I).
        Image processor options may be passed as keywords.
        """
        if videos is not None or audio is not None:
            raise ValueError("Flamingo takes images and text only")
        if text is None:
            raise ValueError("Pass the text (with one <image> per image)")
        texts = prompt_list(text)
        per_prompt = self.images_per_prompt(texts, images)
        text_options, image_options = split_options(kwargs)
        data = {}
        if any(per_prompt):
            flat = [image for row in per_prompt for image in row]
            pixels = self.image_processor(flat, return_tensors="pt", **image_options)[
                "pixel_values"
            ]  # (sum I, 3, H, W)
            most = max(len(row) for row in per_prompt)
            pixel_values = pixels.new_zeros(len(texts), most, *pixels.shape[1:])
            image_mask = torch.zeros(len(texts), most, dtype=torch.bool)
            start = 0
            for b, row in enumerate(per_prompt):
                pixel_values[b, : len(row)] = pixels[start : start + len(row)]
                image_mask[b, : len(row)] = True
                start += len(row)
            data.update(pixel_values=pixel_values, image_mask=image_mask)
        else:
            unknown_options(image_options)
        texts = [self.expand_text(t) for t in texts]
        if self.bos_as_text:
            texts = [self.tokenizer.bos_token + t for t in texts]
            add_special_tokens = False
        rows = TokenRows.encode(self.tokenizer, texts, add_special_tokens=add_special_tokens, **text_options)
        data.update(rows.pad(self.tokenizer, padding, padding_side))
        return BatchFeature(data, tensor_type=return_tensors)

    def images_per_prompt(self, texts: list[str], images) -> list[list]:
        """Each prompt's images, checked against its `<image>` count."""
        counts = [t.count(self.image_token) for t in texts]
        flatten_images(images)  # refuses a None among the images before it can shift the rest
        nested = (
            isinstance(images, (list, tuple))
            and len(images) == len(texts)
            and all(isinstance(item, (list, tuple)) for item in images)
        )
        if nested:
            rows = [list(row) for row in images]
        else:
            flat, rows, start = flatten_images(images), [], 0
            if sum(counts) != len(flat):
                raise ValueError(
                    f"The prompts hold {sum(counts)} {self.image_token} tokens but {len(flat)} images were given; "
                    "write one per image, where the image belongs in the text"
                )
            for count in counts:
                rows.append(flat[start : start + count])
                start += count
        for i, (count, row) in enumerate(zip(counts, rows, strict=True)):
            if count != len(row):
                raise ValueError(f"Prompt {i} has {count} {self.image_token} tokens but {len(row)} images")
        return rows

    def few_shot_prompt(self, example_texts: list[str], query_text: str = "") -> str:
        """An in-context prompt: `<image>` + text for each example, each ended by the end-of-chunk token (or a
        newline), then `<image>` + the query, which the model continues."""
        end = self.end_of_chunk_token or "\n"
        return "".join(f"{self.image_token}{t}{end}" for t in example_texts) + f"{self.image_token}{query_text}"

    def few_shot(self, examples: list[tuple], query_image, query_text: str = "", **kwargs) -> BatchFeature:
        """Model inputs for few-shot prompting: `examples` as (image, text) pairs, then the query image and the
        start of its answer (e.g. "Output:"). Keywords go to `__call__`."""
        prompt = self.few_shot_prompt([text for _, text in examples], query_text)
        return self(images=[[image for image, _ in examples] + [query_image]], text=prompt, **kwargs)

    max_images_per_prompt: int | None = None  # interleaved, any number

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Visual tokens per image (transformers' convention, as the language model reads them): the resampler's
        fixed number of latents, whatever the image's size."""
        if image_sizes is None:
            return MultiModalData()
        if self.visual_tokens_per_image is None:
            raise ValueError("This processor was saved without visual_tokens_per_image; set it from the model's "
                             "config.num_visual_tokens")  # fmt: skip
        return MultiModalData(num_image_tokens=[self.visual_tokens_per_image] * len(image_sizes),
                              num_image_patches=[1] * len(image_sizes))  # fmt: skip

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_mask"]
