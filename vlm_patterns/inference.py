"""Inference: load any of our checkpoints through the Auto classes and answer a prompt about images, streaming.

`stream_answer` is the one streaming loop: `vlm-patterns generate` and the Space both read it. It runs
`generate` in a thread and yields the answer as it grows, with the measurements the Space shows (time to the
first token from a given start, tokens so far). It uses the static decode path by default (the same greedy tokens
as transformers' loop, with less overhead per step; modeling/static_generation.py), unless the checkpoint's
generation config asks for something that path does not implement; `static_decode=False` runs transformers' own
`generate`.
"""

import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TextIteratorStreamer

from .modeling.static_generation import unsupported_options

# What the processors return for post-processing (Fuyu's boxes) and the models do not read.
NOT_MODEL_INPUTS = ("image_patch_grid", "image_sizes", "image_scale_factors")


def load(
    model_path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, trust_remote_code: bool = False
):
    """Model (eval mode, on `device`) and processor of a checkpoint folder or Hub id."""
    model = AutoModelForImageTextToText.from_pretrained(
        model_path, dtype=dtype or "auto", trust_remote_code=trust_remote_code
    ).to(device)
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    return model.eval(), processor


def build_inputs(processor, images: list, prompt: str, raw_prompt: bool = False):
    """Chat-formatted (or raw) prompt with one placeholder per image, processed to model inputs."""
    if raw_prompt:
        text = prompt
    else:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(images=[images] if images else None, text=text)


@dataclass
class Progress:
    """The answer so far and its measurements; times in seconds from the `started` given to `stream_answer`."""

    text: str = ""
    new_tokens: int = 0
    time_to_first_token: float | None = None
    seconds: float = 0.0


class CountingStreamer(TextIteratorStreamer):
    """A text streamer that also counts generated tokens and notes when the first one came."""

    def __init__(self, tokenizer, started: float, **kwargs):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)
        self.started, self.generated, self.first_token_at = started, 0, None

    def put(self, value):
        if not self.next_tokens_are_prompt:
            self.generated += value.numel()
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter() - self.started
        super().put(value)


def stream_answer(
    model,
    processor,
    inputs: dict,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    started: float | None = None,
    timeout: float | None = 300,
    static_decode: bool = True,
    step_mode: str | None = None,
) -> Iterator[Progress]:
    """Generate from processed `inputs`, yielding the growing answer as pieces are decoded; the last `Progress`
    is complete. Greedy at temperature 0, nucleus sampling otherwise. An error in generation is raised here, in the
    caller's thread, after the pieces that came before it. `step_mode` chooses how the static path runs a step
    ("compiled": torch.compile, the fastest on CPU after a compilation per shape)."""
    started = started if started is not None else time.perf_counter()
    inputs = {k: v.to(model.device) for k, v in dict(inputs).items() if k not in NOT_MODEL_INPUTS}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    streamer = CountingStreamer(processor.tokenizer, started, timeout=timeout)
    errors = []

    def run():
        try:
            with torch.inference_mode():
                static = static_decode and not unsupported_options(model.generation_config)
                options = dict(static_decode=True, tokenizer=processor.tokenizer, step_mode=step_mode) if static else {}
                model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, **sampling, **options)
        except Exception as e:  # re-raised in the caller's thread; ending the streamer stops its loop
            errors.append(e)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    progress = Progress()
    for piece in streamer:
        progress.text += piece
        progress.new_tokens, progress.time_to_first_token = streamer.generated, streamer.first_token_at
        progress.seconds = time.perf_counter() - started
        yield progress
    worker.join()
    if errors:
        raise errors[0]
    progress.new_tokens, progress.time_to_first_token = streamer.generated, streamer.first_token_at
    progress.seconds = time.perf_counter() - started
    yield progress


def generate(
    model,
    processor,
    images: list,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    raw_prompt: bool = False,
    stream=None,
    static_decode: bool = True,
    step_mode: str | None = None,
) -> str:
    """The answer; with `stream` (a text file), each piece is also written there as soon as it is decoded."""
    inputs = build_inputs(processor, images, prompt, raw_prompt)
    written = ""
    for progress in stream_answer(
        model,
        processor,
        inputs,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        static_decode=static_decode,
        step_mode=step_mode,
    ):
        if stream is not None and len(progress.text) > len(written):
            stream.write(progress.text[len(written) :])
            stream.flush()
        written = progress.text
    return written


def main(args) -> int:
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else None
    model, processor = load(args.model, args.device, dtype, args.trust_remote_code)
    answer = generate(
        model,
        processor,
        list(args.image or []),
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        raw_prompt=args.raw_prompt,
        stream=sys.stdout,
        static_decode=args.decode != "transformers",
        step_mode="compiled" if args.decode == "compiled" else None,
    )
    if not answer.endswith("\n"):
        sys.stdout.write("\n")
    return 0
