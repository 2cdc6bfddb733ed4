"""Examples -> model inputs: each family's own chat format and processor, then the answer appended as targets.

Prompts are left-padded by the processor; the answer tokens and the family's end token follow each prompt, and
only they carry labels (the question, the image placeholders and the padding are -100).
"""

import torch


def prompt_text(processor, question: str, num_images: int) -> str:
    """The family's chat-formatted prompt for a question about `num_images` images, ready for the answer."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def images_argument(family: str, rows: list[list]):
    """Fuyu takes one image per prompt; the others one list of images per prompt."""
    return [row[0] for row in rows] if family == "fuyu" else rows


class VQACollator:
    """Batches of examples (dicts with images, question, answer) -> model inputs with `labels`."""

    def __init__(self, processor, family: str, with_answers: bool = True):
        self.processor, self.family, self.with_answers = processor, family, with_answers
        tokenizer = processor.tokenizer
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    def answer_ids(self, answer: str) -> list[int]:
        # A leading space keeps word-level tokenization identical to the answer's place in a full sentence.
        return self.processor.tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [self.eos_id]

    def __call__(self, examples: list[dict]) -> dict:
        prompts = [prompt_text(self.processor, e["question"], len(e["images"])) for e in examples]
        inputs = dict(
            self.processor(
                images=images_argument(self.family, [e["images"] for e in examples]), text=prompts, padding_side="left"
            )
        )
        inputs.pop("image_patch_grid", None), inputs.pop("image_sizes", None), inputs.pop("image_scale_factors", None)
        if not self.with_answers:
            return inputs
        answers = [self.answer_ids(e["answer"]) for e in examples]
        longest = max(map(len, answers))
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        tail = torch.full((len(examples), longest), self.pad_id, dtype=ids.dtype)
        tail_mask = torch.zeros(len(examples), longest, dtype=mask.dtype)
        for row, answer in enumerate(answers):
            tail[row, : len(answer)] = torch.tensor(answer)
            tail_mask[row, : len(answer)] = 1
        labels = torch.cat([torch.full_like(ids, -100), tail.masked_fill(tail_mask == 0, -100)], dim=1)
        inputs.update(
            input_ids=torch.cat([ids, tail], 1), attention_mask=torch.cat([mask, tail_mask], 1), labels=labels
        )
        return inputs
