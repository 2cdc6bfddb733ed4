"""The text side of a processor call, checked the same way by all four processors: prompts must be strings, a
prompt must give at least one token, and keywords must be options someone reads (a typo is an error, not a
silent default)."""

import numpy as np
from transformers.processing_utils import TextKwargs

# Keywords a tokenizer call understands, as transformers' processors route them (`TextKwargs`).
TOKENIZER_OPTIONS = frozenset(TextKwargs.__annotations__)


def prompt_list(text) -> list[str]:
    """A prompt or a list of prompts -> a list of prompts; anything else is a `TypeError` that says what came."""
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)):
        if not text:
            raise ValueError("text is an empty list: pass at least one prompt")
        wrong = [f"{i}: {type(t).__name__}" for i, t in enumerate(text) if not isinstance(t, str)]
        if not wrong:
            return list(text)
        raise TypeError(f"Every prompt must be a string; got {', '.join(wrong[:3])}")
    raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")


def check_token_rows(token_ids: list[list[int]]) -> None:
    """Refuse a prompt that tokenized to nothing: an empty row pads to a float tensor that generate() cannot use."""
    for i, ids in enumerate(token_ids):
        if not ids:
            raise ValueError(f"Prompt {i} is empty: it gave no tokens. Pass a question or an image placeholder")


def unknown_options(kwargs: dict, known: frozenset | set = TOKENIZER_OPTIONS) -> None:
    """A `TypeError` naming every keyword that nobody reads."""
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise TypeError(f"Unknown processor options: {unknown}")


def split_options(kwargs: dict) -> tuple[dict, dict]:
    """Keywords for the tokenizer (transformers' `TextKwargs`) and the rest (for the image processor)."""
    text = {k: v for k, v in kwargs.items() if k in TOKENIZER_OPTIONS}
    return text, {k: v for k, v in kwargs.items() if k not in TOKENIZER_OPTIONS}


class TokenRows:
    """Token ids of a batch of prompts and, on request, each token's character span in its prompt.

    The spans (`offset_mapping`) are what transformers' `apply_chat_template(return_assistant_tokens_mask=True)`
    reads to mark the answer tokens. They travel with the ids through placeholder expansion (every copy of a
    placeholder keeps the placeholder's span) and padding (padding has the empty span (0, 0)), so they stay aligned.
    """

    def __init__(self, ids: list[list[int]], offsets: list[list[tuple[int, int]]] | None = None):
        self.ids, self.offsets = ids, offsets

    @classmethod
    def encode(cls, tokenizer, texts: list[str], return_offsets_mapping: bool = False, **options) -> "TokenRows":
        options.pop("return_text_replacement_offsets", None)  # placeholders expand as ids: no text is replaced
        options.pop("return_mm_token_type_ids", None)  # the processor adds these itself where it can
        options.pop("return_tensors", None)
        encoded = tokenizer(texts, return_offsets_mapping=return_offsets_mapping, **options)
        check_token_rows(encoded["input_ids"])
        offsets = (
            [[tuple(span) for span in row] for row in encoded["offset_mapping"]] if return_offsets_mapping else None
        )
        return cls([list(row) for row in encoded["input_ids"]], offsets)

    def expand(self, row: int, placeholder_id: int, counts: int | list[int]) -> None:
        """Repeat the placeholders of one row: each `counts` times, or the k-th `counts[k]` times."""
        ids = np.asarray(self.ids[row], dtype=np.int64)
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[ids == placeholder_id] = counts
        self.ids[row] = np.repeat(ids, repeats).tolist()
        if self.offsets is not None:
            spans = np.asarray(self.offsets[row], dtype=np.int64).reshape(-1, 2)
            self.offsets[row] = [tuple(span) for span in np.repeat(spans, repeats, axis=0).tolist()]

    def pad(self, tokenizer, padding: bool | str = True, padding_side: str | None = None, pad_token_id=None) -> dict:
        """`input_ids` and `attention_mask` padded by the tokenizer (and `offset_mapping` alike when kept)."""
        side = {"padding_side": padding_side} if padding_side is not None else {}
        saved = tokenizer.pad_token_id
        if pad_token_id is not None:
            tokenizer.pad_token_id = pad_token_id
        try:
            data = dict(tokenizer.pad({"input_ids": self.ids}, padding=padding, **side))
        finally:
            tokenizer.pad_token_id = saved
        if self.offsets is not None:
            length = max(len(row) for row in data["input_ids"])
            left = (padding_side or tokenizer.padding_side) == "left"
            empty = [(0, 0)]
            data["offset_mapping"] = [
                empty * (length - len(row)) + row if left else row + empty * (length - len(row)) for row in self.offsets
            ]
        return data
