"""vlm-patterns Space: one image and one question, four architecture patterns answering side by side.

python spaces/app.py                  # the four small checkpoints trained on the synthetic task (offline)
python spaces/app.py --models hub     # LLaVA-1.5-7B, Qwen2-VL-2B, Fuyu-8B, IDEFICS-9B (converted on first use)
python spaces/app.py --smoke-test     # one example through the four columns without a browser, then exit

Read top to bottom: how each pattern sees an image (the pictures), the model sets, one streamed answer, four
answers at once, the page.
"""

import argparse
import dataclasses
import gc
import hashlib
import importlib
import io
import json
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
import PIL.Image
import torch

from vlm_patterns.families import FAMILIES as REGISTRY
from vlm_patterns.inference import stream_answer
from vlm_patterns.processing import ImageInputError, load_image
from vlm_patterns.spaces.pictures import pattern_view

HERE = Path(__file__).resolve().parent

try:  # ZeroGPU Spaces lend a GPU per call; elsewhere the decorator is a no-op
    import spaces  # Hugging Face's package (a regular package wins over a `spaces/` folder on the path)

    gpu = spaces.GPU
except (ImportError, AttributeError):

    def gpu(function):
        return function


FAMILIES = tuple(REGISTRY)  # the columns, left to right
# training/checkpoints in a clone; vlm_patterns/training/checkpoints when installed.
CHECKPOINTS = Path(importlib.import_module("vlm_patterns.training").__path__[0]) / "checkpoints"
EMBEDDED = {family: CHECKPOINTS / family for family in FAMILIES}
MAX_IMAGES_PER_PROMPT = 4  # the page's bound for families that read any number
# Bundled examples: held-out images of the synthetic task with their questions (examples/examples.json).
EXAMPLES = json.loads((HERE / "examples" / "examples.json").read_text()) if (HERE / "examples").is_dir() else []
MAX_PROMPT_CHARACTERS = 1000
# What the embedded models were trained to answer, with the words to ask it in.
TRAINED_FOR = (
    "The *embedded* models were trained from scratch on synthetic pictures of circles, squares and triangles in four "
    "colors (red, green, blue, yellow), filled or drawn as outlines, small or large, on white, tinted or textured "
    "canvases, and on six kinds of question only, asked in these words: *What color is the square?* · *What shape "
    "is blue?* · *How many shapes are there?* · *Is the green triangle left or right of the yellow circle?* · *What "
    "word is written?* · *Which image has more shapes, the first or the second?* They know no other words (a column "
    "says when a question uses some) and answer anything else with a guess. To a left/right question they first name "
    "the quarter of the width each shape lies in (one to four, from the left), then the answer. Under each column: its "
    "measured accuracy per kind of question on 3000 held-out ones. The embedded Qwen2-VL and Fuyu add learned "
    "positions to their patches, as Qwen3-VL and Mono-InternVL do: with only their own designs' positions (rotary "
    "phases, and Fuyu's newline tokens) they told left from right at chance (the README says why)."
)
KIND_NAMES = {"color": "color", "shape": "shape", "count": "count", "position": "left/right", "read": "word",
              "compare": "two images"}  # fmt: skip


def measured_accuracy(family: str) -> str:
    """One line of the family's held-out accuracy per question kind (from its checkpoint's evaluation.json)."""
    path = EMBEDDED[family] / "evaluation.json"
    if not path.exists():
        return ""
    result = json.loads(path.read_text())
    kinds = [f"{KIND_NAMES.get(k, k)} {100 * v:.0f}%" for k, v in result["accuracy_by_kind"].items()]
    return f"<small>held-out accuracy: {' · '.join(kinds)} (all {100 * result['accuracy']:.0f}%)</small>"


def unknown_words(text: str, tokenizer) -> list[str]:
    """Words of `text` a word-level tokenizer (the embedded models') has never seen; [] for subword tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.unk_token_id is None or backend.model.__class__.__name__ != "WordLevel":
        return []
    words = [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    return list(dict.fromkeys(w for w in words if tokenizer.convert_tokens_to_ids(w) == tokenizer.unk_token_id))


# Uploads larger than this are refused from their header, before decoding (a 9000 x 9000 PNG of 258 KB would
# decode to 243 MB, and each family's processor and picture would work on it).
MAX_UPLOAD_PIXELS = 40_000_000
_decoded: OrderedDict[tuple, np.ndarray] = OrderedDict()  # recent uploads, decoded: later turns reuse them
_decoded_lock = threading.Lock()
DECODED_KEPT = 8


def decode_upload(path: str) -> np.ndarray:
    """An uploaded file -> (H, W, 3) uint8, upright, decoded once and reused by the four columns and by later
    turns of the chat; a clear `ImageInputError` (or `FileNotFoundError`) naming the problem otherwise."""
    try:
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    except OSError:
        key = None
    with _decoded_lock:
        if key in _decoded:
            _decoded.move_to_end(key)
            return _decoded[key]
    rgb = load_image(path, max_pixels=MAX_UPLOAD_PIXELS)
    rgb.setflags(write=False)  # shared between threads and turns: nobody may write to it
    if key is not None:
        with _decoded_lock:
            _decoded[key] = rgb
            while len(_decoded) > DECODED_KEPT:
                _decoded.popitem(last=False)
    return rgb


def upload_error(path: str, error: Exception) -> str:
    """What a visitor reads about a bad upload: the loader's sentence, naming the file without the server's folders."""
    return str(error).replace(repr(path), repr(os.path.basename(path))).replace(path, os.path.basename(path))


def saved_view(picture: PIL.Image.Image | None) -> str | None:
    """A picture written once into Gradio's upload folder under its content hash, and its path. Gradio would
    re-encode and rewrite the same file on every streamed update, while browsers are still reading it."""
    if picture is None:
        return None
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    data = buffer.getvalue()
    folder = Path(gr.utils.get_upload_folder()) / "vlm-patterns-views"
    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{threading.get_ident()}.partial")
        partial.write_bytes(data)
        os.replace(partial, path)  # readers see the whole file or none
    return str(path)


# --------------------------------------------------------------------------------------------------------------
# Model sets: `embedded`, the four small checkpoints trained on the synthetic task (training/checkpoints), offline;
# `hub`, the public checkpoints converted by our converters on first use and cached, loaded one at a time
# (`max_resident`) so that four large models are never in memory together on a small GPU.


class ModelSet:
    """Loads checkpoints on demand and keeps at most `max_resident` in memory (least recently used goes)."""

    def __init__(self, name: str = "embedded", device: str | None = None, max_resident: int | None = None,
                 cache_dir: str | Path | None = None):  # fmt: skip
        if name not in ("embedded", "hub"):
            raise ValueError(f"Unknown model set {name!r}: use 'embedded' or 'hub'")
        self.name = name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.max_resident = max_resident or (4 if name == "embedded" else 1)
        self.cache_dir = Path(
            cache_dir or os.environ.get("VLM_PATTERNS_CACHE", Path.home() / ".cache" / "vlm-patterns")
        )
        self.loaded: OrderedDict[str, tuple] = OrderedDict()
        self.lock = threading.Lock()

    def path(self, family: str) -> Path:
        if self.name == "embedded":
            return EMBEDDED[family]
        layout, repo = REGISTRY[family].showcase
        target = self.cache_dir / repo.replace("/", "--")
        if not (target / "config.json").exists():
            dtype = torch.bfloat16 if self.device == "cuda" else None
            REGISTRY[family].layout(layout).convert(repo, target, dtype=dtype)
        return target

    def get(self, family: str):
        """(model, processor) of a family, loading it (and evicting the least recently used) if needed."""
        with self.lock:
            if family in self.loaded:
                self.loaded.move_to_end(family)
                return self.loaded[family]
            while len(self.loaded) >= self.max_resident:
                self.loaded.popitem(last=False)
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            from transformers import AutoModelForImageTextToText, AutoProcessor

            path = self.path(family)
            dtype = "auto" if self.name == "hub" else torch.float32
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(self.device).eval()
            self.loaded[family] = (model, AutoProcessor.from_pretrained(path))
            return self.loaded[family]


# --------------------------------------------------------------------------------------------------------------
# One answer, streamed: the family's chat format over the conversation so far, generate() in a thread, tokens
# counted and timed as they arrive. Errors end the stream with a message; they never raise.


@dataclass
class Settings:
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    qwen_max_visual_tokens: int = 32  # Qwen2-VL's per-image budget (merged tokens)


MIN_TOKENS_FOR_RATE = 8


@dataclass
class Answer:
    """One column's state while it streams: the text so far and the measurements."""

    text: str = ""
    error: str | None = None
    done: bool = False
    visual_tokens: list[int] = field(default_factory=list)
    time_to_first_token: float | None = None
    new_tokens: int = 0
    seconds: float = 0.0

    images_left_out: int = 0  # images of the chat beyond what the family reads (Fuyu reads one)
    unknown_words: list[str] = field(default_factory=list)  # words of the question the model never saw

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed after the first token; None over fewer than MIN_TOKENS_FOR_RATE tokens, where a rate
        would be mostly timer noise (two-token answers read anywhere from 9 to 435 tok/s)."""
        decode_time = self.seconds - (self.time_to_first_token or 0)
        if self.new_tokens < MIN_TOKENS_FOR_RATE or decode_time <= 0:
            return None
        return (self.new_tokens - 1) / decode_time

    def stats(self) -> str:
        if self.error:
            return "failed"
        parts = [f"visual tokens: {' + '.join(map(str, self.visual_tokens)) or 0}"]
        if self.time_to_first_token is not None:  # from the submit: decoding the upload and the prompt included
            parts.append(f"first token {1e3 * self.time_to_first_token:.0f} ms")
        if self.tokens_per_second:
            parts.append(f"{self.tokens_per_second:.1f} tok/s")
        parts.append(f"{self.new_tokens} tokens")
        if self.images_left_out:
            parts.append(f"read the first image only ({self.images_left_out} more left out)")
        if self.unknown_words:
            parts.append(f"never saw the words {', '.join(repr(w) for w in self.unknown_words)}: a guess")
        return " · ".join(parts)


def images_per_prompt(family: str) -> int:
    """The most images a prompt of this family holds here (Fuyu: 1; the others: the page's own bound)."""
    return REGISTRY[family].images_per_prompt or MAX_IMAGES_PER_PROMPT


def conversation_messages(history: list[dict], family: str) -> list[dict]:
    """Our chat history (user turns with `images` and `text`, assistant turns with `text`) as chat-template
    messages; images beyond what the family takes are dropped (Fuyu reads one)."""
    messages, seen = [], 0
    for turn in answered_turns(history):
        if turn["role"] == "assistant":
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["text"]}]})
            continue
        room = images_per_prompt(family) - seen
        images = turn["images"][:room]
        seen += len(images)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": turn["text"]}]
        messages.append({"role": "user", "content": content})
    return messages


def answered_turns(history: list[dict]) -> list[dict]:
    """The turns a model reads: a question whose answer failed (a bad upload, an error) is left out with it."""
    turns = []
    for turn in history:
        if turn["role"] == "assistant" and turn.get("failed"):
            turns = turns[:-1] if turns and turns[-1]["role"] == "user" else turns
        else:
            turns.append(turn)
    return turns


def conversation_images(history: list[dict], family: str) -> list[np.ndarray]:
    """The images the family reads, decoded (each upload once, reused across columns and turns)."""
    paths = [image for turn in answered_turns(history) if turn["role"] == "user" for image in turn["images"]]
    return [decode_upload(path) if isinstance(path, str) else path for path in paths[: images_per_prompt(family)]]


def build_inputs(model, processor, family: str, history: list[dict], settings: Settings) -> tuple[dict, list[int]]:
    """Model inputs for the conversation so far, and how many visual tokens each image became (as the processor
    counts them: the same count `vlm-patterns evaluate` reports)."""
    messages = conversation_messages(history, family)
    images = conversation_images(history, family)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    options = {}
    if images and hasattr(processor.image_processor, "max_pixels"):  # native resolution: the page's pixel budget
        options["max_pixels"] = settings.qwen_max_visual_tokens * processor.image_processor.factor**2
    inputs = dict(processor(images=[images] if images else None, text=prompt, **options))
    if not images:
        return inputs, []
    sizes = [image.shape[:2] if isinstance(image, np.ndarray) else (image.height, image.width) for image in images]
    return inputs, list(processor._get_num_multimodal_tokens(image_sizes=sizes, **options).num_image_tokens)


def stream(model, processor, family: str, history: list[dict], settings: Settings,
           started: float | None = None) -> Iterator[Answer]:  # fmt: skip
    """Generate an answer to the conversation, yielding the growing `Answer` as tokens arrive; times count from
    `started` (the submit; default: now). Errors (a bad image, a prompt too long for the model, ...) end the
    stream with `error` set; they never raise."""
    answer = Answer()
    started = started if started is not None else time.perf_counter()
    try:
        all_images = sum(len(t["images"]) for t in answered_turns(history) if t["role"] == "user")
        answer.images_left_out = max(0, all_images - images_per_prompt(family))
        question = next((t["text"] for t in reversed(history) if t["role"] == "user"), "")
        answer.unknown_words = unknown_words(question, processor.tokenizer)
        inputs, answer.visual_tokens = build_inputs(model, processor, family, history, settings)
        limit = model.config.text_config.max_position_embeddings
        if inputs["input_ids"].shape[1] + settings.max_new_tokens > limit:
            raise ValueError(
                f"The conversation is {inputs['input_ids'].shape[1]} tokens; with {settings.max_new_tokens} new ones "
                f"it would pass this model's {limit}-token context. Start a new chat or shorten the prompt."
            )
        for progress in stream_answer(model, processor, inputs, max_new_tokens=settings.max_new_tokens,
                                      temperature=settings.temperature, top_p=settings.top_p, started=started):  # fmt: skip
            answer.text, answer.new_tokens = progress.text, progress.new_tokens
            answer.time_to_first_token, answer.seconds = progress.time_to_first_token, progress.seconds
            yield answer
    except Exception as e:
        answer.error = f"{type(e).__name__}: {e}"
    answer.seconds = time.perf_counter() - started
    answer.done = True
    yield answer


# --------------------------------------------------------------------------------------------------------------
# Four answers at once: one thread per column (one at a time for the hub set), events merged as they come.


def chat_display(history: list[dict], answer: Answer | None = None) -> list[dict]:
    """Gradio messages for one column: the images and text of each user turn, then the answers."""
    messages = []
    for turn in history:
        if turn["role"] == "user":
            messages += [{"role": "user", "content": {"path": path}} for path in turn["paths"]]
            messages.append({"role": "user", "content": turn["text"]})
        else:
            messages.append({"role": "assistant", "content": turn["text"]})
    if answer is not None:
        messages.append({"role": "assistant", "content": f"⚠️ {answer.error}" if answer.error else answer.text or "…"})
    return messages


def prompt_problem(text: str) -> str | None:
    """Why a question cannot be sent (empty, too long), or None."""
    text = (text or "").strip()
    if not text:
        return "Type a question (and add an image) first."
    if len(text) > MAX_PROMPT_CHARACTERS:
        return f"The prompt is {len(text)} characters; keep it under {MAX_PROMPT_CHARACTERS}."
    return None


def picture_of(family: str, models: ModelSet, image, qwen_budget: int):
    """The family's picture of how it sees `image` (None when its model cannot be loaded or the image read)."""
    try:
        model, processor = models.get(family)
    except Exception:
        return None  # the column's answer says what went wrong
    return pattern_view(family, model, processor, image, qwen_budget)


def answer_all(message: dict, histories: dict, models: ModelSet, settings: Settings):
    """Send one user turn to the four families at once; yields (displays, stats, views, histories) as the four
    answers stream in. A column that fails shows its error; the others carry on."""
    submitted = time.perf_counter()
    text = (message or {}).get("text", "").strip()
    paths = list((message or {}).get("files", []))
    notice = prompt_problem(text)
    if notice:
        yield ({f: chat_display(histories[f]) for f in FAMILIES}, dict.fromkeys(FAMILIES, notice),
               None, histories)  # fmt: skip
        return
    decoded = []
    for path in paths:
        try:
            decoded.append(decode_upload(path))
        except (ImageInputError, OSError) as e:  # every column says what is wrong; the bad file is not kept
            turn = {"role": "user", "text": text, "images": [], "paths": []}
            reply = {"role": "assistant", "text": f"⚠️ {type(e).__name__}: {upload_error(path, e)}", "failed": True}
            histories = {f: histories[f] + [turn, reply] for f in FAMILIES}
            yield ({f: chat_display(histories[f]) for f in FAMILIES}, dict.fromkeys(FAMILIES, "failed"),
                   None, histories)  # fmt: skip
            return
    turn = {"role": "user", "text": text, "images": paths, "paths": paths}
    histories = {f: histories[f] + [turn] for f in FAMILIES}
    views = None  # a text-only turn keeps the pictures of the last image
    if decoded:
        views = {f: saved_view(picture_of(f, models, decoded[0], settings.qwen_max_visual_tokens)) for f in FAMILIES}
    answers = {f: Answer() for f in FAMILIES}
    events: queue.Queue = queue.Queue()

    def run(family: str):
        try:
            model, processor = models.get(family)
            for answer in stream(model, processor, family, histories[family], settings, started=submitted):
                events.put((family, dataclasses.replace(answer)))  # a snapshot: the stream keeps mutating its own
        except Exception as e:  # loading failed: this column only
            events.put((family, Answer(error=f"{type(e).__name__}: {e}", done=True)))

    concurrent = models.max_resident >= len(FAMILIES)
    pending = list(FAMILIES)
    workers = []

    def start_next():
        family = pending.pop(0)
        worker = threading.Thread(target=run, args=(family,), daemon=True)
        worker.start()
        workers.append(worker)

    for _ in range(len(pending) if concurrent else 1):
        start_next()
    finished = 0
    while finished < len(FAMILIES):
        arrived = [events.get()]
        while not events.empty():  # under load, several tokens arrive between two updates: send them as one
            arrived.append(events.get_nowait())
        for family, answer in arrived:
            answers[family] = answer
            if answer.done:
                finished += 1
                if pending:
                    start_next()
        yield (
            {f: chat_display(histories[f], answers[f]) for f in FAMILIES},
            {f: answers[f].stats() for f in FAMILIES},
            views,
            histories,
        )
    for worker in workers:
        worker.join()
    for f in FAMILIES:
        reply = {"role": "assistant", "text": answers[f].text}
        if answers[f].error:
            reply = {"role": "assistant", "text": f"⚠️ {answers[f].error}", "failed": True}
        histories[f] = histories[f] + [reply]
    yield ({f: chat_display(histories[f]) for f in FAMILIES}, {f: answers[f].stats() for f in FAMILIES},
           views, histories)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# The page.


def hand_over_undecoded(image_input: gr.Image) -> gr.Image:
    """Make an image input hand over the uploaded file's path without decoding it. Gradio's own preprocessing
    opens every upload with PIL, so an empty, corrupt or oversized file failed there, before this app could say
    what is wrong, and every column showed a bare "Error". Decoding, with its checks, is `decode_upload`'s job.
    (The instance's method is replaced rather than subclassing: Gradio treats a subclass as a custom component
    with a front end of its own.)"""
    standard = image_input.preprocess

    def preprocess(payload):
        if payload is not None and (payload.url or "").startswith("data:"):
            return standard(payload)  # webcam and clipboard images arrive as data URIs
        return None if payload is None else payload.path

    image_input.preprocess = preprocess
    return image_input


MODEL_SETS = ("embedded", "hub")


def build_app(default_set: str = "embedded", device: str | None = None, model_sets_allowed=None) -> gr.Blocks:
    """The page. `model_sets_allowed`: the model sets a visitor may pick (default: only `default_set`); the hub
    set downloads and converts tens of GB on first use, so offering it is the host's decision."""
    allowed = tuple(model_sets_allowed or (default_set,))
    if default_set not in allowed or any(name not in MODEL_SETS for name in allowed):
        raise ValueError(f"Model sets {allowed} must be among {MODEL_SETS} and include the default {default_set!r}")
    model_sets: dict[str, ModelSet] = {}  # created on first use: the hub set converts and downloads

    def models_for(name: str) -> ModelSet:
        if name not in allowed:  # the API takes any string; only the host's choices are served
            raise gr.Error(f"The model set {name!r} is not offered here (offered: {', '.join(allowed)})")
        if name not in model_sets:
            model_sets[name] = ModelSet(name, device=device)
        return model_sets[name]

    with gr.Blocks(title="vlm-patterns: four ways to give a language model eyes") as demo:
        gr.Markdown(
            "# vlm-patterns\nOne image, one question, four architecture patterns. **LLaVA** projects a fixed-size "
            "ViT's patches into the LM; **Qwen2-VL** does so at the image's own resolution; **Fuyu** feeds raw "
            "patches straight in (no vision encoder); **Flamingo** keeps images out of the text and reads a fixed "
            "set of latents through gated cross-attention. The *embedded* models are small ones trained on "
            "synthetic shapes, colours, counts, positions and words: ask about those; *hub* loads the public models."
        )
        if default_set == "embedded":
            gr.Markdown(TRAINED_FOR, elem_id="trained-for")
        histories = gr.State({f: [] for f in FAMILIES})
        chats, stats, views = {}, {}, {}
        with gr.Row(equal_height=False):
            for family in FAMILIES:
                with gr.Column(min_width=240):
                    gr.Markdown(f"### {REGISTRY[family].title} · {REGISTRY[family].pattern}")
                    views[family] = gr.Image(label="how it sees the image", show_label=False, type="filepath",
                                             height=200, interactive=False, elem_id=f"view-{family}")  # fmt: skip
                    gr.Markdown(f"<small>{REGISTRY[family].picture_legend}</small>", elem_id=f"legend-{family}")
                    chats[family] = gr.Chatbot(label=family, height=300, elem_id=f"chat-{family}")
                    stats[family] = gr.Markdown("", elem_id=f"stats-{family}")
                    if default_set == "embedded":
                        gr.Markdown(measured_accuracy(family), elem_id=f"accuracy-{family}")
        with gr.Row(equal_height=False):
            camera = hand_over_undecoded(
                gr.Image(label="image: upload, webcam or paste", sources=["upload", "webcam", "clipboard"],
                         type="filepath", height=160, scale=1, elem_id="image")
            )  # fmt: skip
            prompt = gr.MultimodalTextbox(
                placeholder="Ask about the image (more images can be attached here: Qwen2-VL and Flamingo read them all)",
                file_types=["image"], file_count="multiple", sources=["upload"], elem_id="prompt", scale=3, label="question",
            )  # fmt: skip
        with gr.Row():
            with gr.Accordion("Models and generation settings", open=False):
                model_set = gr.Dropdown(
                    list(allowed), value=default_set, label="model set", interactive=len(allowed) > 1
                )
                max_new_tokens = gr.Slider(1, 256, value=16, step=1, label="max new tokens")
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p")
                budget = gr.Slider(4, 1280, value=32, step=4, label="Qwen2-VL visual tokens per image (pixel budget)")
            clear = gr.Button("New chat")
        if EXAMPLES:
            gr.Examples(
                examples=[{"text": e["question"], "files": [str(HERE / "examples" / f) for f in e["files"]]}
                          for e in EXAMPLES],
                inputs=prompt, label="Examples (held-out images of the synthetic task)",
                example_labels=[f"{e['question']} (expected: {e['answer']})" for e in EXAMPLES],
            )  # fmt: skip

        outputs = [*chats.values(), *stats.values(), *views.values(), histories]

        @gpu
        def respond(message, image, set_name, state, max_new, temp, nucleus, qwen_budget):
            message = dict(message or {"text": "", "files": []})
            message["files"] = ([image] if image else []) + list(message.get("files", []))
            problem = prompt_problem(message.get("text", ""))
            if problem:  # one message; the typed text and the image stay (the clearing step runs on success only)
                raise gr.Error(problem)
            settings = Settings(int(max_new), float(temp), float(nucleus), int(qwen_budget))
            # Each update carries only what changed: a column whose answer did not move, the pictures after the
            # first update, and the chat state before the last are skipped. Gradio post-processes every value it
            # is sent, so resending four whole chats per token made a turn's cost grow with the chat.
            sent: dict = {}
            updates = answer_all(message, state, models_for(set_name), settings)
            previous = next(updates, None)
            while previous is not None:
                current = next(updates, None)  # one ahead: the last update is the one that saves the chat
                displays, texts, pictures, histories_now = previous
                values = []
                for kind, per_family in (("chat", displays), ("stats", texts), ("picture", pictures or {})):
                    for f in FAMILIES:
                        value = per_family.get(f, gr.skip())
                        unchanged = (kind, f) in sent and sent[(kind, f)] == value
                        repeated = unchanged or (kind == "picture" and (kind, f) in sent)
                        final = current is None  # the last update is whole, for API clients
                        values.append(value if final or not repeated else gr.skip())
                        sent[(kind, f)] = value
                yield (*values, histories_now if current is None else gr.skip())
                previous = current

        inputs = [prompt, camera, model_set, histories, max_new_tokens, temperature, top_p, budget]
        prompt.submit(respond, inputs, outputs, api_name="respond").success(
            lambda: (None, None), None, [prompt, camera], api_name=False
        )
        clear.click(
            lambda: (*([[]] * 4), *([""] * 4), *([None] * 4), {f: [] for f in FAMILIES}, None, None),
            None, [*outputs, prompt, camera], api_name=False,
        )  # fmt: skip
    return demo


def smoke_test(models: ModelSet) -> int:
    """One example through the four columns, no browser: prints each answer and its measurements."""
    example = EXAMPLES[0]
    message = {"text": example["question"], "files": [str(HERE / "examples" / f) for f in example["files"]]}
    *_, last = answer_all(message, {f: [] for f in FAMILIES}, models, Settings(max_new_tokens=8))
    _, stats, _, histories = last
    failed = 0
    for family in FAMILIES:
        reply = histories[family][-1]["text"]
        failed += reply.startswith("⚠️")
        title = f"{REGISTRY[family].title} · {REGISTRY[family].pattern}"
        print(f"{title:40s} {reply!r:24s} {stats[family]}")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", choices=["embedded", "hub"], default=os.environ.get("VLM_PATTERNS_MODELS", "embedded"),
        help="embedded: the checkpoints trained in this repository, offline; hub: the public checkpoints, "
        "converted on first use and cached "
        "(default: %(default)s, or $VLM_PATTERNS_MODELS)",
    )  # fmt: skip
    parser.add_argument(
        "--model-sets", nargs="+", choices=MODEL_SETS, default=None,
        help="the model sets a visitor may pick in the page (default: only the one given by --models); offering "
        "'hub' lets any visitor start multi-GB downloads",
    )  # fmt: skip
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to serve on; 0.0.0.0 for all (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=7860, help="(default: %(default)s)")
    parser.add_argument("--share", action="store_true", help="a public gradio.live link")
    parser.add_argument(
        "--queue-size", type=int, default=16, help="requests waiting beyond this are refused (default: %(default)s)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=2, help="requests answered at the same time (default: %(default)s)"
    )
    parser.add_argument(
        "--sessions", type=int, default=256,
        help="chats kept in memory; the oldest goes beyond this (Gradio keeps 10000, and API clients never close "
        "theirs) (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--smoke-test", action="store_true", help="one example through the four columns without a browser, then exit"
    )
    args = parser.parse_args(argv)
    if args.smoke_test:
        return smoke_test(ModelSet(args.models, device=args.device))
    demo = build_app(args.models, args.device, args.model_sets)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=args.concurrency)
    # Only the bundled examples are served from outside Gradio's own upload folder (uploads and the pictures):
    # files there are served inline, so no folder that others write to (like the temporary folder) belongs here.
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, theme=gr.themes.Soft(),
                allowed_paths=[str(HERE / "examples")], state_session_capacity=args.sessions)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
