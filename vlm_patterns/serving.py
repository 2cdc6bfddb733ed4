"""`vlm-patterns serve`: the four patterns behind the OpenAI chat API, on transformers' own server.

transformers' server (`transformers serve`) brings the FastAPI app, the OpenAI request parsing, the chat templating,
the streamed answers (server-sent events) and the cancellation of a stream whose client went away. What is ours:

- **the models**: ours, loaded once at start (the four shipped checkpoints, or the folders given) and addressed by
  family or folder name. transformers' own manager looks a checkpoint's architecture up in its own namespace, which
  does not hold our classes;
- **generation**: the static decode path (modeling/static_generation.py), one stream at a time per model on its
  own thread, sampling seeded per request;
- **what a public endpoint owes its clients**: errors in OpenAI's shape (400 for a bad body, an image that cannot be
  fetched or read, more images than the family reads, a prompt past the context; 404 for an unknown model), only
  http(s) and `data:` image URLs (never the server's own files), a bounded number of requests in flight (429 beyond
  it), usage counts that include the visual tokens, and images fetched off the event loop.

transformers' continuous batching runs text-only language models: its scheduler never carries pixel values, image
positions or cross-attention keys/values, and its server falls back to one request at a time for every
vision-language model. So each family is served per request here, and the models run side by side.
"""

import asyncio
import base64
import io
import json
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.model_manager import ModelManager
from transformers.cli.serving.server import build_server
from transformers.cli.serving.utils import (
    BaseGenerateManager,
    DirectStreamer,
    GenerationState,
    InferenceThread,
    Modality,
    _GenerationCancelled,
    _StreamError,
)

from .families import FAMILIES, family_of
from .modeling.static_generation import unsupported_options
from .processing.image_sources import ImageInputError, decode_data_uri, describe, fetch_url
from .training.ship import CHECKPOINTS as SHIPPED

logger = logging.getLogger(__name__)

# Routes of transformers' server kept here: the chat API, the model list and the health check. The others (audio,
# the Responses API, loading and unloading models at run time) serve other kinds of models.
KEPT_ROUTES = {"/v1/chat/completions", "/v1/models", "/health"}


class OpenAIError(HTTPException):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(status_code=status, detail=message)
        self.kind, self.param, self.code = kind, param, code


def error_body(status: int, message: str, kind: str | None = None, param=None, code=None) -> dict:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- models ----


@dataclass(frozen=True)
class ServedModel:
    name: str  # as requests and /v1/models name it
    path: Path
    family: str


def served_models(folders: list[str | Path] | None = None) -> dict[str, ServedModel]:
    """The folders given (named by their folder name), or the four shipped checkpoints (named by family)."""
    if not folders:
        return {name: ServedModel(name, SHIPPED / name, name) for name in FAMILIES}
    served: dict[str, ServedModel] = {}
    for folder in map(Path, folders):
        config = folder / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{folder} is not a checkpoint folder (no config.json)")
        family = family_of(json.loads(config.read_text()).get("model_type", "")).name
        name = folder.resolve().name
        if name in served:
            raise ValueError(f"Two folders are named {name!r}; requests could not tell them apart")
        served[name] = ServedModel(name, folder, family)
    return served


class PatternModelManager(ModelManager):
    """transformers' model manager, for our checkpoints: every model is loaded at start and kept (no idle
    unloading), and a request names it by its served name or, where only one model of a family is served, by the
    family."""

    def __init__(self, served: dict[str, ServedModel], device: str = "cpu", dtype: str = "auto"):
        self.served = served
        families = [model.family for model in served.values()]
        self.aliases = {m.family: m.name for m in served.values() if families.count(m.family) == 1}
        super().__init__(device=device, dtype=dtype, model_timeout=-1)
        for name in served:
            self.load_model_and_processor(name)

    def resolve(self, requested) -> str:
        if requested is None and len(self.served) == 1:
            return next(iter(self.served))
        if not isinstance(requested, str):
            raise OpenAIError(400, "`model` is required: one of " + ", ".join(self.served), param="model")
        name = self.aliases.get(requested, requested)
        if name not in self.served:
            raise OpenAIError(404, f"The model {requested!r} does not exist here; this server serves "
                              f"{', '.join(self.served)}", param="model", code="model_not_found")  # fmt: skip
        return name

    def process_model_name(self, model_id: str) -> str:  # transformers' canonical name: ours is the served name
        return self.resolve(model_id)

    def _load_processor(self, name: str, gguf_file=None):
        return AutoProcessor.from_pretrained(self.served[name].path)

    def _load_model(self, name: str, tqdm_class=None, progress_callback=None, gguf_file=None):
        dtype = self.dtype if self.dtype not in (None, "auto") else "auto"
        model = AutoModelForImageTextToText.from_pretrained(self.served[name].path, dtype=dtype)
        device = "cuda" if self.device == "auto" and torch.cuda.is_available() else self.device
        return model.to("cpu" if device == "auto" else device).eval()

    @staticmethod
    def get_model_modality(model, processor=None) -> Modality:
        return Modality.VLM

    def list_models(self, cache_dir=None) -> list[dict]:
        return [
            {"id": name, "object": "model", "created": 0, "owned_by": "vlm-patterns", "family": model.family,
             "pattern": FAMILIES[model.family].pattern,
             "status": {"value": "loaded" if name in self.loaded_models else "unloaded"}}
            for name, model in self.served.items()
        ]  # fmt: skip


# ---- generation ----


class StaticGenerateManager(BaseGenerateManager):
    """One stream at a time per model, on a persistent thread, through the static decode path (transformers' own
    `generate` where a request asks for an option that path does not implement). Sampling draws from a generator
    seeded by the request's `seed`, so a seeded answer does not depend on what other requests ran meanwhile."""

    def __init__(self, seeds: dict[str, int], step_mode: str | None = None):
        self._thread = InferenceThread()
        self._seeds = seeds
        self._step_mode = step_mode

    def _generate(self, model, processor, inputs, gen_config, request_id: str, streamer=None) -> torch.Tensor:
        seed = self._seeds.pop(request_id, None)
        static = not unsupported_options(gen_config)
        kwargs = dict(inputs, generation_config=gen_config, tokenizer=processor.tokenizer, streamer=streamer)
        if static:
            device = model.get_input_embeddings().weight.device
            generator = torch.Generator(device)
            generator.manual_seed(seed) if seed is not None else generator.seed()
            return model.generate(**kwargs, static_decode=True, generator=generator, step_mode=self._step_mode)
        if seed is not None:
            torch.manual_seed(seed)
        return model.generate(**kwargs, static_decode=False)

    def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        streamer = DirectStreamer(processor.tokenizer._tokenizer, loop, queue, response_parser=response_parser)

        def run() -> None:
            try:
                self._generate(model, processor, inputs, gen_config, request_id, streamer)
            except _GenerationCancelled:  # the client went away: the slot is free again
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except Exception as e:  # noqa: BLE001 - the stream reports it; the server keeps serving
                logger.exception("generation failed")
                loop.call_soon_threadsafe(queue.put_nowait, _StreamError(str(e).replace('"', "'")))

        self._thread.submit(run)
        return queue, streamer

    async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
        sequences = await self._thread.async_submit(self._generate, model, processor, inputs, gen_config, request_id)
        prompt_length = inputs["input_ids"].shape[-1]
        generated = sequences[0, prompt_length:]
        return processor.decode(generated, skip_special_tokens=True), prompt_length, generated

    def stop(self) -> None:
        pass  # the inference thread is a daemon


class PatternGenerationState(GenerationState):
    """One `StaticGenerateManager` per model; continuous batching is not offered (see the module's docstring)."""

    def __init__(self, step_mode: str | None = None):
        super().__init__(continuous_batching=False)
        self.seeds: dict[str, int] = {}
        self.step_mode = step_mode

    def get_manager(self, model_id: str, use_cb: bool = False) -> BaseGenerateManager:
        if model_id not in self._generate_managers:
            self._generate_managers[model_id] = StaticGenerateManager(self.seeds, self.step_mode)
        return self._generate_managers[model_id]


# ---- requests ----


class Admission:
    """At most `limit` chat requests in flight (queued or generating); beyond it, 429 at once instead of a hang."""

    def __init__(self, limit: int):
        self.limit, self.in_flight, self._lock = limit, 0, threading.Lock()

    def enter(self) -> None:
        with self._lock:
            if self.in_flight >= self.limit:
                raise OpenAIError(429, f"The server is busy: {self.limit} requests are in flight; retry shortly",
                                  kind="rate_limit_error", code="rate_limit_exceeded")  # fmt: skip
            self.in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


def image_parts(messages: list[dict]) -> list[dict]:
    return [
        part
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") == "image_url"
    ]


def check_body(body: dict) -> None:
    """The shape of a chat request, before anything is loaded or fetched."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "`messages` must be a non-empty list of chat messages", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise OpenAIError(400, f"messages[{i}] must be an object with a role of system, user or assistant",
                              param=f"messages[{i}]")  # fmt: skip
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise OpenAIError(400, f"messages[{i}].content must be a string or a list of parts",
                              param=f"messages[{i}].content")  # fmt: skip
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind == "image_url" and isinstance(image_url(part), str):
                continue
            raise OpenAIError(400, f"messages[{i}].content[{j}] must be a text part or an image_url part with a url",
                              param=f"messages[{i}].content[{j}]")  # fmt: skip
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise OpenAIError(400, f"`{key}` must be a positive integer", param=key)
    for key, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        value = body.get(key)
        if value is not None and (not isinstance(value, (int, float)) or not low <= value <= high):
            raise OpenAIError(400, f"`{key}` must be a number from {low:g} to {high:g}", param=key)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise OpenAIError(400, "`seed` must be an integer", param="seed")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise OpenAIError(400, "`stop` must be a string or a list of strings", param="stop")


def image_url(part: dict):
    url = part.get("image_url")
    return url.get("url") if isinstance(url, dict) else url


async def fetch_images(parts: list[dict]) -> list[bytes]:
    """Each image part's bytes: http(s) URLs are fetched in threads (concurrently, off the event loop); `data:` URIs
    decoded. Any other source (a path, file://) is refused: a server does not read its own files for a client."""

    async def one(part: dict) -> bytes:
        url = image_url(part)
        if url.startswith(("http://", "https://")):
            return await asyncio.to_thread(fetch_url, url)
        if url.startswith("data:"):
            return decode_data_uri(url)
        raise ImageInputError(f"The image {describe(url)} is neither an http(s) URL nor a data:image/...;base64 URI")

    return list(await asyncio.gather(*(one(part) for part in parts)))


class PatternChatHandler(ChatCompletionHandler):
    """transformers' chat-completion handler with the rules of a public endpoint around it (module docstring)."""

    def __init__(
        self, model_manager: PatternModelManager, generation_state: PatternGenerationState, max_in_flight: int
    ):
        super().__init__(model_manager=model_manager, generation_state=generation_state)
        self.admission = Admission(max_in_flight)
        self._requested_tokens: dict[str, int | None] = {}
        self._images: dict[str, list[tuple[int, int]]] = {}

    async def handle_request(self, body: dict, request_id: str):
        check_body(body)
        name = self.model_manager.resolve(body.get("model"))
        body["model"] = name
        model, processor = self.model_manager.load_model_and_processor(name)
        parts = image_parts(body["messages"])
        limit = processor.max_images_per_prompt
        if limit is not None and len(parts) > limit:
            raise OpenAIError(400, f"{name} reads {limit} image{'s' if limit > 1 else ''} per conversation; this "
                              f"one holds {len(parts)}", param="messages", code="too_many_images")  # fmt: skip
        self.admission.enter()
        try:
            images = await fetch_images(parts)
            sizes = []
            for part, data in zip(parts, images, strict=True):
                sizes.append(image_size(data))
                # The processor reads the bytes fetched here (it would fetch the URL again, on the event loop).
                part["image_url"] = {"url": "data:image/png;base64," + base64.b64encode(data).decode("ascii")}
            self._images[request_id] = sizes
            self._requested_tokens[request_id] = body.get("max_completion_tokens") or body.get("max_tokens")
            if body.get("seed") is not None:  # the request's own generator, not the process-wide seed
                self.generation_state.seeds[request_id] = body.pop("seed")
            response = await super().handle_request(body, request_id)
        except BaseException as e:
            self.admission.leave()
            self._forget(request_id)
            if isinstance(e, (ImageInputError, ValueError, TypeError)):  # the request's inputs, refused by name
                raise OpenAIError(400, str(e), code="invalid_image" if isinstance(e, ImageInputError) else None) from e
            raise
        # Generation reads the request's seed when its turn comes; the rest was read before the answer started.
        self._images.pop(request_id, None)
        self._requested_tokens.pop(request_id, None)
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._released_when_done(response.body_iterator)
        else:
            self.admission.leave()
        return response

    def _forget(self, request_id: str) -> None:
        for table in (self._images, self._requested_tokens, self.generation_state.seeds):
            table.pop(request_id, None)

    async def _released_when_done(self, stream: AsyncIterator) -> AsyncIterator:
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()  # cancels the generation if the client went away
            self.admission.leave()

    def _build_generation_config(self, body: dict, model_generation_config, use_cb: bool = False):
        """transformers' reading of the request; a temperature above 0 or a top_p below 1 samples, as OpenAI's API
        does, whatever the checkpoint's own default."""
        config = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
        if (body.get("temperature") or 0) > 0 or (body.get("top_p") is not None and body["top_p"] < 1):
            config.do_sample = True
        return config

    def _fit(self, model, processor, inputs, gen_config, request_id: str) -> int:
        """Refuse a prompt past the context, or an explicit max_tokens past what is left of it (400, as OpenAI
        does); without one, answer up to the end of the context. Returns the visual tokens the prompt's ids
        leave out (Flamingo's latents, read through cross-attention)."""
        prompt_length = inputs["input_ids"].shape[-1]
        context = model.config.text_config.max_position_embeddings
        requested = self._requested_tokens.get(request_id)
        if prompt_length >= context:
            raise OpenAIError(400, f"This model's maximum context length is {context} tokens; the prompt is "
                              f"{prompt_length}", param="messages", code="context_length_exceeded")  # fmt: skip
        if requested is not None and prompt_length + requested > context:
            raise OpenAIError(400, f"This model's maximum context length is {context} tokens; the prompt is "
                              f"{prompt_length} and max_tokens asks for {requested} more", param="max_tokens",
                              code="context_length_exceeded")  # fmt: skip
        gen_config.max_new_tokens = min(gen_config.max_new_tokens, context - prompt_length)
        sizes = self._images.get(request_id, [])
        if model.visual_tokens_in_sequence or not sizes:
            return 0
        return int(sum(processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens))

    def _streaming(self, request_id, model, processor, model_id, inputs, gen_config, gen_manager, tools=None):
        extra = self._fit(model, processor, inputs, gen_config, request_id)
        response = super()._streaming(request_id, model, processor, model_id, inputs, gen_config, gen_manager, tools)
        if extra:
            response.body_iterator = with_visual_tokens(response.body_iterator, extra)
        return response

    async def _non_streaming(self, request_id, model, processor, model_id, inputs, gen_config, gen_manager, tools=None):
        extra = self._fit(model, processor, inputs, gen_config, request_id)
        response = await super()._non_streaming(
            request_id, model, processor, model_id, inputs, gen_config, gen_manager, tools
        )
        if extra:
            answer = json.loads(response.body)
            add_visual_tokens(answer, extra)
            response = JSONResponse(answer)
        return response


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the header alone; unreadable bytes are left for the processor to refuse by name."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            return image.height, image.width
    except Exception:  # noqa: BLE001
        return 0, 0


def add_visual_tokens(answer: dict, extra: int) -> None:
    usage = answer.get("usage")
    if usage:
        usage["prompt_tokens"] += extra
        usage["total_tokens"] += extra


async def with_visual_tokens(stream: AsyncIterator, extra: int) -> AsyncIterator:
    """The final chunk's usage, with the visual tokens the prompt's ids leave out."""
    try:
        async for chunk in stream:
            if '"usage"' in chunk:
                events = []
                for event in chunk.split("\n\n"):
                    if event.startswith("data: {") and '"usage"' in event:
                        data = json.loads(event[len("data: ") :])
                        add_visual_tokens(data, extra)
                        event = "data: " + json.dumps(data)
                    events.append(event)
                chunk = "\n\n".join(events)
            yield chunk
    finally:
        await stream.aclose()


# ---- the app ----


def build_app(served: dict[str, ServedModel], device: str = "cpu", dtype: str = "auto", max_in_flight: int = 64,
              step_mode: str | None = None):  # fmt: skip
    """transformers' FastAPI app, serving our models (loaded here, before the first request). `step_mode`: how
    the static decode path runs a step (static_generation.STEP_MODES; None: its default for the device)."""
    manager = PatternModelManager(served, device=device, dtype=dtype)
    state = PatternGenerationState(step_mode)
    chat = PatternChatHandler(manager, state, max_in_flight)
    app = build_server(manager, chat, completion_handler=None, response_handler=None, transcription_handler=None,
                       systemone_handler=None, generation_state=state)  # fmt: skip
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) in KEPT_ROUTES
                         or not getattr(r, "path", "").startswith("/")]  # fmt: skip
    app.state.admission = chat.admission

    @app.exception_handler(StarletteHTTPException)  # ours, FastAPI's and the router's own (404, 405)
    async def openai_error(_request: Request, exc: StarletteHTTPException):
        status = 400 if exc.status_code == 422 else exc.status_code  # OpenAI answers unknown fields with 400
        body = error_body(status, str(exc.detail), getattr(exc, "kind", None), getattr(exc, "param", None),
                          getattr(exc, "code", None))  # fmt: skip
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def malformed_body(_request: Request, exc: RequestValidationError):
        return JSONResponse(error_body(400, "The body is not a JSON object: " + "; ".join(
            str(error.get("msg")) for error in exc.errors())), status_code=400)  # fmt: skip

    @app.exception_handler(Exception)
    async def server_error(_request: Request, exc: Exception):
        logger.exception("request failed")
        return JSONResponse(error_body(500, f"{type(exc).__name__}: {exc}"), status_code=500)

    @app.get("/v1/queue")
    def queue():
        """Requests in flight (queued or generating) and the bound beyond which requests get 429."""
        return {"in_flight": chat.admission.in_flight, "limit": chat.admission.limit}

    return app


def serve(folders: list[str] | None = None, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          dtype: str = "auto", max_in_flight: int = 64, log_level: str = "warning",
          step_mode: str | None = None) -> None:  # fmt: skip
    import uvicorn

    served = served_models(folders)
    app = build_app(served, device=device, dtype=dtype, max_in_flight=max_in_flight, step_mode=step_mode)
    print(f"serving {', '.join(f'{n} ({m.family})' for n, m in served.items())} on http://{host}:{port}/v1",
          flush=True)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level=log_level)
