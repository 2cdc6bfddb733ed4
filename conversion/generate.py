"""`vlm-patterns generate`: load any of our checkpoints through the Auto classes and answer a prompt about
one or more images, streaming tokens as they are produced."""

import sys
import threading
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TextIteratorStreamer


def load(
    model_path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, trust_remote_code: bool = False
):
    """Model (eval mode, on `device`) and processor of a checkpoint folder or Hub id."""
    import modeling  # noqa: F401  (registers our model types with the Auto classes)

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
    return processor(images=images or None, text=text)


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
) -> str:
    """The answer; with `stream` (a text file), each piece is also written there as soon as it is decoded."""
    inputs = build_inputs(processor, images, prompt, raw_prompt).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, **sampling)
    errors = []

    def run():
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except Exception as e:  # re-raised in the caller's thread
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        if stream is not None:
            stream.write(piece)
            stream.flush()
    thread.join()
    if errors:
        raise errors[0]
    return "".join(pieces)


def main(args) -> int:
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else None
    model, processor = load(args.model, args.device, dtype, args.trust_remote_code)
    images = list(args.image or [])
    answer = generate(
        model,
        processor,
        images,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        raw_prompt=args.raw_prompt,
        stream=sys.stdout,
    )
    if not answer.endswith("\n"):
        sys.stdout.write("\n")
    return 0
