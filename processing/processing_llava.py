"""LLaVA's processor: images -> pixel_values, and each `<image>` in the text -> exactly as many placeholder
tokens as the model will fill with projected features (576 for LLaVA-1.5).
"""

from transformers.image_processing_base import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessorMixin

from .image_ops import flatten_images
from .prompt_text import TokenRows, prompt_list, split_options, unknown_options

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT: ...</s>"), images before the text of a turn. The
# answers are marked ({% generation %}) for `return_assistant_tokens_mask`.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set text = message['content'] if message['content'] is string else "
    "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- if message['role'] == 'system' -%}{{ text + ' ' }}"
    "{%- else -%}"
    "{{ message['role'].upper() + ': ' }}"
    "{%- if message['content'] is not string -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}{{ text + eos_token }}{% endgeneration %}"
    "{%- else -%}{{ text + ' ' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


class LlavaPatternProcessor(ProcessorMixin):
    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size: int = 14,
        vision_feature_select_strategy: str = "default",
        num_additional_image_tokens: int = 1,
        image_token: str = "<image>",
        chat_template: str | None = LLAVA_CHAT_TEMPLATE,
        **kwargs,
    ):
        """
        patch_size: the vision tower's patch size. num_additional_image_tokens: tokens the tower adds to the
            patches (1: the class token). vision_feature_select_strategy: `default` drops the class token,
            `full` keeps it; must match the model config.
        """
        self.patch_size = patch_size
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.num_additional_image_tokens = num_additional_image_tokens
        self.image_token = image_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {image_token!r} token; add it as a special token first")

    @property
    def image_seq_length(self) -> int:
        """Placeholder tokens per image."""
        height, width = self.image_processor.output_size
        count = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        return count - (self.vision_feature_select_strategy == "default")

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        videos=None,
        audio=None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        **kwargs,
    ) -> BatchFeature:
        """Prompts with one `<image>` per image, and the images in order (flat, or one list per prompt).

        Returns `input_ids` and `attention_mask` (padded on the tokenizer's side unless `padding_side` says),
        and `pixel_values` (num_images, 3, H, W). Image processor options may be passed as keywords.
        """
        if videos is not None or audio is not None:
            raise ValueError("LLaVA takes images and text only")
        if images is None and text is None:
            raise ValueError("Pass images, text, or both")
        data = {}
        text_options, image_options = split_options(kwargs)
        flat_images = flatten_images(images)
        if flat_images:
            data.update(self.image_processor(flat_images, return_tensors=None, **image_options))
        else:
            unknown_options(image_options)
        if text is not None:
            texts = prompt_list(text)
            self.check_image_counts(texts, images, len(flat_images))
            rows = TokenRows.encode(self.tokenizer, texts, add_special_tokens=add_special_tokens, **text_options)
            for row in range(len(texts)):
                rows.expand(row, self.image_token_id, self.image_seq_length)
            data.update(rows.pad(self.tokenizer, padding, padding_side))
        return BatchFeature(data, tensor_type=return_tensors)

    def check_image_counts(self, texts: list[str], images, num_images: int) -> None:
        per_prompt = [t.count(self.image_token) for t in texts]
        if sum(per_prompt) != num_images:
            raise ValueError(
                f"The prompts hold {sum(per_prompt)} {self.image_token} placeholders but {num_images} images were "
                "given; write one placeholder per image, where the image belongs in the text"
            )
        nested = (
            isinstance(images, (list, tuple))
            and len(images) == len(texts)
            and all(isinstance(item, (list, tuple)) for item in images)
        )
        if nested:
            for i, (count, row) in enumerate(zip(per_prompt, images, strict=True)):
                if count != len(row):
                    raise ValueError(f"Prompt {i} has {count} {self.image_token} placeholders but {len(row)} images")

    max_images_per_prompt: int | None = None  # any number, each expanded at its own <image>

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Visual tokens per image (transformers' convention): every image becomes the same fixed number."""
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(num_image_tokens=[self.image_seq_length] * len(image_sizes),
                              num_image_patches=[1] * len(image_sizes))  # fmt: skip

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]
