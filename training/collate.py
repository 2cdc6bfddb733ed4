"""Examples -> model inputs: each family's own chat format and processor.

For training, each example is a two-turn conversation (the question with its images, then the answer) rendered by
the family's chat template and tokenized by its processor with `return_assistant_tokens_mask=True`, the way TRL's
SFT and most fine-tuning scripts mask the prompt: only the reply's tokens (the template's `{% generation %}` part:
the example's `reply`, or its `answer` when it has none, and the family's end token) carry labels; the question,
the image placeholders and the padding are -100. Without answers (evaluation, generation) the prompt ends with the
template's generation prompt.
"""

import torch


def user_turn(question: str, images: list) -> dict:
    return {"role": "user", "content": [{"type": "image", "image": image} for image in images]
            + [{"type": "text", "text": question}]}  # fmt: skip


def prompt_text(processor, question: str, num_images: int) -> str:
    """The family's chat-formatted prompt for a question about `num_images` images, ready for the answer."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


class VQACollator:
    """Batches of examples (dicts with images, question, answer and optionally reply) -> model inputs with
    `labels`."""

    def __init__(self, processor, with_answers: bool = True):
        self.processor, self.with_answers = processor, with_answers

    def __call__(self, examples: list[dict]) -> dict:
        if not self.with_answers:
            prompts = [prompt_text(self.processor, e["question"], len(e["images"])) for e in examples]
            images = [e["images"] for e in examples]  # one list per prompt (Fuyu's hold one image each)
            inputs = dict(self.processor(images=images, text=prompts, padding_side="left"))
        else:
            conversations = [
                [user_turn(e["question"], e["images"]), {"role": "assistant", "content": e.get("reply") or e["answer"]}]
                for e in examples
            ]
            inputs = dict(
                self.processor.apply_chat_template(
                    conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                    return_tensors="pt", processor_kwargs={"padding_side": "left"},
                )
            )  # fmt: skip
            answer = torch.as_tensor(inputs.pop("assistant_masks")).bool()
            inputs["labels"] = inputs["input_ids"].masked_fill(~answer, -100)
        for key in ("image_patch_grid", "image_sizes", "image_scale_factors"):
            inputs.pop(key, None)
        return inputs
