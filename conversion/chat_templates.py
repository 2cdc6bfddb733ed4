"""Which chat template a converted checkpoint gets: the source's own, or this project's when they are the same.

Public templates (llava-hf's, Qwen2-VL's) do not mark the answers with `{% generation %}`, so transformers'
`return_assistant_tokens_mask=True` (how TRL's SFT masks the prompt) finds no answer in them. This project's
family templates mark them. Where ours writes exactly what the source's writes for the same conversations, ours
is used; otherwise the source's is kept, as it is, and the conversion says that assistant masks will be empty.
"""

import warnings

from transformers.utils.chat_template_utils import render_jinja_template

# Conversations that exercise what a template can differ on: images and text, a system turn, several turns,
# string content, the generation prompt.
PROBES = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}],
    [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat on a mat."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the colour?"}]},
    ],
    [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": "Two images: <what differs>?"},
        {"role": "assistant", "content": "The left one."},
    ],
]


def render(template: str, conversation: list[dict], add_generation_prompt: bool, special_tokens: dict) -> str:
    rendered, _ = render_jinja_template(
        conversations=[conversation], chat_template=template, add_generation_prompt=add_generation_prompt,
        **special_tokens,
    )  # fmt: skip
    return rendered[0]


def renders_alike(first: str, second: str, special_tokens: dict) -> bool:
    try:
        return all(
            render(first, probe, generation, special_tokens) == render(second, probe, generation, special_tokens)
            for probe in PROBES
            for generation in (False, True)
        )
    except Exception:  # a template that cannot render a probe is not the same template
        return False


def choose_chat_template(source: str | None, ours: str, special_tokens: dict) -> str:
    """The template for a converted checkpoint (see the module docstring)."""
    if source is None or "{% generation %}" in source or "{%- generation %}" in source:
        return source or ours
    if renders_alike(source, ours, special_tokens):
        return ours
    warnings.warn(
        "The source's chat template does not mark answers with {% generation %} and differs from this project's, "
        "so it is kept as it is: apply_chat_template(return_assistant_tokens_mask=True) will mark nothing. Pass a "
        "template with {% generation %} around the answers to the processor to train on answers only.",
        stacklevel=2,
    )
    return source
