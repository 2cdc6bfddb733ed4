"""The text side of a processor call, checked the same way by all four processors: prompts must be strings, a
prompt must give at least one token, and keywords must be options someone reads (a typo is an error, not a
silent default)."""

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
